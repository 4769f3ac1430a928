"""Greedy decoding and sampling without framework overhead: a preallocated KV cache, cross-attention keys and values
computed once per image, logits for the last position only, and a lean one-token step.

It reads the same GPT-2 weights as the model's forward and gives the same tokens as
`GenerationMixin.generate` with greedy search (tested); `MMGPTModel.generate` takes this path when
no option asks for more (beams, streamers, logits processors other than the ones below).

Sampling (`do_sample=True` with `temperature`, `top_k`, `top_p`) runs transformers' own warpers
(TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, in GenerationMixin's order, with its
defaults: top_k 50 unless set) on each step's logits and draws with `torch.multinomial` on torch's
global generator as GenerationMixin does, so `torch.manual_seed(s)` before either gives the same
tokens (tested).

A model put on int8 weights (`mmgpt.speed.quantize`, `load(..., quantize="int8")`) runs every linear of
the step through `mmgpt.speed.kernels.rows_linear_int8` where the kernel builds: a quarter of the bytes.

Decoding a few rows is bound by memory bandwidth and by per-op overhead: every step streams all
decoder weights and the LM head, through about twenty small ops per layer. So:
- The weights are laid out once per weights version and kept on the model (`DecoderPlan`; rebuilt
  when any decoder parameter changes): the LM head as a (D, V) copy of the (V, D) token embedding,
  which MKL's vector-matrix product streams about twice as fast.
- With one row on a CPU with 2+ threads, MKL's vector-matrix product runs on one core. Each linear
  is then stored as two halves of its output columns, (2, in, out/2), and run as one `baddbmm`
  whose two matrices go to two threads; a wide-input linear (the MLP's c_proj) keeps its halves
  as (2, out/2, in) rows, which streams faster there.
- With several rows on a CPU (float32, oneDNN built in), each linear is one oneDNN call on a weight
  reordered once into oneDNN's blocked layout, the MLP's GELU in its epilogue: at 16 rows ~1.5x
  MKL's addmm for the block linears and 3x for the LM head (measured on this 2-core machine).
- Where `mmgpt.speed.kernels` builds (x86-64 Linux, AVX2, a C compiler; fp32 on the CPU), every linear of
  the step, for one row and for several, is its AVX2 kernel on weights packed into 16-column panels
  instead: torch's kernels read the weights at 5-9 GB/s for one row, the kernel ~12 GB/s on one
  thread here (`python -m benchmarks.decode_kernels`); decoding 24 tokens took 1.15-1.2x less time
  on one thread at batch 1 and 16. The plans above remain the fallback.
- The one-token step works on (B, D) rows in place: one copy writes k and v into the cache, the
  padding mask is built once per call, position embeddings are gathered once per call. Its
  attention (one query) is two batched products and a softmax over (B*H, 1, T) rows, the keys
  read as (B*H, hd, T) (the cross-attention keys transposed once per call): SDPA's CPU kernel
  spent ~0.5 ms per call there at 16 rows. Decoding 24 tokens for 16 images: 660 -> 534 ms.
- On a shared machine whose other core is busy, each of a step's ~40 parallel regions waits for
  that core's time slice (a 2-thread step then took 30x longer than a 1-thread one here). A call
  therefore decodes on one thread when `mmgpt.speed.threads.cores_free` says the other cores are
  busy, and moves to one thread mid-call when a step takes 3x the call's fastest, or 1.5x the
  fastest one-thread step seen at that batch size.
- Where the kernels build, the whole one-token step is one C call (`mmgpt_decode_step` in
  rows_linear.c: norms, products, cache writes, one-query attention, GELU, LM head), instead of
  ~20 torch ops per layer; the torch step above is its fallback and its reference (tested against
  the model's forward logits). A one-token prompt (a caption's BOS) is such a step too.
- Conversations (`mmgpt.chat`) keep each answer's keys and values (`KeptCache`): a follow-up turn
  feeds only its new tokens (`past=`), and streams through a transformers streamer (`streamer=`).
Everything stays fp32.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from mmgpt.speed import kernels
from mmgpt.speed.plan import heads, layer_norm, plan_for
from mmgpt.speed.threads import cores_free, one_thread

# Options this path honours; anything else goes to GenerationMixin.
FAST_OPTIONS = {"max_new_tokens", "min_new_tokens", "do_sample", "num_beams", "use_cache", "eos_token_id",
                "pad_token_id", "bos_token_id", "temperature", "top_k", "top_p", "stopping_criteria", "streamer"}
# Sampling options of a generation_config that this path does not apply: each must be unset (or neutral).
_OTHER_WARPERS = {"min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None}
_WARPER_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}  # GenerationConfig's global defaults


def _setting(name: str, kwargs: dict, gc):
    """A generation option as GenerationMixin resolves it: the call's, else the model's
    generation_config's, else transformers' global default."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    value = getattr(gc, name, None)
    if value is not None:
        return value
    defaults = getattr(type(gc), "_get_default_generation_params", None)
    return (defaults() if defaults else _WARPER_DEFAULTS).get(name, _WARPER_DEFAULTS.get(name))


