"""Export an mmgpt model (cross-attention fusion) to ONNX in the encoder-decoder layout of optimum /
transformers.js for vision-to-text models:

    DIR/onnx/encoder_model.onnx          pixel_values (B, 3, S, S) -> last_hidden_state (B, K, D): the
                                         memory the decoder cross-attends to, one image per text row (the
                                         adapter output, plus the first image slot's code where the model
                                         has them; conversations over several images are not exported)
    DIR/onnx/decoder_model.onnx          first step: input_ids (B, T), attention_mask (B, T),
                                         encoder_hidden_states (B, K, D) -> logits (B, T, V) and
                                         present.{i}.decoder.key/value (B, H, T, hd),
                                         present.{i}.encoder.key/value (B, H, K, hd)
    DIR/onnx/decoder_with_past_model.onnx  later steps: input_ids (B, 1), attention_mask (B, P + 1),
                                         past_key_values.{i}.decoder/encoder.key/value
                                         -> logits (B, 1, V), present.{i}.decoder.key/value (B, H, P + 1, hd)
    DIR/onnx/decoder_model_merged.onnx   both in one graph (what transformers.js loads): every input of the
                                         two plus use_cache_branch (bool [1]), an `If` between them
                                         (`merge_decoders`, as optimum's merger; weights stored once)
    DIR/config.json, generation_config.json, tokenizer files, mmgpt_processor.json (the processor)

The graphs are written with torch's TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`), opset
17. The decoder step is written out here over the model's own GPT-2 modules (attention spelled out as
matmul + softmax, which every runtime has), so the graphs carry the cache as plain tensors.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

OPSET = 17
ONNX_FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")
MERGED_FILE = "decoder_model_merged.onnx"


class ExportError(ValueError):
    """A model this exporter cannot write (one line, says why)."""


def _heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, n_head, d // n_head).transpose(1, 2)  # (B, H, T, hd)


def _attend(q, k, v, scale: float, mask=None) -> torch.Tensor:
    """q (B, H, T, hd), k/v (B, H, S, hd), mask additive (B, 1, T, S) -> (B, T, H*hd)."""
    w = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, T, S)
    if mask is not None:
        w = w + mask
    out = torch.matmul(torch.softmax(w, dim=-1), v)  # (B, H, T, hd)
    b, h, t, hd = out.shape
    return out.transpose(1, 2).reshape(b, t, h * hd)


def image_memory(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, K, D): what generate() reads for one image per text row: the adapter's tokens, plus the first
    image slot's learned code where the model has codes (config.max_images > 1)."""
    if hasattr(model, "memory_from_pixels"):
        return model.memory_from_pixels(pixel_values, fast=False)[0]
    return model.encode_image(pixel_values).tokens


