"""A Hugging Face model card (README.md) for an exported model folder: the Hub's YAML header (library,
pipeline tag, base models, data sets, `model-index` with the run's evaluation results), how it was trained,
how to use it, and how to upload it.

`mmgpt train` / `mmgpt demo` write one into OUT/model and OUT/best (train/run_outputs.py calls `write_run_cards`).
The training config comes in as a plain dict (train.config.to_dict), so this module needs nothing from train/.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import yaml

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# metric key -> (task type, task name, metric type, metric name), for model-index
METRICS = {
    "caption_exact_match": ("image-to-text", "Image captioning", "exact_match", "Caption exact match"),
    "cider": ("image-to-text", "Image captioning", "cider", "CIDEr"),
    "bleu_4": ("image-to-text", "Image captioning", "bleu", "BLEU-4"),
    "meteor": ("image-to-text", "Image captioning", "meteor", "METEOR"),
    "spice": ("image-to-text", "Image captioning", "spice", "SPICE"),
    "vqa_accuracy": ("visual-question-answering", "Visual question answering", "accuracy", "VQA accuracy"),
    "retrieval_i2t_r1": ("image-text-retrieval", "Image-text retrieval", "recall_at_1", "Image-to-text R@1"),
    "retrieval_t2i_r1": ("image-text-retrieval", "Image-text retrieval", "recall_at_1", "Text-to-image R@1"),
}


# keys of a demo's metrics.json that are about the run, not the model (shown under Training instead)
RUN_FACTS = ("train_seconds", "train_steps", "eval_seconds", "test_images")


def hardware() -> str:
    """The machine the run used, in words: GPUs by name and count, else the CPU and its cores."""
    try:
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            return f"{n} x {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001, S110 - a card is written whatever the driver says: the CPU then
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({cpu}, {os.cpu_count()} cores)"


def _hub_datasets(sources: list[dict]) -> list[str]:
    """Hub names of `format: hf` sources (a local save_to_disk folder is not one)."""
    names = []
    for s in sources:
        name = s.get("name") if s.get("format") in ("hf", "huggingface") else None
        if isinstance(name, str) and HUB_ID.fullmatch(name) and not Path(name).exists() and name not in names:
            names.append(name)
    return names


def _source_text(s: dict) -> str:
    where = s.get("name") or s.get("path") or ""
    extra = ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("format", "name", "path", "columns"))
    return f"`{s.get('format', '?')}` {where}".rstrip() + (f" ({extra})" if extra else "")


def _dataset_label(spec: dict | None) -> tuple[str, str]:
    """(name, type) of the evaluation source for model-index."""
    if not spec:
        return "validation", "custom"
    fmt = spec.get("format", "custom")
    name = spec.get("name") or spec.get("path") or fmt
    split = spec.get("split")
    return (f"{name} ({split})" if split else str(name)), str(spec.get("name") if fmt == "hf" else fmt)


def _model_index(name: str, metrics: dict, dataset: tuple[str, str]) -> list[dict]:
    by_task: dict[str, dict] = {}
    for key, (task_type, task_name, mtype, mname) in METRICS.items():
        value = metrics.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        entry = by_task.setdefault(task_type, {"task": {"type": task_type, "name": task_name},
                                               "dataset": {"name": dataset[0], "type": dataset[1]},
                                               "metrics": []})
        entry["metrics"].append({"type": mtype, "value": round(float(value), 4), "name": mname})
    return [{"name": name, "results": list(by_task.values())}] if by_task else []


def card_text(folder, train_config: dict | None = None, metrics: dict | None = None, metrics_step: int | None = None,
              eval_source: dict | None = None, steps: int | None = None, train_seconds: float | None = None,
              hardware_text: str | None = None, repo_id: str | None = None) -> str:
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    tc = train_config or {}
    name = repo_id or folder.resolve().parent.name + "-" + folder.name
    repo = repo_id or f"your-name/{name.split('/')[-1]}"  # where the upload below puts it
    source = repo_id or str(folder.resolve())  # what the usage snippet loads
    base = [b for b in (cfg.get("vision_pretrained"), cfg.get("text_pretrained"))
            if isinstance(b, str) and HUB_ID.fullmatch(b) and not Path(b).exists()]
    data = tc.get("data") or {}
    sources = list(data.get("train") or [])
    eval_spec = eval_source or data.get("validation")
    text_type = (cfg.get("text") or {}).get("model_type", "gpt2")
    header = {
        "library_name": "mmgpt",
        "pipeline_tag": "image-text-to-text",
        "tags": ["mmgpt", "vision-language", "image-captioning", "visual-question-answering",
                 "image-text-retrieval", "vit", text_type, cfg.get("fusion") or "cross_attention"],
    }
    if base:
        header["base_model"] = base
    hub_sets = _hub_datasets(sources + ([eval_spec] if isinstance(eval_spec, dict) else []))
    if hub_sets:
        header["datasets"] = hub_sets
    index = _model_index(name, metrics or {}, _dataset_label(eval_spec))
    if index:
        header["model-index"] = index
    obj = tc.get("objectives") or {}
    model_cfg = tc.get("model") or {}
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "", f"# {name}", "",
             ("A vision-language model built and trained with mmgpt: a ViT image encoder, "
             f"an `{(cfg.get('adapter') or {}).get('type', 'mlp')}` adapter and a `{text_type}` decoder "
             f"({cfg.get('fusion')} fusion). It captions images, answers questions about them and embeds images "
             "and texts for retrieval (contrastive head)."), "", "## Training", ""]
    facts = [
        ("model preset", model_cfg.get("path") or model_cfg.get("preset")),
        ("pretrained parts", ", ".join(base) or "none (all parts trained from scratch)"),
        ("objectives", (f"contrastive (ITC) weight {obj.get('itc_weight', cfg.get('itc_weight'))}, generative (LM) "
                       f"weight {obj.get('lm_weight', cfg.get('lm_weight'))}")),
        ("training data", "; ".join(_source_text(s) for s in sources) or None),
        ("steps", steps),
        ("batch size", tc.get("batch_size")),
        ("optimizer", (tc.get("optim") or {}).get("name")),
        ("training time", f"{train_seconds / 60:.1f} minutes" if train_seconds is not None else None),
        ("hardware", hardware_text or hardware()),
    ]
    lines += [f"- {k}: {v}" for k, v in facts if v not in (None, "")]
    lines += ["", "## Evaluation", ""]
    shown = {k: v for k, v in (metrics or {}).items()
             if isinstance(v, (int, float)) and "/" not in k and k not in RUN_FACTS}
    if shown:
        where = _dataset_label(eval_spec)[0]
        at = f" at step {metrics_step}" if metrics_step is not None else ""
        lines += [f"Measured by the run on {where}{at}:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {int(v) if k.startswith(('num_', 'bad_')) else round(float(v), 4)} |"
                  for k, v in shown.items()]
    else:
        lines += ["The run measured no evaluation (no validation source)."]
    lines += ["", "## Usage", "", "With mmgpt installed:", "", "```python",
              "from mmgpt import load", "", f'MODEL = "{source}"  # this folder, or its Hub id once uploaded',
              "vl = load(MODEL)",
              'print(vl.caption("photo.png"))', 'print(vl.ask("photo.png", "what color is the circle?"))', "```", "",
              "With transformers' pipeline (`import mmgpt` registers the model type):", "", "```python",
              "import mmgpt  # noqa: F401", "from transformers import pipeline", "",
              f'MODEL = "{source}"', 'pipe = pipeline("image-text-to-text", model=MODEL)',
              'print(pipe("photo.png", text="", max_new_tokens=32)[0]["generated_text"])  # a caption', "```", "",
              "ONNX (onnxruntime, transformers.js): `mmgpt export MODEL --format onnx --out DIR`.", "",
              "## Upload to the Hugging Face Hub", "",
              "With the Hub's own command line (from `huggingface_hub`):", "", "```bash", "hf auth login",
              f"hf upload {repo} {folder} .", "```", "",
              ("or from Python: `huggingface_hub.HfApi().upload_folder(folder_path=..., repo_id=..., "
              "repo_type=\"model\")` (create the repository first with `create_repo`)."), ""]
    return "\n".join(lines)


def write_model_card(folder, **kwargs) -> Path:
    """Write FOLDER/README.md (see `card_text` for the keywords), and the preprocessor_config.json that
    transformers' AutoImageProcessor looks for (mmgpt.hf_interop.write_hub_files); returns the card's path."""
    from mmgpt.hf_interop import write_hub_files

    write_hub_files(folder)
    path = Path(folder) / "README.md"
    path.write_text(card_text(folder, **kwargs), encoding="utf-8")
    return path


def write_run_cards(out_dir, train_config: dict, steps: int, train_seconds: float) -> list[Path]:
    """Cards for the folders a training run exported: OUT/model (with the run's last evaluation) and
    OUT/best (with the evaluation that made it best), reading OUT/metrics.jsonl."""
    out = Path(out_dir)
    evals = []
    log = out / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec.get("eval"), dict):
                evals.append(rec)
    jobs = []
    if (out / "model" / "config.json").is_file():
        last = evals[-1] if evals else {}
        jobs.append((out / "model", {"metrics": last.get("eval"), "metrics_step": last.get("step"), "steps": steps,
                                     "train_seconds": train_seconds}))
    best_file = out / "best" / "best_metric.json"
    if best_file.is_file() and (out / "best" / "config.json").is_file():
        step = json.loads(best_file.read_text()).get("step")
        rec = next((r for r in reversed(evals) if r.get("step") == step), {})
        jobs.append((out / "best", {"metrics": rec.get("eval"), "metrics_step": step, "steps": step}))
    written = []
    for folder, kw in jobs:
        try:  # the model is saved already: a card that cannot be written is a warning, not a failed run
            written.append(write_model_card(folder, train_config=train_config, **kw))
        except (OSError, ValueError, TypeError, KeyError) as err:
            print(f"warning: no model card in {folder} ({type(err).__name__}: {err})", flush=True)
    return written
