"""mmgpt models under transformers' Trainer: resume restores every weight (the ViT's too), gradient
accumulation keeps the loss a mean, predictions are the logits."""

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from mmgpt import MMGPTModel, build_model
from train.collate import Collator

pytestmark = pytest.mark.usefixtures("single_torch_thread")
COLORS = ["red", "blue", "green", "yellow"]


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n=16):
        self.items = [(Image.new("RGB", (64, 64), COLORS[i % 4]), f"a {COLORS[i % 4]} image") for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image, caption = self.items[i]
        return {"image": image, "task": "caption", "prompt": "", "target": caption, "image_id": str(i % 4)}


def _model():
    torch.manual_seed(0)
    return build_model("tiny", texts=[f"a {c} image" for c in COLORS])


def _trainer(tmp, model, proc, **args):
    targs = TrainingArguments(output_dir=str(tmp), per_device_train_batch_size=4, max_steps=4, save_steps=2,
                              logging_steps=1, report_to=[], use_cpu=True, remove_unused_columns=False,
                              learning_rate=1e-3, seed=0, data_seed=0, dataloader_num_workers=0, **args)
    return Trainer(model=model, args=targs, train_dataset=Pairs(), eval_dataset=Pairs(4),
                   data_collator=Collator(proc), processing_class=proc)


def test_trainer_resume_restores_every_weight_and_checkpoints_load(tmp_path):
    model, proc = _model()
    full = _trainer(tmp_path / "full", model, proc)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    saved = load_file(ckpt / "model.safetensors")
    assert set(saved) <= set(model.state_dict())  # the modules' own names: a plain load_state_dict fits
    again, _ = _model()
    resumed = _trainer(tmp_path / "full", again, proc)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for key, value in model.state_dict().items():
        assert torch.allclose(again.state_dict()[key], value, atol=1e-6), key
    loaded = MMGPTModel.from_pretrained(tmp_path / "full" / "checkpoint-4")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    pred = full.predict(Pairs(4))
    assert pred.predictions.ndim == 3  # the logits alone, not a tuple of every output field


def test_gradient_accumulation_logs_the_loss_not_its_multiple(tmp_path):
    losses = {}
    for accum in (1, 2):
        model, proc = _model()
        tr = _trainer(tmp_path / f"a{accum}", model, proc, gradient_accumulation_steps=accum, max_grad_norm=0.0)
        tr.args.per_device_train_batch_size = 4 // accum
        tr.args.learning_rate = 0.0
        tr.train()
        losses[accum] = [r["loss"] for r in tr.state.log_history if "loss" in r]
    # the same samples per step; with 2 micro-batches each loss is a mean of two half-batch means
    assert abs(losses[2][0] - losses[1][0]) < 0.5 * losses[1][0], losses