class EncoderGraph(nn.Module):
    """pixel_values -> the cross-attention memory of one image per row (`image_memory`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return image_memory(self.model, pixel_values)  # (B, K, D)


class DecoderGraph(nn.Module):
    """One decoder call over explicit cache tensors: without past (the prompt, cross-attention keys and
    values computed from encoder_hidden_states) or with past (one token; every key and value given)."""

    def __init__(self, model, with_past: bool):
        super().__init__()
        self.model, self.with_past = model, with_past
        self.tr = model.decoder.transformer
        self.lm_head = model.decoder.lm_head
        self.n_head = model.decoder.config.n_head
        self.cross = [i >= model.k for i in range(len(self.tr.h))]

    def forward(self, input_ids, attention_mask, *rest):
        # rest: encoder_hidden_states (no past), or per layer (dec k, dec v[, enc k, enc v]) (with past)
        t = input_ids.shape[1]
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -t:]  # (B, T), left padding as in the model
        h = self.tr.wte(input_ids) + self.tr.wpe(pos)  # (B, T, D)
        s = attention_mask.shape[1]  # past + T
        q_pos = torch.arange(t, device=h.device).view(-1, 1) + (s - t)  # (T, 1)
        k_pos = torch.arange(s, device=h.device).view(1, -1)  # (1, S)
        allowed = (k_pos <= q_pos).unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # (B, T, S)
        mask = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device)
        mask = mask.masked_fill(~allowed, torch.finfo(h.dtype).min).unsqueeze(1)  # (B, 1, T, S)
        presents = []
        j = 0
        for i, blk in enumerate(self.tr.h):
            a = blk.attn
            q, k, v = a.c_attn(blk.ln_1(h)).split(a.split_size, dim=2)  # (B, T, D) each
            q, k, v = _heads(q, self.n_head), _heads(k, self.n_head), _heads(v, self.n_head)
            if self.with_past:
                k = torch.cat([rest[j], k], dim=2)  # (B, H, P + T, hd)
                v = torch.cat([rest[j + 1], v], dim=2)
                j += 2
            presents += [k, v]
            h = h + a.c_proj(_attend(q, k, v, a.scaling, mask))
            if self.cross[i]:
                c = blk.crossattention
                cq = _heads(c.q_attn(blk.ln_cross_attn(h)), self.n_head)  # (B, H, T, hd)
                if self.with_past:
                    ek, ev = rest[j], rest[j + 1]
                    j += 2
                else:
                    ek, ev = c.c_attn(rest[0]).split(c.split_size, dim=2)  # (B, K, D) each
                    ek, ev = _heads(ek, self.n_head), _heads(ev, self.n_head)  # (B, H, K, hd)
                presents += [ek, ev]
                h = h + c.c_proj(_attend(cq, ek, ev, c.scaling))
            h = h + blk.mlp(blk.ln_2(h))
        logits = self.lm_head(self.tr.ln_f(h))  # (B, T, V)
        return (logits, *presents)


def cache_names(model, kind: str) -> list[str]:
    """`past_key_values.{i}.decoder.key`-style names (kind "past_key_values" or "present"), in graph order."""
    names = []
    for i in range(len(model.decoder.transformer.h)):
        names += [f"{kind}.{i}.decoder.key", f"{kind}.{i}.decoder.value"]
        if i >= model.k:
            names += [f"{kind}.{i}.encoder.key", f"{kind}.{i}.encoder.value"]
    return names


def check_exportable(model) -> None:
    if model.config.fusion != "cross_attention":
        raise ExportError(f"fusion={model.config.fusion!r}: the ONNX export covers cross-attention models (GPT-2 "
                          "decoder); prefix-fusion models are not supported yet")
    if any("lora_" in n for n, _ in model.named_parameters()):
        raise ExportError("the model holds unmerged LoRA layers: export the folder `mmgpt train` wrote (merged)")


def export_onnx(model, processor, out_dir, opset: int = OPSET) -> list[Path]:
    """Write the ONNX graphs, configs and tokenizer of `model` into `out_dir`; returns the ONNX files."""
    check_exportable(model)
    model = model.float().eval()
    out = Path(out_dir)
    onnx_dir = out / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.decoder.config
    n_head, d = cfg.n_head, cfg.n_embd
    hd = d // n_head
    s = processor.image_size
    pixels = torch.randn(2, 3, s, s)
    with torch.no_grad():
        memory = image_memory(model, pixels)  # (2, K, D)
    k_img = memory.shape[1]
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    past_names, present_names = cache_names(model, "past_key_values"), cache_names(model, "present")
    batch = {0: "batch_size"}
    present_axes = {n: {0: "batch_size", 2: "encoder_sequence_length" if ".encoder." in n else
                        "past_sequence_length + sequence_length"} for n in present_names}
    past_axes = {n: {0: "batch_size", 2: "encoder_sequence_length" if ".encoder." in n else "past_sequence_length"}
                 for n in past_names}
    past = [torch.randn(2, n_head, k_img if ".encoder." in n else 3, hd) for n in past_names]
    jobs = [
        (EncoderGraph(model), (pixels,), ["pixel_values"], ["last_hidden_state"],
         {"pixel_values": batch, "last_hidden_state": {0: "batch_size", 1: "encoder_sequence_length"}}),
        (DecoderGraph(model, with_past=False), (ids, mask, memory), ["input_ids", "attention_mask",
         "encoder_hidden_states"], ["logits", *present_names],
         {"input_ids": {0: "batch_size", 1: "sequence_length"}, "attention_mask": {0: "batch_size", 1: "sequence_length"},
          "encoder_hidden_states": {0: "batch_size", 1: "encoder_sequence_length"},
          "logits": {0: "batch_size", 1: "sequence_length"}, **present_axes}),
        (DecoderGraph(model, with_past=True), (ids[:, -1:], torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                                               *past),
         ["input_ids", "attention_mask", *past_names], ["logits", *present_names],
         {"input_ids": {0: "batch_size"}, "attention_mask": {0: "batch_size", 1: "past_sequence_length + 1"},
          "logits": {0: "batch_size"}, **past_axes, **present_axes}),
    ]
    files = []
    for (graph, args, inputs, outputs, axes), name in zip(jobs, ONNX_FILES):
        path = onnx_dir / name
        graph.eval()  # a new wrapper is in training mode, and torch.onnx.export puts the mode it found back (on
        # the wrapped model too): the model was left training, dropout on and the fast decoding path off
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shape checks in ViT (fixed input size)
            torch.onnx.export(graph, args, str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
        files.append(path)
    files.append(merge_decoders(files[1], files[2], onnx_dir / MERGED_FILE))
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "onnx" / "mmgpt_onnx.json").write_text(json.dumps({
        "layout": "encoder + decoder_model_merged (and the decoder + decoder_with_past pair it merges)", "opset": opset, "num_layers": len(model.decoder.transformer.h),
        "cross_attention_layers": [i for i in range(len(model.decoder.transformer.h)) if i >= model.k],
        "num_heads": n_head, "head_dim": hd, "exporter": "torch.onnx.export (TorchScript), torch " + torch.__version__,
    }, indent=2) + "\n")
    return files


def merge_decoders(no_past_path, with_past_path, out_path) -> Path:
    """One graph for both steps, as optimum's `decoder_model_merged.onnx`: an `If` on the input
    `use_cache_branch` (bool [1]) runs the with-past graph (true) or the first-step graph (false). Both
    branches read the outer graph's inputs by name; the weights are stored once in the outer graph (the two
    exports hold the same tensors, matched by content). A runtime feeds every input at every step: on the
    first step the past_key_values as empty (B, H, 0, hd) tensors, on later steps encoder_hidden_states as it
    was (unread)."""
    import hashlib

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m0, m1 = onnx.load(str(no_past_path)), onnx.load(str(with_past_path))
    outer: dict[tuple, str] = {}  # (dtype, dims, content hash) -> outer initializer name
    inits: list = []

    def branch(model, prefix: str):
        g = model.graph
        rename = {}
        for init in g.initializer:
            key = (init.data_type, tuple(init.dims), hashlib.sha1(numpy_helper.to_array(init).tobytes()).hexdigest())
            original = init.name
            if key not in outer:
                outer[key] = f"w{len(inits)}.{original}"
                kept = onnx.TensorProto()
                kept.CopyFrom(init)
                kept.name = outer[key]
                inits.append(kept)
            rename[original] = outer[key]
        for node in g.node:  # every value a node makes gets the branch's prefix (names must not repeat)
            for o in node.output:
                if o:
                    rename.setdefault(o, prefix + o)
        nodes = []
        for node in g.node:
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.name = prefix + node.name
            new.input[:] = [rename.get(i, i) for i in node.input]
            new.output[:] = [rename.get(o, o) for o in node.output]
            nodes.append(new)
        outputs = []
        for o in g.output:
            out = onnx.ValueInfoProto()
            out.CopyFrom(o)
            out.name = rename.get(o.name, o.name)
            outputs.append(out)
        return helper.make_graph(nodes, prefix.strip("/"), [], outputs)

    then_branch = branch(m1, "with_past/")
    else_branch = branch(m0, "no_past/")
    names1 = [o.name for o in m1.graph.output]
    if names1 != [o.name for o in m0.graph.output]:
        raise ExportError("the two decoder graphs have different outputs; cannot merge them")
    inputs = list(m0.graph.input) + [i for i in m1.graph.input if i.name not in {x.name for x in m0.graph.input}]
    inputs.append(helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]))
    outputs = []
    for o in m0.graph.output:  # the first step's shapes, with the sequence axes named for both branches
        out = onnx.ValueInfoProto()
        out.CopyFrom(o)
        dims = out.type.tensor_type.shape.dim
        if o.name == "logits":
            dims[1].dim_param = "sequence_length"
        elif ".decoder." in o.name:
            dims[2].dim_param = "past_sequence_length + sequence_length"
        outputs.append(out)
    node = helper.make_node("If", ["use_cache_branch"], names1, name="optimum::if", then_branch=then_branch,
                            else_branch=else_branch)
    graph = helper.make_graph([node], "decoder_model_merged", inputs, outputs, initializer=inits)
    merged = helper.make_model(graph, opset_imports=m0.opset_import, producer_name="mmgpt")
    merged.ir_version = m0.ir_version
    onnx.checker.check_model(merged)
    onnx.save(merged, str(out_path))
    return Path(out_path)


def parity(model, processor, out_dir, rows: int = 3) -> float:
    """Largest |logit difference| between onnxruntime on the export in `out_dir` and PyTorch on `model`,
    over the encoder, a first decoder step on left-padded prompts (caption and questions) and one cached step,
    with the merged decoder and with the pair."""
    import numpy as np

    from mmgpt.onnx_runner import OnnxVisionLanguage

    model = model.float().eval()
    g = torch.Generator().manual_seed(0)
    s = processor.image_size
    pixels = torch.rand(rows, 3, s, s, generator=g) * 2 - 1  # (B, 3, S, S)
    tasks = ["caption"] + ["vqa"] * (rows - 1)
    prompts = [""] + ["what color is the circle?", "how many objects are there in this picture?"][: rows - 1]
    batch = processor.batch_prompts(tasks, prompts[:rows] + [""] * (rows - len(prompts)))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    nxt = torch.randint(0, model.config.text_config.vocab_size, (rows, 1), generator=g)
    with torch.no_grad():
        memory = image_memory(model, pixels)  # (B, K, D)
        ref = model(input_ids=ids, attention_mask=mask, encoder_hidden_states=memory).logits  # (B, T, V)
        mask2 = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        ref2 = model(input_ids=torch.cat([ids, nxt], 1), attention_mask=mask2, encoder_hidden_states=memory).logits
    real = mask.bool().numpy()  # padding positions' logits are never read
    worst = 0.0
    for merged in (True, False):  # decoder_model_merged.onnx, then the pair it merges
        ox = OnnxVisionLanguage(out_dir, merged=merged)
        o_mem = ox.encode(pixels.numpy())
        logits, cache = ox.first_step(ids.numpy(), mask.numpy(), o_mem)
        logits2, _ = ox.next_step(nxt.numpy(), mask2.numpy(), cache)
        worst = max(worst, float(np.abs(o_mem - memory.numpy()).max()), float(np.abs(logits - ref.numpy())[real].max()),
                    float(np.abs(logits2[:, -1] - ref2[:, -1].numpy()).max()))
    return worst


__all__ = ["MERGED_FILE", "ONNX_FILES", "ExportError", "cache_names", "export_onnx", "merge_decoders", "parity"]
