"""Variants of the shapes demo recipe, several trained at once, each evaluated on the test split.

    python -m benchmarks.recipe_sweep VARIANTS.yaml [--parallel 10] [--seconds 440] [--out DIR]
    python -m benchmarks.recipe_sweep VARIANTS.yaml --cpu-cost      # ms per step of each on this CPU

VARIANTS.yaml maps a name to the overrides of `mmgpt demo` (`configs/train/shapes-tiny.yaml`), e.g.
``lr1e3: [max_steps=960, optim.lr=1.0e-3]``. Each variant trains with a step budget instead of the
demo's minutes (``max_minutes=null time_schedule=false``: the cosine follows ``max_steps``, so runs on
a fast GPU are step-for-step the CPU demo's), in fp32, on the GPU when there is one, in its own process;
``--parallel`` of them share the machine (the tiny model leaves a GPU mostly idle, so 10-12 at once
cost little more than one). Each writes one JSON line to ``OUT/results.jsonl`` as it finishes: the demo's
test metrics (300 test images; COCO scorers skipped), steps, seconds, parameter count and the last
training losses; the table at the end has one row per variant. Runs still going at ``--seconds`` are
stopped and reported as such.

``--cpu-cost`` times steps 10-40 of each variant on this machine's CPU, one after another, and prints
how many steps the demo's 8 minutes give it: the step count to give that variant in a GPU sweep so
that it is compared with the others at equal CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXED = ["max_minutes=null", "time_schedule=false", "precision=no", "progress=false", "log_every=50"]


def load_variants(path: str | Path) -> dict[str, list[str]]:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict) or not data:
        raise SystemExit(f"{path}: expected a mapping of variant name -> list of overrides")
    bad = [k for k, v in data.items() if not isinstance(v, list) or not all(isinstance(o, str) for o in v)]
    if bad:
        raise SystemExit(f"{path}: variant {bad[0]!r} must be a list of 'key.sub=value' strings")
    return {str(k): list(v) for k, v in data.items()}


def run_one(name: str, out: Path, overrides: list[str], test_images: int) -> dict:
    """Train one variant into `out`, evaluate it on the shapes test split, write out/result.json."""
    import torch

    torch.set_num_threads(1)  # the processes share the CPU; the GPU does the math
    from train.config import load_config
    from train.demo import DEMO_CONFIG, evaluate_on_shapes_test
    from train.loop import run_training

    cfg = load_config(DEMO_CONFIG, [f"output_dir={out}", *FIXED, "data.eval_images=50", *overrides])
    t0 = time.time()
    summary = run_training(cfg)
    train_s = time.time() - t0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, result = evaluate_on_shapes_test(summary["model_dir"], test_images, device=device, caption_scorers=(),
                                            batch_size=128)
    metrics = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics.update(name=name, overrides=overrides, steps=summary["step"], train_s=round(train_s, 1),
                   device=device, n_params=sum(p.numel() for p in model.parameters()),
                   last_train=[r for r in logs if "loss" in r][-1:])
    (out / "result.json").write_text(json.dumps(metrics))
    return metrics


def row(r: dict) -> str:
    if "error" in r:
        last = (r["error"].strip().splitlines() or ["(no output)"])[-1]
        return f"| {r['name']} | error: {last[:80]} |"

    def g(key):
        v = r.get(key)
        return "-" if v is None else f"{v:.3f}"

    em = "/".join(g(f"caption_exact_match/{n}_objects") for n in (1, 2, 3))
    return (f"| {r['name']} | {r['steps']} | {g('caption_exact_match')} | {em} | {g('vqa_accuracy')} | "
            f"{g('vqa_accuracy/shape')} | {g('retrieval_i2t_r1')} | {r['train_s']:.0f} |")


HEADER = ("| variant | steps | caption EM | EM 1/2/3 objects | VQA | shape Q | i2t R@1 | train s |\n"
          "|---|---|---|---|---|---|---|---|")


def sweep(variants: dict[str, list[str]], out: Path, parallel: int, seconds: float, test_images: int) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    todo = list(variants.items())
    running: dict[str, tuple] = {}
    results: list[dict] = []
    deadline = time.time() + seconds
    while (todo or running) and time.time() < deadline:
        while todo and len(running) < parallel:
            name, overrides = todo.pop(0)
            work = out / "runs" / name
            work.mkdir(parents=True, exist_ok=True)
            log = open(work / "log.txt", "w")  # noqa: SIM115 -- closed when the run ends
            cmd = [sys.executable, "-m", "benchmarks.recipe_sweep", "--one", name, str(work), str(test_images),
                   *overrides]
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            running[name] = (proc, work, log)
        for name, (proc, work, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            log.close()
            done = work / "result.json"
            r = json.loads(done.read_text()) if done.exists() else {"name": name,
                                                                      "error": (work / "log.txt").read_text()[-2000:]}
            results.append(r)
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")
            print(row(r), flush=True)
        time.sleep(0.5)
    for name, (proc, work, log) in running.items():
        proc.kill()
        log.close()
        print(f"| {name} | stopped at --seconds {seconds:.0f} |", flush=True)
    print("\n" + HEADER)
    for r in results:
        print(row(r))
    return results


def cpu_cost(variants: dict[str, list[str]], minutes: float = 8.0) -> dict[str, float]:
    """Seconds per step (steps 10-40, this machine's CPU, its default threads) of each variant."""
    costs = {}
    for name, overrides in variants.items():
        overrides = [o for o in overrides if not o.startswith("max_steps=")]
        work = Path(os.environ.get("TMPDIR", "/tmp")) / "recipe_sweep_cpu" / name
        shutil.rmtree(work, ignore_errors=True)  # metrics.jsonl appends: start clean
        code = ("import sys; from train.config import load_config; from train.demo import DEMO_CONFIG; "
                "from train.loop import run_training; "
                "run_training(load_config(DEMO_CONFIG, sys.argv[1:]))")
        subprocess.run([sys.executable, "-c", code, f"output_dir={work}", *FIXED, "log_every=10",
                        "data.validation=null", "max_steps=40", *overrides],
                       cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, check=True)
        logs = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if line.strip()]
        at = {r["step"]: r["elapsed_s"] for r in logs if "elapsed_s" in r}
        costs[name] = (at[40] - at[10]) / 30
        print(f"{name:16s} {costs[name] * 1000:7.1f} ms/step -> {minutes * 60 / costs[name]:6.0f} steps in "
              f"{minutes:g} minutes", flush=True)
    return costs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--one":
        name, work, test_images, *overrides = argv[1:]
        run_one(name, Path(work), overrides, int(test_images))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipe_sweep", description=__doc__.split("\n")[0])
    parser.add_argument("variants", help="YAML: variant name -> list of demo overrides (with max_steps=N)")
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=440, help="stop what still runs after this long")
    parser.add_argument("--test-images", type=int, default=300)
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/recipe-sweep"))
    parser.add_argument("--cpu-cost", action="store_true", help="time each variant's CPU step instead")
    args = parser.parse_args(argv)
    variants = load_variants(args.variants)
    if args.cpu_cost:
        cpu_cost(variants)
    else:
        sweep(variants, Path(args.out), args.parallel, args.seconds, args.test_images)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
