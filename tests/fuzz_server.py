"""`make fuzz`: schemathesis (`--checks all`) against a live `mmgpt serve`, bounded in time.

    python tests/fuzz_server.py                  # an untrained tiny model built on the spot, 60 s
    python tests/fuzz_server.py --max-time 300 --model runs/shapes/final

Starts the server in its own process on a free loopback port, runs schemathesis against its OpenAPI
schema (every phase: examples, coverage, fuzzing, stateful) and exits with schemathesis' status: 0 only
with no server error (5xx) and no response outside the schema. The configuration beside this file
(schemathesis.toml) says which statuses valid-looking data may get: a body the schema allows can still
carry base64 that is not an image (415), more pixels than a request may decode (413) or a question
longer than the model reads (422); JSON Schema cannot say these, the schema documents them.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(folder: Path) -> Path:
    import torch

    from mmgpt import build_model

    torch.manual_seed(0)
    model, proc = build_model("tiny", texts=["a red circle", "a blue square", "question: what color? answer: red"])
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder (default: an untrained tiny model built on the spot)")
    ap.add_argument("--max-time", type=int, default=60, help="seconds of fuzzing (default: 60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exclude-path-regex", help="leave out the routes whose path matches (e.g. '^/v1/(chat|models)')")
    args = ap.parse_args(argv)
    bin_dir = Path(sys.executable).parent
    schemathesis = bin_dir / "schemathesis"
    if not schemathesis.exists():
        print("fuzz: schemathesis is not installed (pip install -e '.[dev]')", file=sys.stderr)
        return 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_model(Path(tmp) / "tiny"))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(Path(tmp) / "server.log", "w")  # noqa: SIM115 - closed with the folder
        server = subprocess.Popen(
            [sys.executable, "-c", "import sys; from mmgpt.cli import main; sys.exit(main())", "serve", model,
             "--port", str(port), "--device", "cpu", "--timeout", "10"],
            env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 300
            while True:
                if server.poll() is not None:
                    print((Path(tmp) / "server.log").read_text()[-3000:], file=sys.stderr)
                    return 2
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    print("fuzz: the server did not start within 300 s", file=sys.stderr)
                    return 2
                time.sleep(0.2)
            cmd = [str(schemathesis), "--config-file", str(HERE / "schemathesis.toml"), "run",
                   f"{base}/openapi.json", "--checks", "all", "--max-time", str(args.max_time), "--workers", "2",
                   "--seed", str(args.seed), "--request-timeout", "20", "--no-color"]
            if args.exclude_path_regex:
                cmd += ["--exclude-path-regex", args.exclude_path_regex]
            print(" ".join(cmd), flush=True)
            rc = subprocess.run(cmd, env=env, check=False).returncode
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()
        errors = [line for line in (Path(tmp) / "server.log").read_text().splitlines() if "Traceback" in line]
        if errors:
            print(f"fuzz: the server logged {len(errors)} tracebacks:\n"
                  + (Path(tmp) / "server.log").read_text()[-3000:], file=sys.stderr)
            rc = rc or 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
