"""Optimizers: AdamW, or Muon for the hidden weight matrices with AdamW for the rest.

Muon (Jordan et al. 2024; the AdamW-matched scale from Liu et al. 2025, "Muon is Scalable") keeps a
Nesterov momentum of each matrix's gradient and steps along its nearest semi-orthogonal matrix, found
with a quintic Newton-Schulz iteration. Every direction of the matrix then moves at the same rate, where
AdamW's per-entry update lets a few large directions dominate. The update is scaled by
0.2 * sqrt(max(rows, cols)) so that its RMS matches AdamW's and the same learning rate and weight decay
carry over. Embeddings, the tied LM head, the first convolution (3 input channels), norms, biases and
scalars stay with AdamW, as in the reference recipes.

Sharded parameters (FSDP2's DTensors, e.g. from torch's ``fully_shard``): the momentum stays sharded,
each matrix's Nesterov gradient is gathered whole (``full_tensor``), orthogonalized on every process
(the same result everywhere), and each process adds its own shard of the update
(``distribute_tensor`` with ``src_data_rank=None`` slices locally, no communication). The step then
equals the single-process one; the cost is one all-gather per matrix and the orthogonalization done
on every process (distributing whole matrices over the processes would share that work out).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of g's SVD (singular values pushed into ~[0.6, 1.2]), for a matrix or a stack
    of same-shaped matrices (..., m, n): one batched product per iteration for a whole stack."""
    a, b, c = NS_COEFFS
    x = g.float().reshape(-1, *g.shape[-2:])
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).reshape(g.shape).to(g.dtype)


def wants_muon(name: str, p: torch.Tensor) -> bool:
    """Hidden weight matrices (and convolutions past the first) take Muon; the rest AdamW."""
    if p.ndim < 2 or any(k in name for k in ("wte", "wpe", "position", "cls_token", "embed_tokens", "lm_head")):
        return False
    return not (p.ndim == 4 and p.shape[1] <= 4)  # the first convolution reads raw pixels: AdamW


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, two rules: groups with `muon=True` take Muon, the others AdamW (decoupled weight
    decay). One object so that Accelerate, the LR scheduler and checkpoints see a plain optimizer."""

    def __init__(self, groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-8, momentum=0.95, ns_steps=5):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0, muon=False,
                        momentum=momentum, ns_steps=ns_steps)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stacks: dict[tuple, list] = {}  # Muon matrices of one shape are orthogonalized together
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if group["muon"]:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.zeros_like(g)
                    mu = group["momentum"]
                    buf.lerp_(g, 1 - mu)
                    nesterov = g.lerp(buf, mu)
                    if isinstance(nesterov, DTensor):  # a shard (FSDP2): orthogonalize the whole matrix
                        nesterov = nesterov.full_tensor()
                    nesterov = nesterov.reshape(nesterov.shape[0], -1)
                    stacks.setdefault((tuple(nesterov.shape), group["ns_steps"]), []).append((p, nesterov, lr, wd))
                    continue
                if wd:
                    p.mul_(1 - lr * wd)
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                b1, b2 = group["betas"]
                state["step"] += 1
                t = float(state["step"])
                state["exp_avg"].lerp_(g, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))
        for (shape, ns_steps), items in stacks.items():
            updates = orthogonalize(torch.stack([u for _, u, _, _ in items]), ns_steps)
            scale = 0.2 * max(shape) ** 0.5  # AdamW-matched RMS
            for (p, _, lr, wd), update in zip(items, updates):
                if wd:
                    p.mul_(1 - lr * wd)
                update = update.view(p.shape)  # (global shape)
                if isinstance(p, DTensor):  # this process's shard of the whole update
                    update = distribute_tensor(update, p.device_mesh, p.placements, src_data_rank=None)
                p.add_(update, alpha=-lr * scale)
        return loss
