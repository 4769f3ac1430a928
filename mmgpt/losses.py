"""Image-text contrastive loss, gathered across processes with gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor, grad: bool = True) -> tuple[torch.Tensor, int]:
    """All-gather rows of `x` from every process, keeping the autograd graph.

    Processes may hold different numbers of rows: rows are padded to the largest count, gathered
    with torch's functional-collectives autograd all-gather (its backward is a sum reduce-scatter),
    then the padding is dropped. Returns the gathered (sum_r n_r, ...) tensor and this rank's offset.
    """
    rank, world = _world()
    if world == 1:
        return x, 0
    from torch.distributed._functional_collectives import all_gather_tensor, all_gather_tensor_autograd

    n = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c.item()) for c in counts]
    width = max(counts)
    if x.shape[0] < width:
        pad = x.new_zeros((width - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], dim=0)  # (width, ...)
    group = dist.group.WORLD
    gather = all_gather_tensor_autograd if grad else all_gather_tensor
    full = gather(x.contiguous(), gather_dim=0, group=group)  # (world * width, ...)
    full = torch.cat([full[r * width : r * width + c] for r, c in enumerate(counts)], dim=0)  # (sum n_r, ...)
    return full, sum(counts[:rank])


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    groups: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021) over the global batch.

    image_embeds, text_embeds: (b, E), L2-normalised, row i of each a positive pair.
    logit_scale: scalar, already exponentiated and clamped.
    groups: optional (b,) integer ids; pairs with equal ids are all positives (duplicate captions),
    and the target spreads evenly over them. Every process computes the same global loss; with
    gradients flowing through the gather and DDP averaging, parameters get exactly the gradient of
    one process holding the whole batch.
    """
    img, _ = gather_with_grad(image_embeds)  # (B, E)
    txt, _ = gather_with_grad(text_embeds)  # (B, E)
    logits = logit_scale * img @ txt.t()  # (B, B) image -> text
    if groups is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (
            F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.t(), labels, label_smoothing=label_smoothing)
        )
    g, _ = gather_with_grad(groups.unsqueeze(1), grad=False)  # (B, 1)
    same = (g == g.t()).float()  # (B, B), symmetric
    target = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (
        F.cross_entropy(logits, target, label_smoothing=label_smoothing)
        + F.cross_entropy(logits.t(), target, label_smoothing=label_smoothing)
    )
