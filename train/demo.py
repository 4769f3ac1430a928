"""The shapes demo: train the tiny preset on shapes, evaluate on the test split, write a report."""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from pathlib import Path

from PIL import Image, ImageDraw

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train" / "shapes-tiny.yaml"
HEADLINE = ("caption_exact_match", "cider", "bleu_4", "vqa_accuracy", "retrieval_i2t_r1", "retrieval_t2i_r1",
            "chat_followup_accuracy", "chat_two_image_accuracy", "chat_accuracy")


def samples_grid(examples: list[dict], path: Path, n: int = 12, cols: int = 4, scale: int = 3) -> None:
    """A grid of test images, each with its generated caption and one answered question."""
    examples = examples[:n]
    if not examples:
        return
    side = examples[0]["image"].width * scale
    cell_w, text_h = max(side, 260), 92
    rows = (len(examples) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell_w, rows * (side + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, ex in enumerate(examples):
        x, y = (i % cols) * cell_w, (i // cols) * (side + text_h)
        img = ex["image"].resize((side, side), Image.NEAREST)
        sheet.paste(img, (x + (cell_w - side) // 2, y))
        lines = textwrap.wrap(ex.get("caption", ""), 42)[:2]
        n_caption = len(lines)
        if ex.get("question"):
            lines += [f"Q: {ex['question']}"[:44], f"A: {ex.get('answer', '')}"[:44]]
        for j, line in enumerate(lines):
            draw.text((x + 4, y + side + 2 + 18 * j), line, fill=(0, 0, 0) if j < n_caption else (0, 0, 160))
    sheet.save(path)


def format_table(metrics: dict) -> str:
    rows = [(k, metrics[k]) for k in HEADLINE if k in metrics]
    rows += sorted((k, v) for k, v in metrics.items() if k.startswith("vqa_accuracy/"))
    width = max(len(k) for k, _ in rows) if rows else 10
    lines = [f"| {'metric'.ljust(width)} | value  |", f"|{'-' * (width + 2)}|--------|"]
    lines += [f"| {k.ljust(width)} | {v:6.3f} |" for k, v in rows]
    return "\n".join(lines)


def evaluate_on_shapes_test(model_dir: str | Path, test_images: int = 300, device=None, **evaluate_kwargs):
    """The demo's evaluation: the model in `model_dir` on the first `test_images` shapes test images
    (captions, every question, retrieval). Returns (the model, `train.evaluate.EvalResult`)."""
    from mmgpt import MMGPTModel, MMGPTProcessor
    from train.chat_eval import evaluate_chat
    from train.data import ShapesDataset
    from train.evaluate import evaluate

    model = MMGPTModel.from_pretrained(model_dir).eval()
    processor = MMGPTProcessor.from_pretrained(model_dir)
    test = ShapesDataset("test", size=test_images, image_size=processor.image_size)
    # a conversation and a two-image question per test image, when the model reads several images
    n_chat = 1 if model.config.max_images > 1 or model.uses_prefix else 0
    records = [r for i in range(test_images) for r in test.records_for_image(i, chat=n_chat, two_image=n_chat)]
    result = evaluate(model, processor, [r for r in records if r["task"] != "chat"], device=device, **evaluate_kwargs)
    chat_metrics, chat_examples = evaluate_chat(model, processor, records)
    result.metrics.update(chat_metrics)
    result.examples += chat_examples
    return model, result


def run_demo(out_dir: str | Path, overrides: list[str] | None = None, test_images: int = 300) -> dict:
    from mmgpt.model_card import write_model_card
    from train.config import load_config, to_dict
    from train.loop import run_training

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Each demo starts over (overwrite=true; resume=latest continues a stopped one instead).
    cfg = load_config(DEMO_CONFIG, [f"output_dir={out / 'train'}", "overwrite=true", *(overrides or [])])
    print(f"mmgpt demo: training the tiny preset on shapes for at most {cfg.max_minutes} minutes "
          f"({cfg.max_steps} steps max) -> {out}", flush=True)
    summary = run_training(cfg)
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(summary["model_dir"], model_dir)

    t0 = time.time()
    _, result = evaluate_on_shapes_test(model_dir, test_images)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics.update(train_seconds=summary["train_seconds"], train_steps=summary["step"],
                   eval_seconds=time.time() - t0, test_images=test_images)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_model_card(model_dir, train_config=to_dict(cfg), metrics=metrics, steps=summary["step"],  # README.md
                     train_seconds=summary["train_seconds"], eval_source={"format": "shapes", "split": "test"})
    examples = _one_question_each(result.examples)
    samples_grid(examples, out / "samples.png")
    print()
    print(format_table(metrics))
    print()
    for ex in examples[:6]:
        print(f"  {ex['image_id']}: caption: {ex.get('caption')!r} (truth: {ex.get('references', [''])[0]!r})")
        if ex.get("question"):
            print(f"      Q: {ex['question']}  A: {ex.get('answer')!r} (truth: {ex.get('answers')})")
    print(f"\nwrote {model_dir}, {out / 'metrics.json'}, {out / 'samples.png'}")
    return metrics


def _one_question_each(examples: list[dict]) -> list[dict]:
    """One dict per image: its generated caption plus one answered question (types vary across images)."""
    by_image: dict = {}
    questions: dict = {}
    for ex in examples:
        slot = by_image.setdefault(ex["image_id"], {"image_id": ex["image_id"], "image": ex["image"]})
        if ex.get("task") == "caption":
            slot.update(caption=ex["caption"], references=ex.get("references") or [""])
        elif ex.get("task") == "vqa":
            questions.setdefault(ex["image_id"], []).append(ex)
    for i, (key, slot) in enumerate(by_image.items()):
        qs = questions.get(key)
        if qs:
            q = qs[i % len(qs)]
            slot.update(question=q["question"], answer=q["answer"], answers=q.get("answers"))
    return list(by_image.values())
