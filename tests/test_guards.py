"""Guards found by a prefix-fusion / LoRA user audit: settings a run or a resume cannot use are one line,
and the command line and server follow a model's saved generation_config as the Python API does."""

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from test_api import trained_tiny_dir, world_images

from mmgpt import load
from mmgpt.cli import main as cli_main
from mmgpt.serve import create_app
from train.main import main

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    str(ROOT / "configs/train/shapes-tiny.yaml"),
    "data.train=[{format: shapes, split: train, size: 32, task_mix: {caption: 1, vqa: 1}}]",
    "data.num_workers=0", "batch_size=4", "progress=false", "model.tokenizer_texts=200", "time_schedule=false",
    "max_minutes=null", "data.validation=null",
]


def test_resume_with_other_lora_settings_and_unknown_lora_targets_are_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    common = [*SMALL, f"output_dir={out}", "checkpoint_every=2", "lora.enabled=true"]
    assert main([*common, "max_steps=2"]) == 0
    capsys.readouterr()
    assert main([*common, "max_steps=3", "resume=latest", "lora.r=4"]) == 2
    err = capsys.readouterr().err
    assert "lora.r=8" in err and "Traceback" not in err
    assert main([*SMALL, f"output_dir={out}", "max_steps=3", "resume=latest"]) == 2  # LoRA off now
    err = capsys.readouterr().err
    assert "lora.enabled=True" in err and "Traceback" not in err
    assert main([*common, "max_steps=3", "resume=latest"]) == 0  # the same settings resume
    capsys.readouterr()
    assert main([*SMALL, f"output_dir={tmp_path / 'b'}", "max_steps=1", "lora.enabled=true",
                 "lora.target_modules=[q_proj]"]) == 2
    err = capsys.readouterr().err
    assert "lora.target_modules: ['q_proj']" in err and "'c_attn'" in err and "Traceback" not in err


def test_overrides_that_differ_from_the_model_in_model_path_are_named(tmp_path, capsys):
    first = tmp_path / "first"
    assert main([*SMALL, f"output_dir={first}", "max_steps=1"]) == 0
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"model.overrides: adapter.type='resampler' .* not applied"):
        rc = main([*SMALL, f"output_dir={tmp_path / 'second'}", "max_steps=1", f"model.path={first / 'model'}",
                   "model.overrides.adapter.type=resampler"])
    assert rc == 0
    from train.run_setup import _differences

    same = {"vision": {"image_mean": (0.5, 0.5, 0.5)}, "fusion": None}  # a tuple and a default say no change
    assert _differences(same, {"vision": {"image_mean": [0.5, 0.5, 0.5]}, "fusion": "cross_attention"}) == []


@pytest.fixture(scope="module")
def short_model(tmp_path_factory) -> Path:
    """The tiny test model whose saved generation_config asks for 2 new tokens and 2 beams."""
    folder = tmp_path_factory.mktemp("short") / "model"
    shutil.copytree(trained_tiny_dir(), folder)
    gc = json.loads((folder / "generation_config.json").read_text())
    gc.update(max_new_tokens=2, num_beams=2)
    (folder / "generation_config.json").write_text(json.dumps(gc))
    return folder


def test_command_line_and_server_follow_the_saved_generation_config(short_model, tmp_path, capsys):
    image = tmp_path / "a.png"
    world_images()[0].save(image)
    api = load(short_model, device="cpu")
    expected = api.caption(world_images()[0])
    assert len(api.processor.tokenizer(expected)["input_ids"]) <= 2
    assert api.caption(world_images()[0], max_new_tokens=6, num_beams=1) != expected  # the setting matters
    assert cli_main(["caption", str(short_model), str(image)]) == 0
    assert capsys.readouterr().out.strip().split("\t")[-1] == expected
    assert cli_main(["caption", str(short_model), str(image), "--max-new-tokens", "6", "--num-beams", "1"]) == 0
    assert capsys.readouterr().out.strip().split("\t")[-1] == api.caption(world_images()[0], max_new_tokens=6,
                                                                         num_beams=1)
    import base64

    b64 = base64.b64encode(image.read_bytes()).decode()
    with TestClient(create_app(short_model, device="cpu", max_wait_ms=5)) as client:
        r = client.post("/v1/caption", json={"images": [b64]})
        assert r.status_code == 200 and r.json()["captions"] == [expected]


