"""Model cards (mmgpt.model_card): a short training run writes README.md into OUT/model and OUT/best; the
YAML parses with huggingface_hub's ModelCard, its model-index holds the run's measured evaluation, and
the usage snippets, executed as written, give what mmgpt's API gives."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from test_api import trained_tiny_dir, world_images

from mmgpt.api import load
from mmgpt.model_card import write_model_card
from train.main import main

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("card") / "run"
    assert main([str(ROOT / "configs/train/shapes-tiny.yaml"), f"output_dir={out}", "max_steps=4",
                 "data.train=[{format: shapes, split: train, size: 64, task_mix: {caption: 1, vqa: 1}}]",
                 "data.num_workers=0", "batch_size=4", "log_every=1", "progress=false", "optim.warmup_steps=2",
                 "model.tokenizer_texts=400", "time_schedule=false", "max_minutes=null",
                 "data.validation={format: shapes, split: validation, size: 4}", "data.eval_images=4",
                 "eval_every=2", "best_metric=retrieval_i2t_r1"]) == 0
    return out


def _evals(out: Path) -> dict[int, dict]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval"] for r in recs if "eval" in r}


def test_train_writes_cards_whose_yaml_parses_and_holds_the_measured_results(run):
    evals = _evals(run)
    best_step = json.loads((run / "best" / "best_metric.json").read_text())["step"]
    for folder, step in ((run / "model", max(evals)), (run / "best", best_step)):
        card = ModelCard.load(folder / "README.md")
        data = card.data
        assert data.library_name == "mmgpt" and data.pipeline_tag == "image-text-to-text"
        assert "mmgpt" in data.tags and not getattr(data, "base_model", None)  # the tiny preset is all new
        results = {(r.task_type, r.metric_name): r.metric_value for r in data.eval_results}
        want = evals[step]
        assert results[("visual-question-answering", "VQA accuracy")] == round(want["vqa_accuracy"], 4)
        assert results[("image-text-retrieval", "Image-to-text R@1")] == round(want["retrieval_i2t_r1"], 4)
        assert results[("image-to-text", "CIDEr")] == round(want["cider"], 4)
        text = card.text
        assert f"at step {step}" in text and "shapes" in text and "hardware:" in text
        assert f"hf upload your-name/run-{folder.name} {folder.resolve()} ." in text
    assert "- steps: 4" in (run / "model" / "README.md").read_text()


def test_usage_snippets_run_as_written(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(trained_tiny_dir(), folder)
    write_model_card(folder, train_config={"data": {"train": [{"format": "hf", "name": "user/captions"}]}},
                     metrics={"caption_exact_match": 0.5}, steps=60, train_seconds=12.0)
    card = ModelCard.load(folder / "README.md")
    assert card.data.datasets == ["user/captions"]
    blocks = re.findall(r"```python\n(.*?)```", card.text, flags=re.DOTALL)
    assert len(blocks) == 2
    image = world_images()[1]
    (tmp_path / "cwd").mkdir()
    image.save(tmp_path / "cwd" / "photo.png")
    vl = load(folder, device="cpu")
    printed = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path / "cwd")
    try:
        with contextlib.redirect_stdout(printed):
            for code in blocks:
                exec(compile(code, "README.md", "exec"), {"__name__": "__snippet__"})  # noqa: S102
    finally:
        os.chdir(cwd)
    lines = printed.getvalue().splitlines()
    assert lines == [vl.caption(image), vl.ask(image, "what color is the circle?"), vl.caption(image)]
