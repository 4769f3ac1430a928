"""Greedy decoding without framework overhead: a preallocated KV cache, cross-attention keys and values
computed once per image, logits for the last position only.

It reads the same GPT-2 modules as the model's forward and gives the same tokens as
`GenerationMixin.generate` with greedy search (tested); `MMGPTModel.generate` takes this path when
no option asks for more (beams, sampling, streamers, logits processors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Options this path honours; anything else goes to GenerationMixin.
FAST_OPTIONS = {"max_new_tokens", "min_new_tokens", "do_sample", "num_beams", "use_cache", "eos_token_id",
                "pad_token_id", "bos_token_id"}


def _conv1d(x: torch.Tensor, conv) -> torch.Tensor:
    # transformers' Conv1D: y = x @ W + b with W (in, out)
    return torch.addmm(conv.bias, x.reshape(-1, x.shape[-1]), conv.weight).view(*x.shape[:-1], -1)


def _heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, n_head, d // n_head).transpose(1, 2)  # (B, H, T, hd)


@torch.no_grad()
def greedy_generate(
    model,
    memory: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    min_new_tokens: int = 0,
) -> torch.Tensor:
    """memory (B, K, Dt); input_ids, attention_mask (B, P) left-padded -> (B, P + new) like generate()."""
    tr = model.decoder.transformer
    blocks = list(tr.h)
    cfg = model.decoder.config
    n_head, d = cfg.n_head, cfg.n_embd
    hd = d // n_head
    b, p = input_ids.shape
    total = p + max_new_tokens
    dtype, dev = tr.wte.weight.dtype, input_ids.device
    k_cache = torch.zeros(len(blocks), b, n_head, total, hd, dtype=dtype, device=dev)  # (L, B, H, T, hd)
    v_cache = torch.zeros_like(k_cache)
    cross = {}
    for i, blk in enumerate(blocks):
        if i >= model.k:
            kv = _conv1d(memory, blk.crossattention.c_attn)  # (B, K, 2D)
            km, vm = kv.split(d, dim=2)
            cross[i] = (_heads(km, n_head), _heads(vm, n_head))  # (B, H, K, hd) each
    mask = torch.zeros(b, total, dtype=torch.long, device=dev)
    mask[:, :p] = attention_mask
    padded = not bool(attention_mask.all())
    pos_all = (torch.cat([attention_mask, torch.ones(b, max_new_tokens, dtype=torch.long, device=dev)], 1)
               .cumsum(-1) - 1).clamp(min=0)  # (B, T)
    neg = torch.finfo(dtype).min

    def step(ids: torch.Tensor, start: int) -> torch.Tensor:
        t = ids.shape[1]
        end = start + t
        h = tr.wte(ids) + tr.wpe(pos_all[:, start:end])  # (B, t, D)
        attn_mask = None
        if padded or t > 1:
            q_pos = torch.arange(start, end, device=dev).view(-1, 1)
            k_pos = torch.arange(end, device=dev).view(1, -1)
            allowed = (k_pos <= q_pos).unsqueeze(0) & mask[:, None, :end].bool()  # (B, t, end)
            attn_mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(~allowed, neg).unsqueeze(1)
        for i, blk in enumerate(blocks):
            a = blk.attn
            x = blk.ln_1(h)
            q, k, v = _conv1d(x, a.c_attn).split(d, dim=2)
            k_cache[i, :, :, start:end] = _heads(k, n_head)
            v_cache[i, :, :, start:end] = _heads(v, n_head)
            o = F.scaled_dot_product_attention(_heads(q, n_head), k_cache[i, :, :, :end], v_cache[i, :, :, :end],
                                               attn_mask=attn_mask, scale=a.scaling)  # (B, H, t, hd)
            h = h + _conv1d(o.transpose(1, 2).reshape(b, t, d), a.c_proj)
            if i in cross:
                c = blk.crossattention
                x = blk.ln_cross_attn(h)
                qc = _heads(_conv1d(x, c.q_attn), n_head)
                o = F.scaled_dot_product_attention(qc, *cross[i], scale=c.scaling)  # (B, H, t, hd)
                h = h + _conv1d(o.transpose(1, 2).reshape(b, t, d), c.c_proj)
            h = h + blk.mlp(blk.ln_2(h))
        last = tr.ln_f(h[:, -1])  # (B, D)
        return model.decoder.lm_head(last)  # (B, V)

    out = torch.empty(b, total, dtype=input_ids.dtype, device=dev)
    out[:, :p] = input_ids
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    logits = step(input_ids, 0)
    n = 0
    for n in range(max_new_tokens):
        if eos_token_id is not None and n < min_new_tokens:
            logits[:, eos_token_id] = neg
        nxt = logits.argmax(-1)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        out[:, p + n] = nxt
        mask[:, p + n] = 1
        if eos_token_id is not None:
            done |= nxt == eos_token_id
            if bool(done.all()):
                break
        if n + 1 < max_new_tokens:
            logits = step(nxt.unsqueeze(1), p + n)
    return out[:, : p + n + 1]