def test_server_defaults_from_the_model_stay_within_the_request_bounds(short_model, tmp_path):
    from mmgpt.serve import schemas
    from mmgpt.serve.app import _bounded_defaults

    class Big:
        class model:
            class generation_config:
                max_new_tokens, num_beams = 500, 9

    assert _bounded_defaults(Big) == {"max_new_tokens": schemas.MAX_NEW_TOKENS, "num_beams": schemas.MAX_BEAMS}
    assert _bounded_defaults(object()) == {"max_new_tokens": 32, "num_beams": 1}
    assert _bounded_defaults(load(short_model, device="cpu")) == {"max_new_tokens": 2, "num_beams": 2}


def test_lora_targets_may_be_dotted_suffixes(tmp_path):
    out = tmp_path / "run"
    assert main([*SMALL, f"output_dir={out}", "max_steps=1", "lora.enabled=true",
                 "lora.target_modules=[attn.c_attn, attn.c_proj]"]) == 0


def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    image = tmp_path / "a.png"
    world_images()[0].save(image)
    cmd = f"{sys.executable} -m mmgpt.cli caption {trained_tiny_dir()} {image} {image} | true"
    run = subprocess.run(["bash", "-c", cmd + "; echo rc=${PIPESTATUS[0]}"], capture_output=True, text=True,
                         timeout=300, check=False)
    assert "Traceback" not in run.stderr and "BrokenPipeError" not in run.stderr, run.stderr
    assert "rc=0" in run.stdout or "rc=141" in run.stdout


def test_a_prefix_decoder_warns_past_the_positions_it_was_trained_on():
    from test_prefix import make_model

    model = make_model("llama")  # max_position_embeddings 64, 16 image tokens in front
    px = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(pixel_values=px, max_new_tokens=4, do_sample=False)
    with pytest.warns(UserWarning, match="trained on 64"):
        model.generate(pixel_values=px, max_new_tokens=60, do_sample=False)


def test_readme_audit_settings_are_refused_in_one_line_before_training(tmp_path, capsys):
    """Found by a README walkthrough: each gave a traceback, or was accepted and did nothing."""
    from train.config import ConfigError, load_config

    for override, message in [
        ("data.train=shapes:bogus:10", r"data.train\[0\]: unknown shapes split 'bogus'"),
        ("data.train=[{format: shapes, size: 10, hard_negatives: -1}]", "hard_negatives must be a count"),
        ("data.train=[{format: shapes, size: 10, task_mix: {caption: 1, vq: 2}}]", "task_mix must map"),
        ("data.validation=shapes:validation:0", "data.validation: size 0 gives nothing to evaluate"),
        ("lora.dropout=2", r"lora.dropout: must be in \[0, 1\)"),
        ("lora.alpha=0", "lora.alpha: must be > 0"),
        ("freeze.feature_cache=disk", "freeze.feature_cache: must be 'memory' or 'none'"),
        ("trackers=[tensorbord]", "trackers: 'tensorbord' is not a tracker"),
        ("optim.lrr=1", "did you mean 'optim.lr'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    import importlib.util

    if not any(importlib.util.find_spec(m) for m in ("transformer_engine", "msamp", "torchao")):
        with pytest.raises(ConfigError, match="precision: fp8 needs"):
            load_config(None, ["precision=fp8"])
    from train.config import usable_trackers

    if importlib.util.find_spec("wandb") is None:
        with pytest.warns(UserWarning, match="'wandb' not installed here"):
            cfg = load_config(None, ["trackers=[wandb]"])
        assert cfg.trackers == ["wandb"] and usable_trackers(cfg.trackers) == []  # kept as asked, not logged to
    assert load_config(None, ["trackers=all"]).trackers == ["all"]  # Accelerate's log_with names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_config(None, ["trackers=tensorboard"]).trackers == ["tensorboard"]
    assert load_config(None, ["freeze.feature_cache=off"]).freeze.feature_cache == "none"  # YAML's false
    with pytest.raises(ConfigError, match="model.attn_implementation: must be 'sdpa' or 'eager'"):
        load_config(None, ["model.attn_implementation=flash_attention_2"])
    for argv, message in [
        ([f"model.path={tmp_path / 'nothing'}"], "model.path .*not a model folder mmgpt can load"),
        (["model.overrides.vision.position_int=sincos"], "did you mean 'vision.position_init'"),
    ]:
        assert main([*SMALL, f"output_dir={tmp_path / 'run'}", "max_steps=1", *argv]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err, err