def can_sample(gc) -> bool:
    """True when the model's generation_config asks for no warper but temperature / top-k / top-p (the
    call's other options are checked against FAST_OPTIONS)."""
    return all(getattr(gc, k, None) in (None, neutral) for k, neutral in _OTHER_WARPERS.items())


def sampling_warpers(kwargs: dict, gc):
    """The LogitsProcessorList GenerationMixin builds for these sampling options (`_get_logits_processor`,
    its warpers part, for one beam)."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    t, k, p = (_setting(n, kwargs, gc) for n in ("temperature", "top_k", "top_p"))
    warpers = LogitsProcessorList()
    if t is not None and t != 1.0:
        warpers.append(TemperatureLogitsWarper(t))
    if k is not None and k != 0:
        warpers.append(TopKLogitsWarper(top_k=k, min_tokens_to_keep=1))
    if p is not None and p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=p, min_tokens_to_keep=1))
    return warpers


def _c_step(plan, model, b: int, total: int, kv_cache, cross_kv: dict, key_bias, n_mem: int):
    """The whole one-token step as one call of `mmgpt.speed.kernels.decode_step` (rows_linear.c), or None
    where it cannot run (not the kernels' plan, an activation it lacks, more rows than the kernels take).
    Returns step(ids (B,), h (B, D) the embeddings at `pos`, pos) -> logits (B, V)."""
    fn = kernels.decode_step() if getattr(plan, "kernel", False) else None
    if fn is None or plan.gelu_tanh is None or b > kernels.MAX_ROWS:
        return None
    d, n_head = plan.d, plan.n_head
    keep = []  # tensors whose pointers the C structs hold

    def ptr(t):
        keep.append(t)
        return t.data_ptr()

    layers = (kernels.Layer * len(plan.blocks))()
    empty = kernels.Lin()
    for i, p in enumerate(plan.blocks):
        blk, c = p["module"], p["cross"]
        if p["fc"] is None or not all(hasattr(f, "lin") for f in (p["qkv"], p["proj"], p["fc"], p["fc_proj"])):
            return None
        x = layers[i]
        x.ln1_w, x.ln1_b, x.ln1_eps = ptr(blk.ln_1.weight.detach()), ptr(blk.ln_1.bias.detach()), blk.ln_1.eps
        x.ln2_w, x.ln2_b, x.ln2_eps = ptr(blk.ln_2.weight.detach()), ptr(blk.ln_2.bias.detach()), blk.ln_2.eps
        x.qkv, x.proj, x.fc, x.fc_proj = p["qkv"].lin, p["proj"].lin, p["fc"].lin, p["fc_proj"].lin
        x.scale = p["scale"]
        x.k_cache, x.v_cache = ptr(kv_cache[i, 0]), ptr(kv_cache[i, 1])  # (B, H, T, hd), contiguous
        x.cq = x.cproj = empty
        if c is not None:
            if not (hasattr(c["q"], "lin") and hasattr(c["proj"], "lin")):
                return None
            ln = blk.ln_cross_attn
            x.lnc_w, x.lnc_b, x.lnc_eps = ptr(ln.weight.detach()), ptr(ln.bias.detach()), ln.eps
            x.cq, x.cproj, x.cscale = c["q"].lin, c["proj"].lin, c["scale"]
            _, vm, km_t = cross_kv[i]  # values (B*H, M, hd), keys transposed (B*H, hd, M)
            x.ck, x.cv, x.n_mem = ptr(km_t.contiguous()), ptr(vm.contiguous()), n_mem
    tr = model.decoder.transformer
    lnf_w, lnf_b = tr.ln_f.weight.detach(), tr.ln_f.bias.detach()
    head = plan.lm_head.lin
    f_width = max(p["fc"].lin.N for p in plan.blocks)
    work = torch.empty(b * (d + max(3 * d, f_width)))
    tmp = torch.empty(b, d)
    scores = torch.empty(b * n_head * max(total, n_mem))
    bias_ptr = None if key_bias is None else ptr(key_bias.contiguous())
    keep += [lnf_w, lnf_b, work, tmp, scores, plan]

    def step(h: torch.Tensor, pos: int) -> torch.Tensor:
        h = h.contiguous()
        logits = torch.empty(b, head.N)
        fn(layers, len(plan.blocks), b, d, n_head, total, pos, h.data_ptr(), bias_ptr, lnf_w.data_ptr(),
           lnf_b.data_ptr(), tr.ln_f.eps, head, logits.data_ptr(), work.data_ptr(), tmp.data_ptr(),
           scores.data_ptr(), plan.gelu_tanh, torch.get_num_threads())
        return logits

    step.keep = keep
    return step


def loop_options(kwargs: dict, gc) -> dict:
    """generate()'s options (over the model's generation_config `gc`) as `greedy_generate`'s arguments."""
    eos = kwargs.get("eos_token_id", gc.eos_token_id)
    pad = kwargs.get("pad_token_id", gc.pad_token_id)
    return {"max_new_tokens": int(kwargs["max_new_tokens"]), "eos_token_id": eos,
            "pad_token_id": eos if pad is None else pad, "min_new_tokens": int(kwargs.get("min_new_tokens") or 0),
            "warpers": sampling_warpers(kwargs, gc) if kwargs.get("do_sample", gc.do_sample) else None,
            "stopping_criteria": kwargs.get("stopping_criteria"), "streamer": kwargs.get("streamer")}


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
    threads: str | None = None,
    warpers=None,
    past: KeptCache | None = None,
    streamer=None,
    keep: bool = False,
    stopping_criteria=None,
):
    """memory (B, K, Dt); input_ids, attention_mask (B, P) left-padded -> (B, P + new) like generate().

    `past` (one row, no padding): the kept state of a conversation's earlier tokens (`keep=True` of an
    earlier call, perhaps cropped); input_ids are then the tokens after them. `keep`: also return the
    `KeptCache` of this call ((B, P + new), cache). `streamer`: a transformers streamer (one row) that
    gets the prompt, then each token as it is chosen, as GenerationMixin feeds it. `stopping_criteria`
    (transformers' StoppingCriteriaList, or any callable (ids, scores) -> bool per row): after each token, a
    row it marks ends there, as in GenerationMixin (scores here are the step's logits, not warped ones).

    `warpers` (a LogitsProcessorList, `sampling_warpers`): sample each token from the warped logits
    with torch.multinomial, as GenerationMixin's sampling does; None: greedy.

    `threads` (CPU with 2+ torch threads): "parallel": on all threads, one-row linears split in
    halves (module doc); "serial": on one thread; None: "parallel" while the other cores take work
    at once (`mmgpt.speed.threads.cores_free`), else "serial"; and a one-token step that takes 3x
    the call's fastest, or 1.5x the fastest one-thread step seen at this batch size, moves the rest
    of the call to one thread."""
    b, dev = input_ids.shape[0], input_ids.device
    n_threads = torch.get_num_threads()
    if dev.type != "cpu" or n_threads < 2:
        threads = "parallel"
    auto = threads is None
    if auto:
        threads = "parallel" if cores_free() else "serial"
    split = b == 1 and dev.type == "cpu" and n_threads >= 2 and threads != "serial"
    with one_thread(threads == "serial"):
        return _greedy(model, memory, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id,
                       min_new_tokens, split, watch=auto and threads != "serial", warpers=warpers, past=past,
                       streamer=streamer, keep=keep, stopping=stopping_criteria)


