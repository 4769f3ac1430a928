"""Run under `accelerate launch` with 2 processes: each takes its half of a fixed batch, computes the
model's ITC loss (features gathered with gradients) and DDP-averaged gradients, and saves them."""

import sys

import torch
from accelerate import Accelerator

from mmgpt import MMGPTModel

model_dir, batch_file, out_file = sys.argv[1:4]
acc = Accelerator(cpu=True)
model = MMGPTModel.from_pretrained(model_dir)
model.train()
batch = torch.load(batch_file)
n = batch["input_ids"].shape[0]
per = n // acc.num_processes
sl = slice(acc.process_index * per, (acc.process_index + 1) * per)
local = {k: v[sl] for k, v in batch.items() if not k.startswith("itc_negative")}
if "itc_negative_owner" in batch:  # hard negatives follow their caption row, owners re-based to the slice
    owner = batch["itc_negative_owner"]
    mine = (owner >= sl.start) & (owner < sl.stop)
    local["itc_negative_ids"] = batch["itc_negative_ids"][mine]
    local["itc_negative_mask"] = batch["itc_negative_mask"][mine]
    local["itc_negative_owner"] = owner[mine] - sl.start
model = acc.prepare(model)
out = model(**local)
acc.backward(out.loss)
grads = {k: p.grad.detach().clone() for k, p in acc.unwrap_model(model).named_parameters() if p.grad is not None}
if acc.is_main_process:
    torch.save({"itc_loss": out.itc_loss.detach(), "grads": grads, "world": acc.num_processes}, out_file)
acc.wait_for_everyone()
