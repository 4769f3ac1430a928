"""Training: config errors, an end-to-end main(argv) run, exact resume after SIGKILL, and two processes
against one for the contrastive loss."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.config import ConfigError, load_config
from train.main import main

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "data.train=[{format: shapes, split: train, size: 64, task_mix: {caption: 1, vqa: 2}}]",
    "data.num_workers=0", "batch_size=4", "log_every=1", "progress=false", "optim.warmup_steps=2",
    "model.tokenizer_texts=400", "time_schedule=false", "max_minutes=null",
]


def test_unknown_key_names_the_key_and_the_nearest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim.lrr'; did you mean 'optim.lr'"):
        load_config(None, ["optim.lrr=0.1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_step: 10\n")
    with pytest.raises(ConfigError, match=r"'max_step'.*'max_steps'"):
        load_config(bad)
    assert main([str(bad)]) == 2
    cfg = load_config(ROOT / "configs/train/shapes-tiny.yaml", ["optim.lr=5e-1", "model.overrides.unimodal_layers=1"])
    assert cfg.optim.lr == 0.5 and isinstance(cfg.optim.lr, float)
    with pytest.raises(ConfigError, match="optim.lr: expected a number"):
        load_config(None, ["optim.lr=fast"])
    assert cfg.model.overrides["unimodal_layers"] == 1 and cfg.batch_size == 32
    # YAML reads a bare `no` as False; a string field gets the word back (Accelerate wants "no")
    assert load_config(None, ["precision=no"]).precision == "no"
    bad.write_text("precision: no\n")
    assert load_config(bad).precision == "no"


def test_main_trains_a_few_steps_and_exports_a_loadable_model(tmp_path):
    out = tmp_path / "run"
    rc = main([str(ROOT / "configs/train/shapes-tiny.yaml"), *SMALL, "max_steps=6", f"output_dir={out}",
               "data.validation=null", "checkpoint_every=3", "keep_checkpoints=1"])
    assert rc == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-6"]
    from mmgpt import MMGPTModel, MMGPTProcessor

    model = MMGPTModel.from_pretrained(out / "model")
    proc = MMGPTProcessor.from_pretrained(out / "model")
    assert model.config.vision["config"]["image_size"] == proc.image_size == 64


def test_runs_in_one_process_may_change_precision(tmp_path):
    """A second run in the same process (a notebook, a sweep) with another precision: Accelerate's
    per-process state refused it ("AcceleratorState has already been initialized")."""
    common = [str(ROOT / "configs/train/shapes-tiny.yaml"), *SMALL, "max_steps=1", "data.validation=null"]
    assert main([*common, "precision=bf16", f"output_dir={tmp_path / 'a'}"]) == 0
    assert main([*common, "precision=no", f"output_dir={tmp_path / 'b'}"]) == 0
    assert (tmp_path / "b" / "model" / "model.safetensors").is_file()


def test_adamw_recipe_runs_torch_fused_adamw_and_resumes_from_its_state(tmp_path):
    """`optim.name=adamw` builds torch's fused AdamW (3x the per-tensor loop on CPU); its state
    round-trips through a checkpoint."""
    out = tmp_path / "run"
    common = [str(ROOT / "configs/train/shapes-tiny.yaml"), *SMALL, "optim.name=adamw", f"output_dir={out}",
              "data.validation=null", "checkpoint_every=2"]
    assert main([*common, "max_steps=2"]) == 0
    state = torch.load(out / "checkpoints" / "step-2" / "optimizer.bin", weights_only=False)
    assert all(g["fused"] for g in state["param_groups"]) and state["state"]
    assert main([*common, "max_steps=3", "resume=latest"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3


def test_curriculum_data_is_read_in_order(tmp_path, monkeypatch):
    """A shapes source with `single_object_first` is not shuffled: its one-object images come first."""
    from train.data.shapes import ShapesDataset

    seen, scene = [], ShapesDataset.scene

    def spy(self, i):
        if self.split == "train":
            seen.append((i, len(scene(self, i)[0].objects)))
        return scene(self, i)

    monkeypatch.setattr(ShapesDataset, "scene", spy)
    train = "data.train=[{format: shapes, size: 64, grouped: true, single_object_first: 8, task_mix: {caption: 1, vqa: 1}}]"
    assert main([str(ROOT / "configs/train/shapes-tiny.yaml"), *SMALL, train, "max_steps=3", "model.tokenizer_texts=20",
                 f"output_dir={tmp_path / 'run'}", "data.validation=null"]) == 0
    start = max(k for k, (i, _) in enumerate(seen) if i == 0)  # training starts after the tokenizer's sample
    read = seen[start:]  # 3 steps x 4 images, plus the loader's look-ahead
    assert len(read) >= 12 and [i for i, _ in read] == list(range(len(read)))
    assert [n for _, n in read[:8]] == [1] * 8 and max(n for _, n in seen) > 1


def _train_cmd(out, extra=()):
    return [sys.executable, "-m", "train", str(ROOT / "configs/train/shapes-tiny.yaml"), *SMALL, "max_steps=10",
            "checkpoint_every=2", "keep_checkpoints=3", f"output_dir={out}", "data.validation=null",
            "deterministic=true", *extra]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory):
    """The weights of an uninterrupted run of `_train_cmd`."""
    ref = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_train_cmd(ref), env=ENV, check=True, capture_output=True, cwd=ROOT)
    return load_file(ref / "model" / "model.safetensors")


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path, reference_weights):
    env = ENV
    cut = tmp_path / "cut"

    proc = subprocess.Popen(_train_cmd(cut), env={**env, "MMGPT_TEST_STEP_DELAY": "0.4"}, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (cut / "checkpoints" / "step-4" / "trainer_state.json").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "model").exists()
    subprocess.run(_train_cmd(cut, ["resume=latest"]), env=env, check=True, capture_output=True, cwd=ROOT)

    _assert_same_weights(reference_weights, load_file(cut / "model" / "model.safetensors"))
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # steps logged after step-4 and before the kill are not repeated


def test_sigint_checkpoints_the_last_step_and_resume_continues_log_and_clock(tmp_path, reference_weights):
    """Ctrl-C (or SIGTERM) with no periodic checkpoints: the run stops after the step in flight with a
    checkpoint of it (exit 130), and resume=latest ends with the uninterrupted run's weights, one log
    line per step and a training clock that goes on from where it stopped."""
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_train_cmd(cut, ["checkpoint_every=0"]), env={**ENV, "MMGPT_TEST_STEP_DELAY": "0.4"},
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log, deadline = cut / "metrics.jsonl", time.time() + 240
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None, "the run ended before it could be stopped"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    from train.checkpoint import list_checkpoints

    (ckpt,) = list_checkpoints(cut / "checkpoints")
    stopped = json.loads((ckpt / "trainer_state.json").read_text())
    assert 3 <= stopped["step"] < 10 and ckpt.name == f"step-{stopped['step']}" and "resume=latest" in err
    assert stopped["train_seconds"] > 3 * 0.4
    assert not (cut / "model").exists()
    subprocess.run(_train_cmd(cut, ["checkpoint_every=0", "resume=latest"]), env=ENV, check=True,
                   capture_output=True, cwd=ROOT)
    _assert_same_weights(reference_weights, load_file(cut / "model" / "model.safetensors"))
    logs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(1, 11))
    after = [r["elapsed_s"] for r in logs if r["step"] > stopped["step"]]
    assert after[0] >= stopped["train_seconds"]


def test_a_fresh_run_does_not_mix_with_an_earlier_runs_checkpoints(tmp_path):
    """Pruning keeps the newest checkpoints, and resume=latest takes the newest: a new run into a folder
    holding another run's step-4 would delete its own step-2 and later resume the other run. Refused;
    overwrite=true starts over, with its own log."""
    out = tmp_path / "run"
    common = [str(ROOT / "configs/train/shapes-tiny.yaml"), *SMALL, f"output_dir={out}", "data.validation=null",
              "data.train=shapes:train:48"]  # the command line's short form of a source
    assert main([*common, "max_steps=4", "checkpoint_every=2"]) == 0
    assert main([*common, "max_steps=2", "checkpoint_every=1"]) == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert main([*common, "max_steps=2", "checkpoint_every=1", "overwrite=true"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_config_refuses_values_a_run_cannot_use():
    for override, message in [
        ("batch_size=0", "batch_size: must be >= 1"), ("grad_accum=0", "grad_accum: must be >= 1"),
        ("optim.lr=-1e-3", "optim.lr: must be > 0"), ("max_steps=1.5", "max_steps: expected a whole number"),
        ("precision=bf17", "precision: must be one of"), ("progress=maybe", "progress: expected true or false"),
        ("best_metric=cidr", "did you mean 'cider'"), ("best_metric=cider", "needs a validation source"),
        ("data.train=[{format: shapez}]", r"data.train\[0\]: unknown data format 'shapez'; did you mean 'shapes'"),
        ("data.train=[{format: jsonl, pth: a.jsonl}]", r"data.train\[0\]: unknown data source key 'pth'; did you mean 'path'"),
        ("data.validation=7", "data.validation: expected a source mapping or a short form"),
        ("out=x", "unknown config key 'out'; did you mean 'output_dir'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    cfg = load_config(None, ["data.train=shapes:train:40", "data.validation=shapes:validation:5", "max_steps=3.0"])
    assert cfg.data.train == [{"format": "shapes", "split": "train", "size": 40}]
    assert cfg.data.validation == {"format": "shapes", "split": "validation", "size": 5}
    assert cfg.max_steps == 3 and isinstance(cfg.max_steps, int)


def test_pretrained_parts_that_cannot_be_fetched_are_one_line_naming_the_local_folder_keys(tmp_path, capsys):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # as in CI: no hub
    assert main([str(ROOT / "configs/train/shapes-tiny.yaml"), *SMALL, "model.preset=base", "max_steps=1",
                 f"output_dir={tmp_path / 'run'}", "data.validation=null"]) == 2
    err = capsys.readouterr().err
    assert "model.preset 'base': could not load its pretrained parts" in err and "Traceback" not in err
    assert "model.overrides.text_pretrained=DIR" in err


def test_a_part_with_learning_rate_zero_does_not_move():
    from mmgpt import build_model
    from train.parts import param_groups

    model, _ = build_model("tiny", texts=["a red circle"])
    for name in ("adamw", "muon"):
        cfg = load_config(None, [f"optim.name={name}", "optim.lr_vision=0", "optim.lr_decoder=2e-4",
                                 "optim.muon_lr=8e-3"])
        lr_of = {id(p): g["lr"] for g in param_groups(model, cfg) for p in g["params"]}
        assert {lr_of[id(p)] for p in model.vision.parameters() if p.requires_grad} == {0}, name
        decoder = {lr_of[id(p)] for p in model.decoder.parameters()}
        assert decoder == ({2e-4} if name == "adamw" else {2e-4, 8e-3}), name


def test_best_value_and_step_go_into_checkpoints(tmp_path):
    """A resumed run compares later evaluations with the best so far (it started from None before, so
    a worse model replaced OUT/best)."""
    out = tmp_path / "run"
    assert main([str(ROOT / "configs/train/shapes-tiny.yaml"), *SMALL, "max_steps=4", f"output_dir={out}",
                 "data.validation={format: shapes, split: validation, size: 4}", "data.eval_images=4",
                 "eval_every=2", "checkpoint_every=2", "best_metric=retrieval_i2t_r1"]) == 0
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    values = {r["step"]: r["eval"]["retrieval_i2t_r1"] for r in evals}
    best = json.loads((out / "best" / "best_metric.json").read_text())
    assert best["retrieval_i2t_r1"] == max(values.values()) and values[best["step"]] == best["retrieval_i2t_r1"]
    for step in (2, 4):
        state = json.loads((out / "checkpoints" / f"step-{step}" / "trainer_state.json").read_text())
        assert state["best"] == max(v for s, v in values.items() if s <= step)


def test_batches_without_a_caption_train_with_the_contrastive_loss_on(tmp_path):
    """Questions only (the contrastive loss has no caption row to pair): the step is the LM step, as
    with itc_weight 0 (it crashed on an empty text batch before)."""
    from mmgpt import build_model

    torch.manual_seed(0)
    model, proc = build_model("tiny", texts=["what shape is it? circle", "how many? two"])
    model.train()
    batch = proc.batch_examples(["vqa", "vqa"], ["what shape is it?", "how many?"], ["circle", "two"])
    batch.update(pixel_values=torch.randn(2, 3, 64, 64), itc_mask=torch.zeros(2, dtype=torch.bool))
    out = model(**batch)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.config.itc_weight = 0.0
    ref = model(**batch)
    ref.loss.backward()
    assert out.itc_loss.item() == 0.0 and torch.allclose(out.loss, ref.loss)
    for k, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[k], p.grad, atol=1e-7), k
    run = tmp_path / "run"
    assert main([str(ROOT / "configs/train/shapes-tiny.yaml"), *SMALL, "max_steps=2", f"output_dir={run}",
                 "data.validation=null", "data.train=[{format: shapes, size: 16, task_mix: {vqa: 1}}]"]) == 0


@pytest.mark.parametrize("hard_negatives", [False, True, "questions"])
def test_two_processes_give_the_itc_loss_and_gradients_of_one(tmp_path, hard_negatives):
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate launcher not installed")
    from mmgpt import build_model

    torch.manual_seed(0)
    model, proc = build_model({"vision": {"backend": "vit", "config": {"image_size": 32, "patch_size": 8,
                               "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "intermediate_size": 64, "hidden_dropout_prob": 0.0,
                               "attention_probs_dropout_prob": 0.0}},
                               "text": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 32,
                                        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
                               "adapter": {"type": "mlp"}, "projection_dim": 16, "unimodal_layers": 1,
                               "lm_weight": 0.0, "tokenizer": {"vocab_size": 300}},
                              texts=["a red circle", "a blue square", "a green triangle and a red one"])
    model.save_pretrained(tmp_path / "m")
    caps = ["a red circle", "a blue square", "a green triangle", "a red one", "a blue circle", "a green square"]
    batch = proc.batch_examples(["caption"] * 6, [""] * 6, caps)
    batch["pixel_values"] = torch.randn(6, 3, 32, 32)
    if hard_negatives == "questions":  # several texts per image, one image spanning both ranks (rows 2, 3)
        batch.update(itc_images=torch.tensor([7, 7, 8, 8, 9, 10]), itc_groups=torch.tensor([1, 2, 3, 4, 5, 1]))
    elif hard_negatives:  # uneven: rank 0's rows own 3 negatives, rank 1's own 1
        negs = ["a blue circle", "a red square", "a green circle", "a red circle"]
        neg = proc.batch_examples(["caption"] * 4, [""] * 4, negs)
        batch.update(itc_negative_ids=neg["input_ids"], itc_negative_mask=neg["attention_mask"],
                     itc_negative_owner=torch.tensor([0, 1, 1, 4]))
    torch.save(batch, tmp_path / "batch.pt")

    # CUDA_VISIBLE_DEVICES="": on a machine with a GPU, Accelerate's barrier asks gloo for CUDA device
    # <rank>, which a 1-GPU machine lacks (rank 1 dies)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    launcher = str(Path(sys.executable).parent / "accelerate")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", "--main_process_port", "0",
           str(ROOT / "tests/dist_itc_script.py"), str(tmp_path / "m"), str(tmp_path / "batch.pt"),
           str(tmp_path / "two.pt")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt")
    assert two["world"] == 2

    from mmgpt import MMGPTModel

    one_model = MMGPTModel.from_pretrained(tmp_path / "m").train()
    out = one_model(**batch)
    out.loss.backward()
    assert torch.allclose(out.itc_loss, two["itc_loss"], atol=1e-6)
    grads = {k: p.grad for k, p in one_model.named_parameters() if p.grad is not None}
    assert grads.keys() == two["grads"].keys()
    for k, g in grads.items():
        err = (g - two["grads"][k]).abs().max().item()
        assert err <= 1e-5 * max(1.0, g.abs().max().item()), (k, err)


def test_frozen_encoder_feature_cache_gives_the_same_training(tmp_path):
    """Cached features of a frozen encoder train exactly like recomputing them (epochs 2+ hit the cache)."""
    common = [str(ROOT / "configs/train/shapes-tiny.yaml"), *SMALL, "max_steps=6",
              "data.train=[{format: shapes, split: train, size: 8, task_mix: {caption: 1, vqa: 1}}]",
              "freeze.vision=true", "data.validation=null", "deterministic=true", "precision=no"]
    assert main([*common, f"output_dir={tmp_path / 'a'}", "freeze.feature_cache=none"]) == 0
    assert main([*common, f"output_dir={tmp_path / 'b'}"]) == 0
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_itc_warmup_ramps_the_contrastive_weight(tmp_path):
    out = tmp_path / "run"
    assert main([str(ROOT / "configs/train/shapes-tiny.yaml"), *SMALL, "max_steps=5", f"output_dir={out}",
                 "data.validation=null", "objectives.itc_weight=0.5", "objectives.itc_warmup_steps=4"]) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    for rec in logs:  # logged after the step: the loss of step k used the ramp at k - 1
        ramp = min(1.0, (rec["step"] - 1) / 4)
        assert rec["loss"] == pytest.approx(rec["lm_loss"] + ramp * 0.5 * rec["itc_loss"], rel=1e-5), rec
    assert "grad_norm" in logs[0] and logs[0]["logit_scale"] > 1


def test_collator_points_each_hard_negative_at_its_caption_row():
    from mmgpt import build_model
    from train.collate import Collator
    from train.data.shapes import ShapesDataset

    ds = ShapesDataset("train", 6, task_mix={"caption": 1, "vqa": 2}, grouped=True, hard_negatives=2)
    _, proc = build_model("tiny", texts=[r["target"] for i in range(6) for r in ds[i]] + ds[0][0]["negatives"])
    batch = Collator(proc)([ds[i] for i in range(6)])
    caps = [r for i in range(6) for r in ds[i] if r["task"] == "caption"]
    assert batch["itc_mask"].sum() == 6 and batch["itc_negative_ids"].shape[0] == 12
    assert batch["itc_negative_owner"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    first = proc.batch_texts([caps[3]["negatives"][1]])["input_ids"][0]
    assert batch["itc_negative_ids"][7, : len(first)].tolist() == first.tolist()


def test_collator_itc_questions_puts_every_row_in_itc_with_its_image_id():
    import zlib

    from mmgpt import build_model
    from train.collate import Collator
    from train.data.shapes import ShapesDataset

    ds = ShapesDataset("train", 4, task_mix={"caption": 1, "vqa": 2}, grouped=True)
    rows = [r for i in range(4) for r in ds[i]]
    _, proc = build_model("tiny", texts=[r["target"] for r in rows] + [r.get("prompt", "") for r in rows])
    plain = Collator(proc)([ds[i] for i in range(4)])
    batch = Collator(proc, itc_questions=True)([ds[i] for i in range(4)])
    assert "itc_images" not in plain and plain["itc_mask"].sum() == 4
    assert batch["itc_mask"].all() and batch["itc_mask"].shape[0] == len(rows)
    img = batch["itc_images"].tolist()
    assert img == [img[3 * (k // 3)] for k in range(len(rows))] and len(set(img)) == 4  # 3 rows per image
    for k, r in enumerate(rows):
        text = f"{r['prompt']} {r['target']}" if r["task"] == "vqa" else r["target"]
        assert batch["itc_groups"][k] == zlib.crc32(text.strip().lower().encode()) & 0x7FFFFFFF
    torch.testing.assert_close(batch["itc_groups"][0], plain["itc_groups"][0])  # captions keep their ids


def _png_bytes(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_webdataset_shards_train(tmp_path):
    """A streamed source trains (it failed on len() and on shuffle=True for an IterableDataset)."""
    import io
    import tarfile

    for shard in range(2):
        with tarfile.open(tmp_path / f"s{shard}.tar", "w") as tar:
            for k in range(12):
                for ext, data in (("png", _png_bytes(k)), ("txt", f"a picture number {k}".encode())):
                    info = tarfile.TarInfo(f"x/{shard}_{k:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "run"
    assert main([str(ROOT / "configs/train/shapes-tiny.yaml"), *SMALL, "max_steps=8", f"output_dir={out}",
                 "data.validation=null", f"data.train=wds:{tmp_path}/s{{0..1}}.tar", "model.tokenizer_texts=50"]) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # 24 samples / batch 4 = 6 a pass: the second pass is read too


def test_too_many_bad_records_in_a_short_run_is_an_error_after_the_model_is_saved(tmp_path, capsys):
    rows = []
    for k in range(12):
        (tmp_path / f"{k}.png").write_bytes(_png_bytes(k) if k else b"not a png")
        rows.append({"image": f"{k}.png", "caption": f"picture {k}"})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main([str(ROOT / "configs/train/shapes-tiny.yaml"), *SMALL, "max_steps=2", f"output_dir={out}",
                 "data.validation=null", f"data.train=jsonl:{tmp_path / 'd.jsonl'}"]) == 2
    err = capsys.readouterr().err
    assert "too many bad records" in err and "0.png" in err and str(out / "model") in err
    assert (out / "model" / "model.safetensors").is_file()


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside_and_refuses_a_different_setup(tmp_path):
    out = tmp_path / "run"
    common = [str(ROOT / "configs/train/shapes-tiny.yaml"), *SMALL, f"output_dir={out}", "data.validation=null",
              "checkpoint_every=1", "keep_checkpoints=1"]
    assert main([*common, "max_steps=4", "keep_checkpoints=4"]) == 0  # step-1 .. step-4
    older = out / "checkpoints" / "step-2"
    assert main([*common, "max_steps=4", "batch_size=2", f"resume={older}"]) == 2  # the data position counts batches
    assert main([*common, "max_steps=4", "optim.name=adamw", f"resume={older}"]) == 2  # optimizer state does not fit
    assert main([*common, "max_steps=3", f"resume={older}"]) == 0
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["abandoned-step-3", "abandoned-step-4", "step-3"]  # its own step-3 kept, not the old step-4
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_continuing_from_a_model_folder_trains_with_this_runs_objectives(tmp_path):
    first = tmp_path / "first"
    common = [str(ROOT / "configs/train/shapes-tiny.yaml"), *SMALL, "data.validation=null", "max_steps=2"]
    assert main([*common, f"output_dir={first}"]) == 0
    second = tmp_path / "second"
    assert main([*common, f"output_dir={second}", f"model.path={first / 'model'}", "objectives.itc_weight=0"]) == 0
    logs = [json.loads(x) for x in (second / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(r["loss"] - r["lm_loss"]) < 1e-6 for r in logs)  # the contrastive term is off, as configured
    assert json.loads((second / "model" / "config.json").read_text())["itc_weight"] == 0


def test_images_of_two_sources_with_the_same_id_keep_their_own_cache_key():
    """Two COCO-style sources both have an image 7: the feature cache and ITC key images by the file
    they came from (by id alone, one source's features were served for the other's image)."""
    from PIL import Image

    from mmgpt import build_model
    from train.collate import Collator

    _, proc = build_model("tiny", texts=["a red circle"])
    im = Image.new("RGB", (64, 64))
    recs = [{"image": im, "task": "caption", "prompt": "", "target": "a red circle", "image_id": "7",
             "image_source": f"/data/{src}/7.jpg"} for src in ("a", "b")]
    assert Collator(proc, train=True)(recs)["image_ids"] == ["/data/a/7.jpg", "/data/b/7.jpg"]
