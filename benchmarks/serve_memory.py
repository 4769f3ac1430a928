"""Peak memory of `mmgpt serve` for one request of large images: sixteen 4096 x 4096 PNGs (< 1 MB on
the wire: flat colour with a few shapes) sent to /v1/caption, the server's peak resident memory
(VmHWM) read from /proc before and after. The server runs in its own process (`mmgpt serve`), so
its figures are its own.

    python -m benchmarks.serve_memory                          # an untrained tiny model built on the spot
    python -m benchmarks.serve_memory --serve-args --max-request-pixels 268435456   # let the request in
    python -m benchmarks.serve_memory --source /tmp/old-checkout   # the server from another checkout

Linux only (/proc). Prints one markdown row and a JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

COLORS = [(220, 40, 40), (40, 80, 220), (40, 170, 60), (225, 200, 30)]


def big_pngs(n: int, side: int) -> list[bytes]:
    out = []
    for i in range(n):
        im = Image.new("RGB", (side, side), (235, 235, 235))
        draw = ImageDraw.Draw(im)
        k = side // 8
        draw.ellipse((k * (1 + i % 3), k, k * (4 + i % 3), k * 4), fill=COLORS[i % 4])
        draw.rectangle((k * 2, k * 5, k * 6, k * 7), fill=COLORS[(i + 1) % 4])
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
        out.append(buf.getvalue())
    return out


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


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
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument("--source", help="run the server from this checkout (put first on PYTHONPATH)")
    ap.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="passed on to mmgpt serve")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_model(Path(tmp) / "tiny"))
        blobs = big_pngs(args.images, args.side)
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        if args.source:  # (run from the temporary folder: `-c` puts the working folder first on the path)
            env["PYTHONPATH"] = os.pathsep.join([args.source, env.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-c", "import sys; from mmgpt.cli import main; sys.exit(main())", "serve", model,
               "--port", str(port), "--device", "cpu", *args.serve_args]
        server = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"the server ended: {server.stderr.read()[-2000:]}")
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not start within 120 s")
                time.sleep(0.2)
            before = memory_kb(server.pid)
            files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
            t0 = time.perf_counter()
            r = httpx.post(f"{base}/v1/caption", files=files, data={"max_new_tokens": "4"}, timeout=600)
            seconds = time.perf_counter() - t0
            after = memory_kb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
    result = {
        "images": f"{args.images} x {args.side}x{args.side} PNG", "wire_mb": round(sum(map(len, blobs)) / 2**20, 2),
        "status": r.status_code, "seconds": round(seconds, 2), "rss_before_mb": round(before["VmRSS"] / 1024),
        "peak_before_mb": round(before["VmHWM"] / 1024), "peak_after_mb": round(after["VmHWM"] / 1024),
        "peak_rise_mb": round((after["VmHWM"] - before["VmRSS"]) / 1024),
        "detail": r.json().get("detail") if r.status_code != 200 else None,
        "serve_args": " ".join(args.serve_args), "source": args.source or "this checkout",
    }
    print("| request | wire MB | status | s | RSS before MB | peak during MB | rise MB |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {result['images']} | {result['wire_mb']} | {result['status']} | {result['seconds']} | "
          f"{result['rss_before_mb']} | {result['peak_after_mb']} | {result['peak_rise_mb']} |")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
