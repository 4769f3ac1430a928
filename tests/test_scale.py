"""Scale (issue 24): evaluation shared over processes, weighted mixtures of sources with exact resume,
Muon on sharded parameters. Processes are started with `accelerate launch` on the CPU (gloo)."""

from __future__ import annotations

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
           "--main_process_port", "0", *extra, str(ROOT / "tests" / script), *map(str, args)]
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
