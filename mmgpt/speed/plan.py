"""The decoder's weights laid out for the fast decoding loop (`mmgpt.speed.decode`, whose module doc says
why each layout): per block, norms, products and activation as plain functions on 2-D rows; torch's
products (MKL addmm, halves on two threads, oneDNN with the GELU in its epilogue) or the AVX2 kernels
of `mmgpt.speed.kernels` (fp32 or int8 weights). A plan is made once per version of the weights and kept
on the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmgpt.speed import kernels, quantize


def layer_norm(ln):
    return lambda x: F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def heads(x: torch.Tensor, b: int, n_head: int) -> torch.Tensor:
    # (B*t, D) -> (B, H, t, hd)
    return x.view(b, -1, n_head, x.shape[-1] // n_head).transpose(1, 2)


def linear(weight: torch.Tensor, bias: torch.Tensor | None):
    """y = x @ W + b for 2-D rows x; W (in, out) as transformers' Conv1D stores it. A wide-input W
    (the MLP's c_proj) is read from an (out, in) copy, which MKL streams ~1.5x faster for few rows."""
    if weight.shape[0] > weight.shape[1]:
        weight = weight.detach().t().contiguous().t()  # (in, out) view of an (out, in) copy
    if bias is None:
        return lambda x: torch.mm(x, weight)
    return lambda x: torch.addmm(bias, x, weight)


def onednn_cpu(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None, gelu: str | None = None):
    """The same product through oneDNN on a weight reordered once into its blocked layout, with the
    GELU (`gelu`: its `approximate`) in the matmul's epilogue: for 2-16 rows ~1.5x MKL's addmm, and
    3x for the LM head (module doc)."""
    w = torch.ops.mkldnn._reorder_linear_weight(weight.detach().t().contiguous(), None)  # (out, in), blocked
    b = None if bias is None else bias.detach()
    lp = torch.ops.mkldnn._linear_pointwise
    if gelu is not None:
        return lambda x: lp(x, w, b, "gelu", [], gelu)
    return lambda x: lp(x, w, b, "none", [], "")


def split_linear(weight: torch.Tensor, bias: torch.Tensor | None):
    """The same product for ONE row, as two half-width products that run on two threads.

    weight (in, out) -> (2, in, out/2), or (2, out/2, in) read transposed when in > out; an odd
    `out` gets one zero column, sliced off the result."""
    n_in, n_out = weight.shape
    half = (n_out + 1) // 2
    w = weight.detach()
    b = torch.zeros(n_out, dtype=w.dtype, device=w.device) if bias is None else bias.detach()
    if 2 * half != n_out:
        w = F.pad(w, (0, 1))  # (in, out + 1)
        b = F.pad(b, (0, 1))
    if n_in > n_out:
        w2 = w.t().contiguous().view(2, half, n_in).transpose(1, 2)  # (2, in, out/2), rows of W^T
    else:
        w2 = w.view(n_in, 2, half).permute(1, 0, 2).contiguous()  # (2, in, out/2)
    b2 = b.view(2, 1, half)  # (2, 1, out/2)

    def run(x):  # x (1, in) -> (1, out)
        return torch.baddbmm(b2, x.expand(2, 1, n_in), w2).view(1, 2 * half)[:, :n_out]

    return run


def weight_and_bias(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) a Conv1D computes with: for a peft LoRA layer that is not merged, its base weight
    plus every active adapter's delta (`get_delta_weight`, in the base layer's layout), so that a
    model in LoRA training decodes with its adapters (it ignored them before)."""
    base = getattr(module, "base_layer", None)
    if base is None or not hasattr(module, "get_delta_weight"):
        return module.weight, module.bias
    weight = base.weight
    if not module.merged and not module.disable_adapters:
        for name in module.active_adapters:
            if name in module.lora_A:
                weight = weight + module.get_delta_weight(name)
    return weight, base.bias


def int8_linear(weight: torch.Tensor, bias: torch.Tensor | None):
    """The product on int8 weights (one scale per output column) through mmgpt.speed.kernels: weight (in, out).
    A model put on int8 (`mmgpt.speed.quantize`) holds weights on the int8 grid already, so this gives back
    its own int8 values."""
    q, scale = quantize.quantize_weight(weight, dim=0)  # (in, out) int8, (out,)
    return kernels.rows_linear_int8(q, scale, bias)


def then(f, g):
    def run(x):
        return g(f(x))

    run.first = f  # the product, for the C step (which applies the GELU itself)
    return run


def tanh_gelu(act) -> int | None:
    """1 for GPT-2's tanh GELU, 0 for the exact (erf) one, None for any other activation (the C step
    then does not run)."""
    if isinstance(act, torch.nn.GELU):
        return {"tanh": 1, "none": 0}.get(act.approximate)
    return {"NewGELUActivation": 1, "GELUTanh": 1, "PytorchGELUTanh": 1, "GELUActivation": 0}.get(type(act).__name__)


def gelu_of(act) -> str | None:
    """`approximate` of an nn.GELU (the model sets GPT-2's tanh GELU as one), else None."""
    return act.approximate if isinstance(act, torch.nn.GELU) else None


class DecoderPlan:
    """Per block: norms, linears and activation as plain functions on 2-D rows, for many rows
    (`blocks`: oneDNN on CPU float32, else addmm) and for one row (`one_row`: split in halves, or
    `blocks` itself); and the LM head, which only ever sees one row per sequence."""

    def __init__(self, model, split: bool, rows: bool, kernel: bool = False, int8: bool = False):
        cfg = model.decoder.config
        self.n_head, self.d = cfg.n_head, cfg.n_embd
        layers = model.decoder.transformer.h
        head = model.decoder.lm_head
        self.kernel = kernel
        self.cross_layers, self.cross_kv = self._cross_kv(model)
        if kernel:  # mmgpt.speed.kernels.rows_linear for one row and for several (module doc)
            lin = int8_linear if int8 else kernels.rows_linear
            self.blocks = [self._block(model, i, blk, lin, False) for i, blk in enumerate(layers)]
            self.one_row = self.blocks
            self.lm_head = self.lm_head_one_row = lin(head.weight.t(), head.bias)  # (D, V)
            self.gelu_tanh = tanh_gelu(layers[0].mlp.act)
            return
        onednn = rows and onednn_cpu(model.decoder.lm_head.weight)
        self.blocks = [self._block(model, i, blk, packed_linear if onednn else linear, onednn)
                       for i, blk in enumerate(layers)]
        self.one_row = self.blocks
        if split:
            self.one_row = [self._block(model, i, blk, split_linear, False) for i, blk in enumerate(layers)]
        # lm_head.weight (V, D) is tied to wte; a (D, V) copy streams ~2x faster per step (module doc).
        w_head = head.weight.detach().t().contiguous()  # (D, V)
        self.lm_head = (packed_linear if onednn else linear)(w_head, head.bias)
        self.lm_head_one_row = split_linear(w_head, head.bias) if split else self.lm_head

    @staticmethod
    def _cross_kv(model):
        """(the cross-attention layers' indices, one product memory (B*K, D) -> (B*K, 2D * layers)): every
        cross layer's keys and values in one matmul, through oneDNN on a reordered weight where it runs
        (~1.3x MKL's three addmm for a batch of 16 images)."""
        layers = model.decoder.transformer.h
        idx = [i for i in range(len(layers)) if i >= model.k]
        if not idx:
            return idx, None
        wbs = [weight_and_bias(layers[i].crossattention.c_attn) for i in idx]  # (D, 2D) each, Conv1D layout
        w = torch.cat([wb[0].detach() for wb in wbs], dim=1)  # (D, 2D * n)
        b = None if any(wb[1] is None for wb in wbs) else torch.cat([wb[1].detach() for wb in wbs])
        return idx, (packed_linear if onednn_cpu(w) else linear)(w, b)

    @staticmethod
    def _block(model, i: int, blk, lin, fuse_gelu: bool) -> dict:
        a = blk.attn
        gelu = gelu_of(blk.mlp.act) if fuse_gelu else None
        if gelu is not None:
            fc = packed_linear(*weight_and_bias(blk.mlp.c_fc), gelu=gelu)
        else:
            fc = then(lin(*weight_and_bias(blk.mlp.c_fc)), blk.mlp.act)
        p = {"ln_1": layer_norm(blk.ln_1), "qkv": lin(*weight_and_bias(a.c_attn)), "proj": lin(*weight_and_bias(a.c_proj)),
             "scale": a.scaling, "ln_2": layer_norm(blk.ln_2), "fc_act": fc, "fc_proj": lin(*weight_and_bias(blk.mlp.c_proj)),
             "cross": None, "module": blk}
        p["fc"] = getattr(fc, "first", None)  # the product before the GELU
        if i >= model.k:
            c = blk.crossattention
            p["cross"] = {"ln": layer_norm(blk.ln_cross_attn), "q": lin(*weight_and_bias(c.q_attn)), "proj": lin(*weight_and_bias(c.c_proj)),
                          "scale": c.scaling}
        return p


class Plans:
    """The plans made for one version of the decoder's weights, kept on the model; a copied or
    pickled model starts without them."""

    def __init__(self):
        self.key, self.by_split = None, {}
        self.serial_step: dict[int, float] = {}  # rows -> fastest one-thread one-token step seen (s)

    def __getstate__(self) -> dict:
        return {"key": None, "by_split": {}, "serial_step": {}}


def plan_for(model, split: bool, rows: bool) -> DecoderPlan:
    """The model's cached plan, rebuilt when a decoder parameter was changed or replaced."""
    key = tuple((p.data_ptr(), p._version) for p in model.decoder.parameters())
    plans = model.__dict__.setdefault("_fastgen_plans", Plans())
    if plans.key != key:
        plans.key, plans.by_split = key, {}
    w = model.decoder.lm_head.weight
    kernel = (w.device.type == "cpu" and w.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
              and kernels.available())
    # int8 weights need the kernel; without it the model's dequantized fp32 weights give the same tokens
    int8 = kernel and quantize.mode_of(model) == "int8"
    if kernel:
        split = rows = False  # one plan serves every batch size
    if (split, rows, kernel, int8) not in plans.by_split:
        plans.by_split[split, rows, kernel, int8] = DecoderPlan(model, split, rows, kernel, int8)
    return plans.by_split[split, rows, kernel, int8]
