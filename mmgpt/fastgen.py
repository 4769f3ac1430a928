"""Greedy decoding without framework overhead: a preallocated KV cache, cross-attention keys and values
computed once per image, logits for the last position only.

It reads the same GPT-2 modules as the model's forward and gives the same tokens as
`GenerationMixin.generate` with greedy search (tested); `MMGPTModel.generate` takes this path when
no option asks for more (beams, sampling, streamers, logits processors).

Decoding a few rows is bound by memory bandwidth: every step streams all decoder weights and the LM
head. The LM head's weight is the (V, D) token embedding; MKL's vector-matrix product reads it about
twice as fast laid out (D, V), so each call makes that copy once (12 MB for the small preset, ~10 ms;
made when at least 8 new tokens are asked for: it pays for itself within about that many).
Everything stays fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Options this path honours; anything else goes to GenerationMixin.
FAST_OPTIONS = {"max_new_tokens", "min_new_tokens", "do_sample", "num_beams", "use_cache", "eos_token_id",
                "pad_token_id", "bos_token_id"}


def _conv1d(conv):
    # transformers' Conv1D: y = x @ W + b with W (in, out); x here is 2-D (B*t, in)
    w, bias = conv.weight, conv.bias
    return lambda x: torch.addmm(bias, x, w)


def _layer_norm(ln):
    return lambda x: F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _heads(x: torch.Tensor, b: int, n_head: int) -> torch.Tensor:
    # (B*t, D) -> (B, H, t, hd)
    return x.view(b, -1, n_head, x.shape[-1] // n_head).transpose(1, 2)


def _pack(model, copy_head: bool) -> tuple[list[dict], callable]:
    """Per block: its norms, linears and activation as plain functions on 2-D rows; and the LM head."""
    blocks = []
    for i, blk in enumerate(model.decoder.transformer.h):
        a = blk.attn
        p = {"ln_1": _layer_norm(blk.ln_1), "qkv": _conv1d(a.c_attn), "proj": _conv1d(a.c_proj), "scale": a.scaling,
             "ln_2": _layer_norm(blk.ln_2), "fc": _conv1d(blk.mlp.c_fc), "act": blk.mlp.act,
             "fc_proj": _conv1d(blk.mlp.c_proj), "cross": None}
        if i >= model.k:
            c = blk.crossattention
            p["cross"] = {"ln": _layer_norm(blk.ln_cross_attn), "kv": _conv1d(c.c_attn), "q": _conv1d(c.q_attn),
                          "proj": _conv1d(c.c_proj), "scale": c.scaling}
        blocks.append(p)
    # lm_head.weight (V, D) is tied to wte; a (D, V) copy streams ~2x faster per step (module doc).
    head = model.decoder.lm_head
    w = head.weight.t().contiguous() if copy_head else head.weight.t()  # (D, V)
    if head.bias is None:
        return blocks, lambda x: torch.mm(x, w)
    return blocks, lambda x: torch.addmm(head.bias, x, w)


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
    blocks, lm_head = _pack(model, copy_head=max_new_tokens >= 8)
    cfg = model.decoder.config
    n_head, d = cfg.n_head, cfg.n_embd
    hd = d // n_head
    b, p = input_ids.shape
    total = p + max_new_tokens
    dtype, dev = tr.wte.weight.dtype, input_ids.device
    k_cache = torch.zeros(len(blocks), b, n_head, total, hd, dtype=dtype, device=dev)  # (L, B, H, T, hd)
    v_cache = torch.zeros_like(k_cache)
    # Cross-attention keys and values, once per call.
    mem2d = memory.reshape(-1, d)  # (B*K, D)
    for blk in blocks:
        if blk["cross"] is not None:
            km, vm = blk["cross"]["kv"](mem2d).split(d, dim=1)  # (B*K, D) each
            blk["cross"]["k"], blk["cross"]["v"] = _heads(km, b, n_head), _heads(vm, b, n_head)  # (B, H, K, hd)
    mask = torch.zeros(b, total, dtype=torch.long, device=dev)
    mask[:, :p] = attention_mask
    padded = not bool(attention_mask.all())
    pos_all = (torch.cat([attention_mask, torch.ones(b, max_new_tokens, dtype=torch.long, device=dev)], 1)
               .cumsum(-1) - 1).clamp(min=0)  # (B, T)
    neg = torch.finfo(dtype).min
    wte, wpe, ln_f = tr.wte.weight, tr.wpe.weight, _layer_norm(tr.ln_f)

    def step(ids: torch.Tensor, start: int) -> torch.Tensor:
        t = ids.shape[1]
        end = start + t
        h = (wte[ids] + wpe[pos_all[:, start:end]]).view(b * t, d)  # (B*t, D)
        attn_mask = None
        if padded or t > 1:
            q_pos = torch.arange(start, end, device=dev).view(-1, 1)
            k_pos = torch.arange(end, device=dev).view(1, -1)
            allowed = (k_pos <= q_pos).unsqueeze(0) & mask[:, None, :end].bool()  # (B, t, end)
            attn_mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(~allowed, neg).unsqueeze(1)
        for i, blk in enumerate(blocks):
            q, k, v = blk["qkv"](blk["ln_1"](h)).split(d, dim=1)  # (B*t, D) each
            k_cache[i, :, :, start:end] = _heads(k, b, n_head)
            v_cache[i, :, :, start:end] = _heads(v, b, n_head)
            o = F.scaled_dot_product_attention(_heads(q, b, n_head), k_cache[i, :, :, :end], v_cache[i, :, :, :end],
                                               attn_mask=attn_mask, scale=blk["scale"])  # (B, H, t, hd)
            h = h + blk["proj"](o.transpose(1, 2).reshape(b * t, d))
            c = blk["cross"]
            if c is not None:
                qc = _heads(c["q"](c["ln"](h)), b, n_head)  # (B, H, t, hd)
                o = F.scaled_dot_product_attention(qc, c["k"], c["v"], scale=c["scale"])  # (B, H, t, hd)
                h = h + c["proj"](o.transpose(1, 2).reshape(b * t, d))
            h = h + blk["fc_proj"](blk["act"](blk["fc"](blk["ln_2"](h))))
        last = ln_f(h.view(b, t, d)[:, -1])  # (B, D)
        return lm_head(last)  # (B, V)

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
