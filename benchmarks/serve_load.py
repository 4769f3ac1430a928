"""Load test of `mmgpt serve` on a loopback port: requests/s and p50/p99 latency for 1, 8, 32, ...
concurrent clients, with dynamic batching on and off (max_batch_size=1). Every request must
succeed; the run fails otherwise. Prints a markdown table.

    python -m benchmarks.serve_load                       # an untrained tiny model built on the spot
    python -m benchmarks.serve_load --model runs/shapes/final --concurrency 1 8 32 --requests 128

The server runs in a thread of this process and the clients (httpx, asyncio) in its main thread,
so both share the machine's cores: figures compare settings on one machine, not machines.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import httpx
import torch
from PIL import Image, ImageDraw

from mmgpt.api import load
from mmgpt.serve import create_app
from mmgpt.serve.server import background, is_loopback

MODES = {"on": {"max_batch_size": 16, "max_wait_ms": 10.0}, "off": {"max_batch_size": 1, "max_wait_ms": 0.0}}
COLORS = [(220, 40, 40), (40, 80, 220), (40, 170, 60), (225, 200, 30)]


@dataclass
class Result:
    batching: str
    clients: int
    requests: int
    failed: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_batch: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def images() -> list[bytes]:
    out = []
    for color in COLORS:
        im = Image.new("RGB", (64, 64), (235, 235, 235))
        ImageDraw.Draw(im).ellipse((12, 12, 52, 52), fill=color)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def tiny_model_dir() -> str:
    from mmgpt import build_model

    folder = tempfile.mkdtemp(prefix="mmgpt-serve-load-")
    torch.manual_seed(0)
    model, proc = build_model("tiny", texts=["a red circle", "a blue square", "question: what color? answer: red"])
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


async def load_test(url: str, clients: int, requests: int, args) -> tuple[list[float], int, float]:
    """`clients` workers send `requests` requests in all, each as soon as its last one came back."""
    blobs = images()
    data = {"max_new_tokens": str(args.max_new_tokens)}
    if args.endpoint == "ask":
        data["question"] = "what color is it?"

    async def client(http: httpx.AsyncClient, todo, latencies: list[float]) -> int:
        failed = 0
        for i in todo:  # shared iterator: the workers share the requests out between them
            t0 = time.perf_counter()
            try:
                r = await http.post(f"/v1/{args.endpoint}", files={"images": blobs[i % len(blobs)]}, data=data)
                failed += r.status_code != 200
            except httpx.HTTPError:
                failed += 1
            latencies.append(time.perf_counter() - t0)
        return failed

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120, trust_env=False) as http:
        warm = iter(range(2 * clients))  # open the connections, run the first calls
        await asyncio.gather(*(client(http, warm, []) for _ in range(clients)))
        todo, latencies = iter(range(requests)), []
        t0 = time.perf_counter()
        failed = await asyncio.gather(*(client(http, todo, latencies) for _ in range(clients)))
        return latencies, sum(failed), time.perf_counter() - t0


def run(args) -> list[Result]:
    if not is_loopback(args.host):
        raise SystemExit(f"serve_load: --host {args.host} is not a loopback address")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    pipeline = load(args.model or tiny_model_dir(), device=args.device)
    results = []
    for mode in args.batching:
        app = create_app(pipeline, **MODES[mode], timeout_s=300)
        with background(app, host=args.host) as url:
            for clients in args.concurrency:
                before = (app.state.batcher.stats.batches, app.state.batcher.stats.items)
                latencies, failed, seconds = asyncio.run(load_test(url, clients, args.requests, args))
                batches = app.state.batcher.stats.batches - before[0]
                items = app.state.batcher.stats.items - before[1]
                q = statistics.quantiles(latencies, n=100, method="inclusive")
                results.append(Result(mode, clients, len(latencies), failed, seconds, 1000 * q[49], 1000 * q[98],
                                      items / max(batches, 1)))
                print(f"batching {mode}, {clients} clients: {results[-1].rps:.1f} req/s", file=sys.stderr, flush=True)
    return results


def table(results: list[Result]) -> str:
    rows = ["| batching | clients | requests | failed | req/s | p50 ms | p99 ms | mean batch |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| {r.batching} | {r.clients} | {r.requests} | {r.failed} | {r.rps:.1f} | {r.p50_ms:.0f} | "
                    f"{r.p99_ms:.0f} | {r.mean_batch:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: build an untrained tiny model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to serve on (default: 127.0.0.1)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], metavar="N")
    parser.add_argument("--requests", type=int, default=96, help="requests per measurement (default: 96)")
    parser.add_argument("--batching", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--endpoint", choices=["caption", "ask"], default="ask",
                        help="ask (default): an untrained model answers with all max_new_tokens tokens")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or args.requests < 2:
        parser.error("--concurrency must be >= 1 and --requests >= 2")

    results = run(args)
    print(f"\n{args.endpoint}, max_new_tokens={args.max_new_tokens}, device={args.device or 'auto'}, "
          f"torch threads={torch.get_num_threads()}\n")
    print(table(results))
    failed = sum(r.failed for r in results)
    assert failed == 0, f"{failed} requests failed"
    return 0


if __name__ == "__main__":
    sys.exit(main())
