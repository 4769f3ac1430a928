"""Losses: image-text contrastive (gathered across processes with gradients); the LM head fused with
its cross-entropy; next-token and bag-of-words losses of the model's forward."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


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
    import torch.distributed._functional_collectives as fc

    # all_gather_tensor_autograd warns as deprecated where its successor exists
    gather_autograd = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd

    n = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c.item()) for c in counts]
    width = max(counts)
    if width == 0:  # no process has a row (e.g. batches of questions only)
        return x, 0
    if x.shape[0] < width:
        pad = x.new_zeros((width - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], dim=0)  # (width, ...)
    group = dist.group.WORLD
    if grad:
        full = gather_autograd(x.contiguous(), gather_dim=0, group=group)  # (world * width, ...)
    else:
        full = x.new_empty((world * width, *x.shape[1:]))
        dist.all_gather_into_tensor(full, x.contiguous(), group=group)
    full = torch.cat([full[r * width : r * width + c] for r, c in enumerate(counts)], dim=0)  # (sum n_r, ...)
    return full, sum(counts[:rank])


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    groups: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    negatives: torch.Tensor | None = None,
    negative_owner: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021) over the global batch.

    image_embeds, text_embeds: (b, E), L2-normalised, row i of each a positive pair.
    logit_scale: scalar, already exponentiated and clamped.
    groups: optional (b,) integer ids; pairs with equal ids are all positives (duplicate captions),
    and the target spreads evenly over them. Every process computes the same global loss; with
    gradients flowing through the gather and DDP averaging, parameters get exactly the gradient of
    one process holding the whole batch.
    negatives: optional (n, E) L2-normalised hard-negative texts (a caption with one detail changed,
    NegCLIP-style), negative_owner: (n,) the local row (0..b-1) each one contradicts. They join the
    image-to-text softmax of their own image only, as extra wrong answers.
    images: optional (b,) integer ids of each row's image, for several texts per image (a caption and
    question+answer texts): with `groups` as text ids, row i's image and row j's text are a positive
    pair when some row of image(i) carries text(j) (the text is true of that image); without `groups`,
    when image(i) == image(j).
    """
    img, offset = gather_with_grad(image_embeds)  # (B, E)
    txt, _ = gather_with_grad(text_embeds)  # (B, E)
    logits = logit_scale * img @ txt.t()  # (B, B) image -> text
    if logits.shape[0] == 0:  # no pair anywhere (a batch of questions only): nothing to contrast
        return logits.sum() + 0.0 * (img.sum() + txt.sum())
    t2i_target = None
    if images is not None:
        gi, _ = gather_with_grad(images.unsqueeze(1), grad=False)  # (B, 1)
        same_img = (gi == gi.t()).float()  # (B, B) [i, k]: rows i and k show the same image
        if groups is None:
            pos = same_img > 0
        else:
            g, _ = gather_with_grad(groups.unsqueeze(1), grad=False)  # (B, 1)
            pos = (same_img @ (g == g.t()).float()) > 0  # [i, j]: some row k of image(i) has text(j)
        pos = pos.float()
        labels = None
        target = pos / pos.sum(dim=1, keepdim=True)  # image -> text
        t2i_target = pos.t() / pos.t().sum(dim=1, keepdim=True)  # text -> image
    elif groups is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        target = None
    else:
        g, _ = gather_with_grad(groups.unsqueeze(1), grad=False)  # (B, 1)
        same = (g == g.t()).float()  # (B, B), symmetric
        target = same / same.sum(dim=1, keepdim=True)
    t2i = F.cross_entropy(logits.t(), labels if target is None else (target if t2i_target is None else t2i_target),
                          label_smoothing=label_smoothing)
    if negatives is None or negative_owner is None:
        i2t = F.cross_entropy(logits, labels if target is None else target, label_smoothing=label_smoothing)
        return 0.5 * (i2t + t2i)
    neg, _ = gather_with_grad(negatives)  # (N, E)
    owner, _ = gather_with_grad((negative_owner.long() + offset).unsqueeze(1), grad=False)
    owner = owner.squeeze(1)  # (N,) global image rows
    n_img = logits.shape[0]
    if target is None:
        target = torch.eye(n_img, dtype=logits.dtype, device=logits.device)
    # Slot of each negative among its owner's: rank within a stable sort by owner.
    order = torch.argsort(owner, stable=True)
    counts = torch.bincount(owner, minlength=n_img)  # (B,)
    first = torch.cumsum(counts, 0) - counts  # (B,) start of each owner's run in `order`
    slot = torch.empty_like(owner)
    slot[order] = torch.arange(owner.shape[0], device=owner.device) - first[owner[order]]
    k = int(counts.max().item()) if owner.numel() else 0
    extra = logits.new_zeros(n_img, k)  # (B, K)
    extra = extra.index_put((owner, slot), logit_scale * (img[owner] * neg).sum(-1))
    valid = torch.zeros(n_img, k, dtype=torch.bool, device=logits.device)
    valid[owner, slot] = True
    full = torch.cat([logits, extra], dim=1)  # (B, B + K)
    full_valid = torch.cat([torch.ones_like(logits, dtype=torch.bool), valid], dim=1)
    full_target = torch.cat([target, target.new_zeros(n_img, k)], dim=1)
    if label_smoothing:
        n_valid = full_valid.sum(1, keepdim=True)
        full_target = (1 - label_smoothing) * full_target + label_smoothing * full_valid / n_valid
    logp = torch.log_softmax(full.float().masked_fill(~full_valid, float("-inf")), dim=1)
    i2t = -(full_target * logp.masked_fill(~full_valid, 0.0)).sum(1).mean()
    return 0.5 * (i2t + t2i)


