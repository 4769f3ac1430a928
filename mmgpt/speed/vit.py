"""An inference forward for Hugging Face's ViTModel: the same weights and the same math, fewer passes
over memory.

HF's layer runs q, k and v as three linears, adds each bias by copying it into the output before
the matmul (a full pass over a (B*N, 4D) tensor for the MLP), runs the exact-erf GELU and each
residual add as passes of their own. Here, for CPU float32 without gradients, every linear is one
oneDNN call (``torch.ops.mkldnn._linear_pointwise``) on weights reordered once into its blocked
layout: q, k and v in one matmul, the bias, the erf GELU (``algorithm="none"``) and the residual add
in the matmul's epilogue; the attention, where the CPU has AVX-512, is `mmgpt.speed.kernels.vit_attention`
(reads the QKV product as it is, writes the heads side by side for the output projection: ~1.2x SDPA
at 16 x 197 tokens, no transposed copies), else SDPA. Elsewhere (GPU, other dtypes, no oneDNN) the same
fused-QKV forward runs on plain ``F.linear``. The results match HF's forward to float32 rounding (tested
against it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .threads import cores_free, one_thread


def encode(encoder, pixel_values: Tensor):
    """`encoder(pixel_values)` for inference through the fused forward: an `EncoderOutput` with the same
    features to float32 rounding, or None where it does not apply (training, gradients on, not a ViT
    encoder of `encoders.hf`); the caller then runs the encoder's own forward. The fused weights are
    kept on the encoder (`encoder._fast`)."""
    if encoder.training or torch.is_grad_enabled() or getattr(encoder, "backend", None) != "vit" \
            or not supports(encoder.model):
        return None
    from encoders.base import EncoderOutput

    if getattr(encoder, "_fast", None) is None:
        encoder._fast = FastViT(encoder.model)
    tokens = encoder._fast(pixel_values)  # (B, N, D)
    pooled = encoder._mean_pool(tokens) if getattr(encoder, "pool", None) == "mean" else tokens[:, 0]  # (B, D)
    return EncoderOutput(patch_tokens=tokens, pooled=pooled)


def infer(encoder, pixel_values: Tensor):
    """The encoder's output for inference: the fused forward where it applies, else `encoder(pixel_values)`."""
    out = encode(encoder, pixel_values)
    return encoder(pixel_values) if out is None else out


def supports(model) -> bool:
    """A ViTModel this forward reproduces: erf GELU MLP, q/k/v/o projections with biases."""
    cfg = model.config
    layers = getattr(model, "layers", None)
    if cfg.hidden_act != "gelu" or layers is None or len(layers) == 0 or not getattr(cfg, "qkv_bias", True):
        return False
    a = layers[0].attention
    return all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))


def _use_onednn(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()


class FastViT:
    """Holds the fused (and, on CPU, oneDNN-reordered) weights of one ViTModel; rebuilt when any of
    its parameters changes (a training step, a ``load_state_dict``)."""

    def __init__(self, model):
        self.model = model
        self.key = None
        self.layers: list[dict] = []

    def __getstate__(self) -> dict:  # a copied or pickled encoder rebuilds its own (oneDNN tensors don't pickle)
        return {"model": self.model, "key": None, "layers": []}

    def _params(self):
        for layer in self.model.layers:
            yield from layer.parameters()

    def _refresh(self, onednn: bool) -> None:
        key = (onednn, tuple((p.data_ptr(), p._version) for p in self._params()))
        if key == self.key:
            return
        pack = torch.ops.mkldnn._reorder_linear_weight if onednn else (lambda w: w)
        self.layers = []
        for layer in self.model.layers:
            a, mlp = layer.attention, layer.mlp
            w_qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])  # (3D, D)
            b_qkv = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])  # (3D,)
            self.layers.append({
                "ln_1": layer.layernorm_before, "ln_2": layer.layernorm_after,
                "qkv": (pack(w_qkv.detach()), b_qkv.detach()),
                "o": (pack(a.o_proj.weight.detach()), a.o_proj.bias.detach()),
                "fc1": (pack(mlp.fc1.weight.detach()), mlp.fc1.bias.detach()),
                "fc2": (pack(mlp.fc2.weight.detach()), mlp.fc2.bias.detach()),
                "heads": a.num_attention_heads, "scale": a.scaling,
            })
        self.key = key

    @torch.no_grad()
    def __call__(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        """pixel_values (B, 3, H, W) -> last_hidden_state (B, N, D), as ViTModel returns it.
        On a CPU whose other cores are busy, on one thread (mmgpt.speed.threads)."""
        with one_thread(pixel_values.device.type == "cpu" and not cores_free()):
            return self._forward(pixel_values, interpolate_pos_encoding)

    def _forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool) -> Tensor:
        vit = self.model
        h = vit.embeddings(pixel_values.to(vit.embeddings.patch_embeddings.projection.weight.dtype),
                           interpolate_pos_encoding=interpolate_pos_encoding)  # (B, N, D)
        onednn = _use_onednn(h)
        self._refresh(onednn)
        b, n, d = h.shape
        h = h.reshape(b * n, d)  # (B*N, D)
        if onednn:
            lp = torch.ops.mkldnn._linear_pointwise
            linear = lambda x, wb: lp(x, wb[0], wb[1], "none", [], "")
            linear_gelu = lambda x, wb: lp(x, wb[0], wb[1], "gelu", [], "none")  # erf GELU
            linear_add = lambda x, wb, res: lp.binary(x, res, wb[0], wb[1], "add")
        else:
            linear = lambda x, wb: F.linear(x, *wb)
            linear_gelu = lambda x, wb: F.gelu(F.linear(x, *wb))
            linear_add = lambda x, wb, res: torch.addmm(res, x, wb[0].t()).add_(wb[1])
        for p in self.layers:
            ln = p["ln_1"]
            x = F.layer_norm(h, (d,), ln.weight, ln.bias, ln.eps)
            heads = p["heads"]
            qkv = linear(x, p["qkv"])  # (B*N, 3D)
            o = kernels.vit_attention(qkv, b, n, heads, p["scale"]) if onednn else None  # (B*N, D), AVX-512
            if o is None:  # (B*N, 3D) -> 3 x (B, H, N, hd), views into the one matmul's output
                q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
                o = F.scaled_dot_product_attention(q, k, v, scale=p["scale"]).transpose(1, 2).reshape(b * n, d)
            h = linear_add(o, p["o"], h)  # (B*N, D)
            ln = p["ln_2"]
            x = F.layer_norm(h, (d,), ln.weight, ln.bias, ln.eps)
            h = linear_add(linear_gelu(x, p["fc1"]), p["fc2"], h)  # (B*N, D)
        return vit.layernorm(h.view(b, n, d))  # (B, N, D)
