"""The demo path end to end on a few steps: train, export, evaluate, write the report files."""

import json

from PIL import Image

from train.demo import run_demo


def test_demo_writes_model_metrics_and_samples(tmp_path):
    out = tmp_path / "demo"
    metrics = run_demo(out, ["max_steps=3", "max_minutes=null", "time_schedule=false", "progress=false",
                             "data.validation=null", "model.tokenizer_texts=400"], test_images=4)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics
    for key in ("caption_exact_match", "vqa_accuracy", "retrieval_i2t_r1", "retrieval_t2i_r1"):
        assert 0.0 <= saved[key] <= 1.0, key
    assert "cider" in saved and saved["train_steps"] == 3 and saved["test_images"] == 4
    assert (out / "model" / "model.safetensors").is_file()
    with Image.open(out / "samples.png") as im:
        assert im.width > 0 and im.height > 0
