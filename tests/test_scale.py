"""Scale (issue 24): evaluation shared over processes, weighted mixtures of sources with exact resume,
Muon on sharded parameters. Processes are started with `accelerate launch` on the CPU (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _launcher() -> str:
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate launcher not installed")
    return str(Path(sys.executable).parent / "accelerate")


def launch(script: str, *args, processes: int = 2, timeout: int = 600, extra: tuple = ()) -> subprocess.CompletedProcess:
    """`accelerate launch` SCRIPT on the CPU with `processes` gloo processes of one thread each."""
    # CUDA_VISIBLE_DEVICES="": on a machine with a GPU, Accelerate's barrier asks gloo for CUDA device <rank>
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [_launcher(), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           "--main_process_port", "0", *extra, *(["-m"] if script == "-m" else [str(ROOT / "tests" / script)]),
           *map(str, args)]
    if processes == 1:
        cmd.remove("--multi_gpu")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=timeout, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


# --- distributed evaluation --------------------------------------------------------------------------


def test_shares_are_contiguous_and_cover_everything():
    from train.dist_eval import share

    for n in range(12):
        for size in (1, 2, 3, 5):
            parts = [list(range(n))[share(n, r, size)] for r in range(size)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_two_processes_evaluate_with_the_metrics_of_one(tmp_path):
    from scale_eval_script import records
    from test_api import trained_tiny_dir

    from mmgpt import MMGPTModel, MMGPTProcessor
    from train.evaluate import evaluate

    model_dir = trained_tiny_dir()
    launch("scale_eval_script.py", model_dir, tmp_path / "two.pt", 5, 2)
    two = torch.load(tmp_path / "two.pt")
    assert two["world"] == 2
    model = MMGPTModel.from_pretrained(model_dir).eval()
    one = evaluate(model, MMGPTProcessor.from_pretrained(model_dir), records(5), batch_size=2,
                   caption_scorers=("bleu", "cider"))
    # each process generated for its half: 5 + 4 of the 9 captions, its half of the questions
    q = one.metrics["num_questions"]
    assert two["shares"] == [5 + (q + 1) // 2, 4 + q // 2]
    assert one.metrics["num_images"] == 9 and one.metrics["caption_exact_match"] >= 4 / 9  # the drawn ones
    assert [{k: v for k, v in e.items() if k != "image"} for e in one.examples] == two["examples"]
    assert one.metrics.keys() == two["metrics"].keys()
    for key, value in one.metrics.items():
        assert two["metrics"][key] == pytest.approx(value, abs=1e-6), key


# --- weighted mixtures ------------------------------------------------------------------------------


def _shards(folder: Path, n_shards: int = 2, per: int = 10) -> str:
    """Tiny WebDataset shards (PNG + caption); -> their brace pattern."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    for shard in range(n_shards):
        with tarfile.open(folder / f"s{shard}.tar", "w") as tar:
            for k in range(per):
                buf = io.BytesIO()
                Image.fromarray(np.full((32, 32, 3), (5 * k + shard) % 256, dtype=np.uint8)).save(buf, "PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", f"stream picture {shard} {k}".encode())):
                    info = tarfile.TarInfo(f"x/{shard}_{k:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"{folder}/s{{0..{n_shards - 1}}}.tar"


def test_weights_from_a_b_strings_lists_and_keys_and_bad_ones_named():
    from train.config import ConfigError, load_config

    cfg = load_config(None, ["data.train=shapes:train:10::shapes:validation:20", "data.train_weights=1::2.5"])
    assert [(s["split"], s["weight"]) for s in cfg.data.train] == [("train", 1.0), ("validation", 2.5)]
    cfg = load_config(None, ["data.train=[{format: shapes, size: 10}, {format: shapes, size: 5, weight: 3}]"])
    assert [s.get("weight") for s in cfg.data.train] == [None, 3.0]
    with pytest.raises(ConfigError, match="data.train_weights: 1 weights for 2 sources"):
        load_config(None, ["data.train=shapes:train:10::shapes:validation:20", "data.train_weights=[1]"])
    with pytest.raises(ConfigError, match=r"data.train\[1\]: weight: weights must be > 0"):
        load_config(None, ["data.train=[{format: shapes, size: 10}, {format: shapes, size: 5, weight: 0}]"])


def test_upsampled_sources_take_weight_times_their_size():
    from train.data.mix import Upsampled

    a, b = list(range(10)), [f"b{i}" for i in range(4)]
    mix = Upsampled([a, b], [0.5, 2.0])  # 5 evenly spaced of a, b twice
    assert [mix[i] for i in range(len(mix))] == [0, 2, 4, 6, 8] + b + b


def test_a_mixture_with_a_stream_draws_in_proportion_to_the_weights(tmp_path):
    from train.run_setup import build_sources

    mix = build_sources(f"shapes:train:50::wds:{_shards(tmp_path, 2, 40)}", seed=3)
    mix.weights = [1.0, 3.0]
    items = list(mix)
    streamed = [x for x in items if isinstance(x, dict) and x.get("target", "").startswith("stream")]
    assert len({x["target"] for x in streamed}) == 80  # the epoch ends when the stream was read through once
    assert 0.2 < (len(items) - len(streamed)) / len(items) < 0.3  # ~1/4 from the map-style source
    assert [x if isinstance(x, list) else x["target"] for x in items][:40] == \
        [x if isinstance(x, list) else x["target"] for x in list(mix)][:40]  # seeded: the same again
    mix.set_epoch(1)
    assert [x["target"] for x in list(mix) if isinstance(x, dict)][:10] != [x["target"] for x in streamed][:10]


def test_a_stopped_and_resumed_mixture_reads_the_records_of_an_uninterrupted_run(tmp_path, monkeypatch):
    import train.run_setup
    from train.main import main

    seen: list[list[str]] = []

    class Recording(train.run_setup.Collator):
        def __call__(self, items):
            seen.append([r["target"] for it in items for r in (it if isinstance(it, list) else [it])
                         if isinstance(r, dict)])
            return super().__call__(items)

    monkeypatch.setattr(train.run_setup, "Collator", Recording)
    common = [str(ROOT / "configs/train/shapes-tiny.yaml"), "data.num_workers=0", "batch_size=4", "log_every=1",
              # a constant learning rate: the stopped run (max_steps=3) has the schedule of the whole one
              "progress=false", "optim.warmup_steps=0", "optim.min_lr_ratio=1", "deterministic=true",
              "model.tokenizer_texts=100", "time_schedule=false",
              "max_minutes=null", "data.validation=null", "checkpoint_every=3",
              f"data.train=shapes:train:12::wds:{_shards(tmp_path)}", "data.train_weights=1::2"]
    assert main([*common, "max_steps=6", f"output_dir={tmp_path / 'whole'}"]) == 0
    whole, seen[:] = list(seen), []
    assert main([*common, "max_steps=3", f"output_dir={tmp_path / 'parts'}"]) == 0
    first, seen[:] = list(seen), []
    assert main([*common, "max_steps=6", f"output_dir={tmp_path / 'parts'}", "resume=latest"]) == 0
    # the resumed run reads (and skips) the 3 trained batches again, then goes on as the whole run did; each
    # run collates one batch ahead of its last step
    assert len(whole) == 7 and first == whole[:4] and seen == whole
    assert any("stream" in t for b in whole for t in b) and any("stream" not in t for b in whole for t in b)
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("whole", "parts"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- several machines -------------------------------------------------------------------------------

TRAIN = ["-m", "train", str(ROOT / "configs/train/shapes-tiny.yaml"), "data.num_workers=0", "batch_size=4",
         "log_every=1", "progress=false", "optim.warmup_steps=0", "optim.min_lr_ratio=1", "deterministic=true",
         "model.tokenizer_texts=100", "time_schedule=false", "max_minutes=null", "data.validation=null",
         "checkpoint_every=2", "data.train=shapes:train:32"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _machines(outs: list[Path], *args) -> None:
    """Two `accelerate launch` commands, machine ranks 0 and 1 of 2, one CPU process each, on this host;
    machine r trains into outs[r]."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    port = _free_port()
    procs = [subprocess.Popen(
        [_launcher(), "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank",
         str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no",
         "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", *TRAIN, f"output_dir={out}", *args],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank, out in enumerate(outs)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model" / "model.safetensors")


@pytest.mark.slow
def test_two_machines_train_as_one_machine_with_two_processes_and_resume_on_each(tmp_path):
    ref = tmp_path / "one-machine"
    launch(*TRAIN, "max_steps=4", f"output_dir={ref}")
    want = _weights(ref)

    # a shared file system (the default): machine 0 writes checkpoints and the model, both resume from them
    shared = tmp_path / "shared"
    _machines([shared, shared], "max_steps=2")
    _machines([shared, shared], "max_steps=4", "resume=latest")
    got = _weights(shared)
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    assert sorted(p.name for p in (shared / "checkpoints").iterdir()) == ["step-2", "step-4"]

    # no shared file system: save_on_each_node, each machine its own folder, checkpoints and model
    own = [tmp_path / "machine0", tmp_path / "machine1"]
    _machines(own, "max_steps=2", "save_on_each_node=true")
    for rank, out in enumerate(own):  # the weights once per machine, each process's random state on its own
        assert {p.name for p in (out / "checkpoints" / "step-2").iterdir()} >= {
            "model.safetensors", "optimizer.bin", "trainer_state.json", f"random_states_{rank}.pkl"}
        assert (out / "model" / "model.safetensors").is_file()
    _machines(own, "max_steps=4", "resume=latest", "save_on_each_node=true")
    for out in own:
        got = _weights(out)
        assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want), out
        assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


# --- Muon on sharded parameters ---------------------------------------------------------------------


def test_muon_on_fully_sharded_parameters_equals_single_process_muon(tmp_path):
    import scale_muon_fsdp as case

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "tests/scale_muon_fsdp.py"), str(tmp_path / "two.pt")],
                         env=env, capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt")
    assert two["world"] == 2 and two["sharded"] == 8  # every parameter was a DTensor shard
    # one all-gather per Muon matrix per step (left to DTensor's own propagation, the Newton-Schulz
    # products on shards took 43 collectives a step, with the same result)
    assert two["comms"] == [3] * case.STEPS

    model = case.make_model()
    opt = case.optimizer(model)
    x, y = case.batch()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(case.STEPS):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    for key, value in model.state_dict().items():
        assert not torch.equal(value, start[key]), key  # every parameter moved
        assert torch.allclose(two["params"][key], value, atol=2e-6, rtol=1e-5), (key, (two["params"][key] - value).abs().max())


# --- base size --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_base_preset_trains_on_the_cpu_with_activation_checkpointing(tmp_path):
    """configs/model/base.json with random weights (no hub): ViT-B/16 + a 12-layer GPT-2, two steps."""
    import json

    from mmgpt import MMGPTModel
    from train.main import main

    out = tmp_path / "run"
    (tmp_path / "base.yaml").write_text("model: {preset: base}\n")
    assert main([str(tmp_path / "base.yaml"), f"output_dir={out}", "activation_checkpointing=true",
                 "model.overrides={vision_pretrained: null, text_pretrained: null}", "model.tokenizer_texts=200",
                 "data.train=shapes:train:8", "data.validation=null", "data.num_workers=0", "batch_size=2",
                 "max_steps=2", "log_every=1", "progress=false", "optim.warmup_steps=0", "max_minutes=null",
                 "precision=no"]) == 0
    logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2] and all(r["loss"] == r["loss"] < 100 for r in logs)
    model = MMGPTModel.from_pretrained(out / "model")
    parts = {m.config.model_type: m.config for m in model.modules() if hasattr(m, "config") and m is not model}
    vit, gpt = parts["vit"], parts["gpt2"]
    assert (vit.hidden_size, vit.num_hidden_layers, vit.patch_size, vit.image_size) == (768, 12, 16, 224)
    assert (gpt.n_embd, gpt.n_layer, gpt.add_cross_attention) == (768, 12, True)
    assert model.config.text_pretrained is None and model.config.vision_pretrained is None


def test_muon_is_allowed_under_fsdp2_and_refused_under_fsdp1(tmp_path):
    import types

    from accelerate.utils import DistributedType

    from train.config import load_config
    from train.loop import TrainingError, run_training

    cfg = load_config(None, ["optim.name=muon", f"output_dir={tmp_path}"])

    def fake(version):  # an accelerator that only says what launch it is
        plugin = types.SimpleNamespace(fsdp_version=version)
        return types.SimpleNamespace(distributed_type=DistributedType.FSDP, state=types.SimpleNamespace(fsdp_plugin=plugin))

    with pytest.raises(TrainingError, match="FSDP shards them into flat partitions"):
        run_training(cfg, accelerator=fake(1))
    with pytest.raises(AttributeError, match="project_configuration"):  # past the check: the fake has no more
        run_training(cfg, accelerator=fake(2))