class _LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(h_i @ W^T, y_i), with the gradients computed chunk by chunk in the forward pass.

    The (N, V) logits never exist whole: each chunk of rows is projected, turned into its loss and its
    logit gradient in place (softmax minus the smoothed one-hot), and multiplied back into dh and dW
    while it is still in cache. Same matmuls as autograd, without the log-softmax output, the
    zero-filled NLL gradient and the softmax backward over the whole (N, V) block.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, label_smoothing, chunk):
        # hidden (N, D), weight (V, D), targets (N,)
        n, v = hidden.shape[0], weight.shape[0]
        loss = hidden.new_zeros(())
        grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros_like(weight) if weight.requires_grad else None
        eps = label_smoothing
        for s in range(0, n, chunk):
            h, y = hidden[s : s + chunk], targets[s : s + chunk]  # (c, D), (c,)
            logits = h @ weight.t()  # (c, V)
            lse = torch.logsumexp(logits, dim=1, keepdim=True)  # (c, 1)
            target_logit = logits.gather(1, y[:, None])  # (c, 1)
            nll = lse - target_logit
            if eps:
                nll = (1 - eps) * nll + eps * (lse - logits.mean(dim=1, keepdim=True))
            loss += nll.sum()
            g = logits.sub_(lse).exp_()  # softmax, in place (c, V)
            g.scatter_add_(1, y[:, None], torch.full_like(target_logit, eps - 1))
            if eps:
                g.sub_(eps / v)
            g.div_(n)
            if grad_h is not None:
                torch.mm(g, weight, out=grad_h[s : s + chunk])
            if grad_w is not None:
                grad_w.addmm_(g.t(), h)
        ctx.save_for_backward(grad_h, grad_w)
        return loss / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_out if grad_h is not None else None,
            grad_w * grad_out if grad_w is not None else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean next-token cross-entropy of `hidden @ weight.T` against `targets`, the LM head fused in.

    hidden (N, D) rows that have a target; weight (V, D), the (tied) LM head; targets (N,) class ids.
    Equals F.cross_entropy(hidden @ weight.T, targets, label_smoothing=...) in value and gradients
    (tested). fp32 without autocast only; other dtypes take the plain path.
    """
    if hidden.dtype != torch.float32 or weight.dtype != torch.float32 or torch.is_autocast_enabled(hidden.device.type):
        return F.cross_entropy((hidden @ weight.t()).float(), targets, label_smoothing=label_smoothing)
    chunk = max(1, (1 << 21) // weight.shape[0])  # rows whose (c, V) fp32 logits take ~8 MB
    return _LinearCrossEntropy.apply(hidden, weight, targets, float(label_smoothing), chunk)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against labels (B, T) shifted by one (-100 = ignore)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    return F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=-100, label_smoothing=label_smoothing)


def target_rows_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                     label_smoothing: float = 0.0) -> torch.Tensor:
    """`next_token_loss` with only the rows that have a target through the LM head `head`, fused with the
    loss (`linear_cross_entropy`) where it is a plain bias-free Linear: hidden (B, T, D), labels (B, T)."""
    keep = labels[:, 1:] != -100  # (B, T-1)
    rows, targets = hidden[:, :-1][keep], labels[:, 1:][keep]  # (N, D), (N,)
    if type(head) is nn.Linear and head.bias is None:
        return linear_cross_entropy(rows, head.weight, targets, label_smoothing)
    return F.cross_entropy(head(rows).float(), targets, label_smoothing=label_smoothing)  # e.g. LoRA


def bag_of_words_loss(head: nn.Linear, tokens: torch.Tensor, labels: torch.Tensor,
                      image_index: torch.Tensor | None, itc_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Bag of words: for every vocabulary entry, a binary cross-entropy on whether the image's ITC rows
    (`itc_mask`: its caption, plus answers with itc_questions; all rows when None) hold that target
    token, from head(mean image token) (tokens (B_img, K, Dt), the adapter's);
    summed over the vocabulary, averaged over the rows. Each token is its own yes/no task, so a
    word that tells images apart (a shape name) is not crowded out by the frequent ones."""
    rows = itc_mask.bool() if itc_mask is not None else torch.ones(labels.shape[0], dtype=torch.bool,
                                                                     device=labels.device)
    img = image_index[rows] if image_index is not None else rows.nonzero().squeeze(1)  # (b,)
    lab = labels[rows]  # (b, T)
    if lab.shape[0] == 0:
        return None
    bag = torch.zeros(lab.shape[0], head.out_features, device=lab.device)
    keep = lab != -100
    bag[torch.arange(lab.shape[0], device=lab.device)[:, None].expand_as(lab)[keep], lab[keep]] = 1.0
    logits = head(tokens.mean(1)[img]).float()  # (b, V)
    return F.binary_cross_entropy_with_logits(logits, bag, reduction="sum") / lab.shape[0]


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x in the forward pass; its gradient times `scale` in the backward pass."""
    if scale == 1.0 or not x.requires_grad:
        return x
    d = x.detach()
    # (x - d) is exactly 0, so the forward is x bit for bit (nan_to_num: inf - inf would be NaN)
    return d + (x - d).nan_to_num(0.0) * scale
