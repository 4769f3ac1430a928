"""Evaluation over all processes: each takes a contiguous share of the work and the results are gathered.

`train.evaluate.evaluate` generates captions and answers and embeds images and texts through the two
functions here. On one process (or without a process group) they are the plain local ones. Under
`accelerate launch` every process reads the same records in the same order, runs the model on its own
contiguous slice of the images (and texts), and ``accelerate.utils.gather_object`` puts the slices
back together in the original order, so each process ends with the same list one process would have
made and computes the same metrics (see tests/test_scale.py). A slice is run in the same batches one
process would run over it; only where batches start differs.

Every process must call these the same number of times (they are collectives). Under FSDP the model's
forward is a collective too, and uneven slices would leave one process waiting: evaluate with DDP or
one process there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def world() -> tuple[int, int]:
    """(this process's index, number of processes): Accelerate's process group, started here under a
    launcher that set WORLD_SIZE (e.g. `accelerate launch ... mmgpt eval`); (0, 1) outside one."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not initialized and int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return 0, 1
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    return state.process_index, state.num_processes


def share(n: int, rank: int, size: int) -> slice:
    """The contiguous part of ``range(n)`` process ``rank`` of ``size`` takes (sizes differ by <= 1)."""
    per, extra = divmod(n, size)
    start = rank * per + min(rank, extra)
    return slice(start, start + per + (rank < extra))


def gather_lists(local: list) -> list:
    """Every process's ``local`` list, joined in process order, on every process."""
    _, size = world()
    if size == 1:
        return local
    from accelerate.utils import gather_object

    parts = gather_object([local])  # [list of process 0, list of process 1, ...]
    return [x for part in parts for x in part]


def generate_texts(model, processor, images: Sequence, tasks: Sequence[str], prompts: Sequence[str],
                   batch_size: int, **gen) -> list[str]:
    """``train.evaluate.generate_texts`` with the triples shared out over the processes."""
    from train.evaluate import generate_texts as local

    rank, size = world()
    if size == 1:
        return local(model, processor, images, tasks, prompts, batch_size, **gen)
    mine = share(len(images), rank, size)
    return gather_lists(local(model, processor, list(images[mine]), list(tasks[mine]), list(prompts[mine]),
                              batch_size, **gen))


@torch.inference_mode()
def embed(model, processor, images: Sequence, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """``train.evaluate.embed`` (the (N_img, N_txt) cosine similarities) with the images and the texts
    shared out over the processes; the embeddings are gathered and multiplied on every process."""
    from train.evaluate import embed as local

    rank, size = world()
    if size == 1:
        return local(model, processor, images, texts, batch_size)
    p = next(model.parameters())
    imgs = list(images[share(len(images), rank, size)])
    txts = list(texts[share(len(texts), rank, size)])
    img = [model.embed_image(processor.images(imgs[i : i + batch_size]).to(p.device, p.dtype)).float().cpu()
           for i in range(0, len(imgs), batch_size)]  # each (b, E)
    txt = []
    for i in range(0, len(txts), batch_size):
        batch = processor.batch_texts(txts[i : i + batch_size])
        txt.append(model.embed_text(batch["input_ids"].to(p.device), batch["attention_mask"].to(p.device)).float().cpu())
    img_all = torch.cat(gather_lists(img))  # (N_img, E)
    txt_all = torch.cat(gather_lists(txt))  # (N_txt, E)
    return img_all @ txt_all.T  # (N_img, N_txt)