class KeptCache:
    """The fast loop's state after a call, for a conversation's next turn (`mmgpt.chat`): the
    self-attention keys and values of the first `length` tokens, (L, 2, 1, H, T, hd), and the
    cross-attention keys and values of its images. `get_seq_length` / `crop` as transformers' caches."""

    def __init__(self, kv: torch.Tensor, length: int, cross_kv: dict):
        self.kv, self.length, self.cross_kv = kv, length, cross_kv

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` tokens (a negative count: drop that many), as DynamicCache.crop."""
        self.length = min(self.length, max_length if max_length >= 0 else self.length + max_length)


def _cross_kv(plan, memory: torch.Tensor) -> dict:
    """Cross-attention keys and values of memory (B, K, D), once per call, every cross layer's in one
    product (`DecoderPlan.cross_kv`): per cross layer (keys (B*H, K, hd), a view of the transposed keys;
    values (B*H, K, hd); keys transposed (B*H, hd, K), the layout both steps read)."""
    b, n_mem, d = memory.shape
    n_head = plan.n_head
    hd = d // n_head
    kv = plan.cross_kv(memory.reshape(-1, d)).view(b, n_mem, len(plan.cross_layers), 2, n_head, hd)
    cross_kv = {}
    for j, i in enumerate(plan.cross_layers):
        km_t = kv[:, :, j, 0].permute(0, 2, 3, 1).reshape(b * n_head, hd, n_mem)  # (B*H, hd, K)
        vm = kv[:, :, j, 1].transpose(1, 2).reshape(b * n_head, n_mem, hd)  # (B*H, K, hd)
        cross_kv[i] = (km_t.transpose(1, 2), vm, km_t)
    return cross_kv


def _greedy(model, memory, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id,
            min_new_tokens, split: bool, watch: bool, warpers=None, past=None, streamer=None, keep=False,
            stopping=None):
    tr = model.decoder.transformer
    b, p = input_ids.shape
    p0 = 0 if past is None else past.length  # tokens whose keys and values are kept
    if past is not None and (b != 1 or not bool(attention_mask.all())):
        raise ValueError("a kept past takes one row without padding")
    dev = input_ids.device
    plan = plan_for(model, split, rows=b > 1)
    n_head, d = plan.n_head, plan.d
    blocks = plan.blocks
    hd = d // n_head
    total = p0 + p + max_new_tokens
    dtype = tr.wte.weight.dtype
    kv_cache = torch.zeros(len(blocks), 2, b, n_head, total, hd, dtype=dtype, device=dev)  # (L, 2, B, H, T, hd)
    if p0:
        kv_cache[..., :p0, :] = past.kv[..., :p0, :]
    k_all, v_all = kv_cache[:, 0], kv_cache[:, 1]  # (L, B, H, T, hd) each
    # Per layer, (B*H, T, hd) views of the cache for the one-token steps' batched products.
    k_rows = [k_all[i].view(b * n_head, total, hd) for i in range(len(blocks))]
    v_rows = [v_all[i].view(b * n_head, total, hd) for i in range(len(blocks))]
    n_mem = memory.shape[1]
    cross_kv = past.cross_kv if past is not None else _cross_kv(plan, memory)
    mask = torch.ones(b, total, dtype=torch.long, device=dev)
    mask[:, p0:p0 + p] = attention_mask  # generated positions are always attended to, as in generate()
    padded = not bool(attention_mask.all())
    pos_all = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    neg = torch.finfo(dtype).min
    wte, ln_f = tr.wte.weight, layer_norm(tr.ln_f)
    pos_emb = tr.wpe.weight[pos_all]  # (B, T, D)
    # Additive key mask of the padding, (B, T); None without padding.
    pad_bias = torch.zeros(b, total, dtype=dtype, device=dev).masked_fill_(mask == 0, neg) if padded else None
    c_step = None
    if dev.type == "cpu" and dtype == torch.float32:
        c_step = _c_step(plan, model, b, total, kv_cache, cross_kv, pad_bias, n_mem)
    # The torch step's additive key mask, (B*H, 1, T) (a broadcast zero without padding).
    no_bias = key_bias = torch.zeros(1, 1, 1, dtype=dtype, device=dev)
    if c_step is None and padded:
        key_bias = pad_bias[:, None, None].expand(b, n_head, 1, total).reshape(b * n_head, 1, total)

    def attend_one(q, k_t, v, bias, scale):
        """One query per row: q (B*H, 1, hd), k_t (B*H, hd, T), v (B*H, T, hd) -> (B, D). Two
        batched products and a softmax; SDPA's CPU kernel costs ~5x that for one query (module doc)."""
        w = torch.baddbmm(bias, q, k_t, alpha=scale).softmax(-1)  # (B*H, 1, T)
        return torch.bmm(w, v).view(b, d)

    def prompt_step(ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        end = p0 + t  # the prompt's tokens follow the kept ones
        h = (wte[ids] + pos_emb[:, p0:end]).view(b * t, d)  # (B*t, D)
        attn_mask = None
        if padded or t > 1:
            q_pos = torch.arange(p0, end, device=dev).view(-1, 1)
            k_pos = torch.arange(end, device=dev).view(1, -1)
            allowed = (q_pos >= k_pos).unsqueeze(0) & mask[:, None, :end].bool()  # (B, t, end)
            attn_mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(~allowed, neg).unsqueeze(1)
        for i, blk in enumerate(plan.blocks):
            q, k, v = blk["qkv"](blk["ln_1"](h)).split(d, dim=1)  # (B*t, D) each
            k_all[i, :, :, p0:end] = heads(k, b, n_head)
            v_all[i, :, :, p0:end] = heads(v, b, n_head)
            o = F.scaled_dot_product_attention(heads(q, b, n_head), k_all[i, :, :, :end], v_all[i, :, :, :end],
                                               attn_mask=attn_mask, scale=blk["scale"])  # (B, H, t, hd)
            h = h + blk["proj"](o.transpose(1, 2).reshape(b * t, d))
            c = blk["cross"]
            if c is not None:
                qc = heads(c["q"](c["ln"](h)), b, n_head)  # (B, H, t, hd)
                kc, vc = (x.view(b, n_head, n_mem, hd) for x in cross_kv[i][:2])
                o = F.scaled_dot_product_attention(qc, kc, vc, scale=c["scale"])  # (B, H, t, hd)
                h = h + c["proj"](o.transpose(1, 2).reshape(b * t, d))
            h = h + blk["fc_proj"](blk["fc_act"](blk["ln_2"](h)))
        return plan.lm_head(ln_f(h.view(b, t, d)[:, -1]))  # (B, V)

    def one_token_step(ids: torch.Tensor, pos: int, blocks: list[dict], lm_head) -> torch.Tensor:
        """ids (B,) at position `pos` -> logits (B, V); keys and values up to pos + 1."""
        end = pos + 1
        bias = key_bias[..., :end] if padded else key_bias  # (B*H, 1, end) or broadcast zero
        h = wte[ids].add_(pos_emb[:, pos])  # (B, D)
        for i, blk in enumerate(blocks):
            qkv = blk["qkv"](blk["ln_1"](h))  # (B, 3D)
            kv_cache[i, :, :, :, pos] = qkv[:, d:].view(b, 2, n_head, hd).transpose(0, 1)
            q = qkv[:, :d].reshape(b * n_head, 1, hd)
            o = attend_one(q, k_rows[i][:, :end].transpose(1, 2), v_rows[i][:, :end], bias, blk["scale"])  # (B, D)
            h.add_(blk["proj"](o))
            c = blk["cross"]
            if c is not None:
                qc = c["q"](c["ln"](h)).view(b * n_head, 1, hd)
                _, vm, km_t = cross_kv[i]
                h.add_(c["proj"](attend_one(qc, km_t, vm, no_bias, c["scale"])))
            h.add_(blk["fc_proj"](blk["fc_act"](blk["ln_2"](h))))
        return lm_head(ln_f(h))  # (B, V)

    def step(nxt: torch.Tensor, pos: int, serial: bool) -> torch.Tensor:
        if c_step is not None:
            return c_step(wte[nxt].add_(pos_emb[:, pos]), pos)
        return one_token_step(nxt, pos, *((plan.blocks, plan.lm_head) if serial
                                          else (plan.one_row, plan.lm_head_one_row)))

    out = torch.empty(b, total, dtype=input_ids.dtype, device=dev)
    out[:, :p] = input_ids
    if streamer is not None:
        streamer.put(input_ids.cpu())
    # A one-token prompt (a caption's BOS) is one step: the C step where it runs.
    first = c_step(wte[input_ids[:, 0]] + pos_emb[:, p0], p0) if c_step is not None and p == 1 \
        else prompt_step(input_ids)
    n = _token_loop(first, lambda nxt, pos, serial: step(nxt, p0 + pos, serial), out, p, max_new_tokens,
                    min_new_tokens, eos_token_id, pad_token_id, warpers, watch,
                    model.__dict__["_fastgen_plans"].serial_step, neg, streamer, stopping)
    if streamer is not None:
        streamer.end()
    if keep:  # every token but the last has its keys and values in the cache
        return out[:, : p + n + 1], KeptCache(kv_cache, p0 + p + n, cross_kv)
    return out[:, : p + n + 1]


def _token_loop(logits, step, out, p: int, max_new_tokens: int, min_new_tokens: int, eos_token_id, pad_token_id,
                warpers, watch: bool, timings: dict, neg: float, streamer=None, stopping=None) -> int:
    """Choose each token from the last logits (greedy, or sampled through `warpers`), write it into
    `out` at p + n, and run `step` for the next logits, until max_new_tokens or every row ended;
    returns the index n of the last token written. On a watched call a step that takes 3x the call's
    fastest, or 1.5x the fastest one-thread step seen (`timings`), moves the rest to one thread."""
    b = out.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=out.device)
    n, fastest = 0, float("inf")
    serial = torch.get_num_threads() == 1
    for n in range(max_new_tokens):
        if eos_token_id is not None and n < min_new_tokens:
            logits[:, eos_token_id] = neg
        if warpers is None:
            nxt = logits.argmax(-1)  # (B,)
        else:  # GenerationMixin._sample: warp, softmax, one multinomial draw per row
            scores = warpers(out[:, : p + n], logits)
            nxt = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)  # (B,)
        if eos_token_id is not None or stopping is not None:
            nxt = torch.where(done, pad_token_id, nxt)
        out[:, p + n] = nxt
        if streamer is not None:
            streamer.put(nxt.cpu())
        if eos_token_id is not None:
            done |= nxt == eos_token_id
        if stopping is not None:
            done |= torch.as_tensor(stopping(out[:, : p + n + 1], logits), device=done.device).expand(b)
        if (eos_token_id is not None or stopping is not None) and bool(done.all()):
            break
        if n + 1 < max_new_tokens:
            t0 = time.perf_counter()
            logits = step(nxt, p + n, serial)
            took = time.perf_counter() - t0
            if serial:
                timings[b] = min(timings.get(b, took), took)
            elif watch:
                fastest = min(fastest, took)
                if took > 3 * fastest or took > 1.5 * timings.get(b, float("inf")):
                    # another process took a core: waiting on it costs more than one core does
                    torch.set_num_threads(1)  # the caller's one_thread() restores the count
                    serial = True
    return n
