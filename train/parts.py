"""The trainable parts: optimizer groups and schedule, freezing, LoRA, and the frozen-encoder feature cache."""

from __future__ import annotations

import copy
import math

import torch

from train.config import TrainConfig


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """Optimizer groups: weight decay on 2-D weights only (nanoGPT), one learning rate per part; with
    `optim.name: muon` the hidden matrices form their own groups (`muon=True`)."""
    from train.optim import wants_muon

    o = cfg.optim
    part_lr = {"vision": o.lr_vision, "adapter": o.lr_adapter, "decoder": o.lr_decoder}
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = name.split(".")[0]
        lr = o.lr if part_lr.get(part) is None else part_lr[part]  # an explicit 0 holds the part still
        decay = p.ndim >= 2 and "wpe" not in name and "position" not in name
        muon = o.name == "muon" and wants_muon(name, p)
        if muon and o.muon_lr is not None and lr != 0:
            lr = o.muon_lr
        key = (lr, decay, muon)
        g = groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": o.weight_decay if decay else 0.0})
        if o.name == "muon":
            g["muon"] = muon
        g["params"].append(p)
    return list(groups.values())


def lr_lambda(cfg: TrainConfig, clock=None):
    """Linear warmup, then cosine to min_lr_ratio. `clock()` -> fraction of the time budget used
    (time_schedule): the cosine then runs on whichever of steps and time is further along."""
    warm, total, floor = cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        if clock is not None:
            t = max(t, min(1.0, clock()))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _names_module(name: str, target: str) -> bool:
    """peft's match of a LoRA target: the module's whole name or a dotted suffix of it ("attn.c_proj")."""
    return name == target or name.endswith("." + target)


def apply_freezing_and_lora(model, cfg: TrainConfig):
    if cfg.freeze.vision:
        model.vision.freeze()
    if cfg.freeze.decoder:
        # The decoder's own weights stay; cross-attention (new) keeps learning unless LoRA replaces it.
        for name, p in model.decoder.named_parameters():
            if "crossattention" not in name and "ln_cross_attn" not in name:
                p.requires_grad_(False)
    if cfg.lora.enabled:
        from peft import LoraConfig, inject_adapter_in_model
        from transformers.pytorch_utils import Conv1D

        from train.config import LoraConfig as DefaultLora

        pattern = isinstance(cfg.lora.target_modules, str)  # a regex or "all-linear": peft's to read
        targets = cfg.lora.target_modules if pattern else list(cfg.lora.target_modules)
        if targets == DefaultLora().target_modules:  # not set: the decoder type's own attention projections
            targets = list(model.config.lora_target_modules)
        names = [n for n, _ in model.decoder.named_modules()]
        unknown = [] if pattern else [t for t in targets if not any(_names_module(n, t) for n in names)]
        if unknown:
            from train.config import ConfigError

            linears = sorted({n.rpartition(".")[2] for n, m in model.decoder.named_modules()
                              if isinstance(m, (torch.nn.Linear, Conv1D))})
            raise ConfigError(f"lora.target_modules: {unknown} name no module of this "
                              f"{model.decoder.config.model_type} decoder; its linear layers are {linears}")
        # GPT-2's Conv1D stores its weight as (in, out): peft must transpose it (fan_in_fan_out).
        conv = any(isinstance(m, Conv1D) for n, m in model.decoder.named_modules()
                   if pattern or any(_names_module(n, t) for t in targets))
        lcfg = LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=targets, fan_in_fan_out=conv,
        )
        for p in model.decoder.parameters():
            p.requires_grad_(False)
        inject_adapter_in_model(lcfg, model.decoder)
        for name, p in model.decoder.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
    if cfg.activation_checkpointing:
        model.decoder.activation_checkpointing_enable()
    return model


def merge_lora(model) -> None:
    """Fold LoRA weights into the base layers and drop the LoRA modules (for export)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.decoder.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.decoder.get_submodule(parent_name) if parent_name else model.decoder
            setattr(parent, child, module.get_base_layer())


class FeatureCache:
    """Outputs of a frozen vision tower per image id (CPU memory, up to a size cap)."""

    def __init__(self, max_bytes: float):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.store: dict = {}
        self.hits = self.misses = 0

    def vision_outputs(self, model, pixel_values, image_ids):
        from encoders import EncoderOutput

        if any(i is None for i in image_ids):
            return None
        missing = [j for j, i in enumerate(image_ids) if i not in self.store]
        self.hits += len(image_ids) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            with torch.no_grad():
                out = model.vision(pixel_values[missing])  # patch_tokens (m, N, Dv), pooled (m, Dv)
            for row, j in enumerate(missing):
                pair = (out.patch_tokens[row].detach(), out.pooled[row].detach())
                fresh[image_ids[j]] = pair
                size = pair[0].numel() * pair[0].element_size() + pair[1].numel() * pair[1].element_size()
                if self.bytes + size <= self.max_bytes:
                    self.store[image_ids[j]] = (pair[0].cpu(), pair[1].cpu())
                    self.bytes += size
        dev = pixel_values.device
        pairs = [fresh.get(i) or self.store[i] for i in image_ids]
        return EncoderOutput(
            patch_tokens=torch.stack([p[0].to(dev) for p in pairs]),  # (B_img, N, Dv)
            pooled=torch.stack([p[1].to(dev) for p in pairs]),  # (B_img, Dv)
        )


def export_model(model, processor, path, lora: bool) -> None:
    """save_pretrained with LoRA folded in (on a copy, so training can go on with its adapters)."""
    if lora:
        model = copy.deepcopy(model)
        merge_lora(model)
    model.save_pretrained(path)
    processor.save_pretrained(path)
