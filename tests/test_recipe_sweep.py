"""The recipe sweep tool: variants train in their own processes and report the demo's test metrics."""

import json

import pytest

from benchmarks.recipe_sweep import load_variants, main

TINY = ["data.train=[{format: shapes, split: train, size: 64, task_mix: {caption: 1, vqa: 1}}]",
        "batch_size=4", "optim.warmup_steps=1", "model.tokenizer_texts=200", "data.validation=null", "max_steps=2"]


def test_sweep_runs_each_variant_and_writes_its_metrics(tmp_path, capsys):
    variants = tmp_path / "v.yaml"
    variants.write_text(json.dumps({"plain": TINY, "lr": [*TINY, "optim.lr=1.0e-3"],
                                    "broken": [*TINY, "optim.lrr=1"]}))
    assert main([str(variants), "--parallel", "2", "--test-images", "3", "--out", str(tmp_path / "out")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    by = {r["name"]: r for r in lines}
    assert set(by) == {"plain", "lr", "broken"}
    for name in ("plain", "lr"):
        r = by[name]
        assert r["steps"] == 2 and r["num_images"] == 3 and 0 <= r["caption_exact_match"] <= 1
        assert "vqa_accuracy" in r and "retrieval_i2t_r1" in r and "cider" not in r
    assert by["lr"]["overrides"][-1] == "optim.lr=1.0e-3"
    assert "optim.lrr" in by["broken"]["error"]  # the run's own error, named in the report
    table = capsys.readouterr().out
    assert "| plain | 2 |" in table and "| broken | error:" in table


def test_variants_file_must_map_names_to_override_lists(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: optim.lr=1\n")
    with pytest.raises(SystemExit, match="'a' must be a list"):
        load_variants(bad)
