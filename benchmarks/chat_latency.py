"""Chat latency through the OpenAI-compatible API of `mmgpt serve`: time to first token and tokens/s of a
streamed chat turn (the unmodified `openai` client), and what a follow-up turn costs next to the first
(`vl.chat` with the past kept: `vl.chats.last.reused_tokens`, images encoded again, seconds) and next to the
same follow-up with nothing kept. Prints markdown tables; exits 1 when the follow-up's prompt costs more than
the first turn's (10% allowed for noise) or reuses nothing.

    python -m benchmarks.chat_latency                          # an untrained tiny model built on the spot
    python -m benchmarks.chat_latency --model runs/shapes/final --repeats 10 --max-tokens 32

The server runs in a thread of this process and the client in its main thread, so both share the cores.
An untrained model never ends its answer, so every turn generates exactly --max-tokens tokens.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
import time

import torch
from PIL import Image, ImageDraw

from mmgpt.api import load
from mmgpt.serve import create_app
from mmgpt.serve.server import background

QUESTIONS = ["what color is the circle?", "how many objects are there?", "what shape is it?"]


def shapes_image(color, size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size), (235, 235, 235))
    ImageDraw.Draw(im).ellipse((size // 5, size // 5, size - size // 5, size - size // 5), fill=color)
    ImageDraw.Draw(im).rectangle((4, 4, size // 4, size // 4), fill=(40, 80, 220))
    return im


def data_url(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def tiny_model(folder: str) -> str:
    """An untrained tiny model whose weights are jittered until its greedy answer is words: an untrained tiny
    decoder repeats one character, which transformers' TextIteratorStreamer (it sends text up to the last
    space) would deliver in one piece at the end, and time to first token would be the whole answer's."""
    from mmgpt import build_model
    from mmgpt.api import VisionLanguagePipeline
    from mmgpt.config import MMGPTConfig

    texts = ["a red circle", "a blue square", "what color is the circle? red", "how many objects are there? two"]
    conv = [{"role": "user", "content": [{"type": "image", "image": shapes_image((220, 40, 40))},
                                         {"type": "text", "text": QUESTIONS[0]}]}]
    for seed in range(64):
        torch.manual_seed(seed)
        model, proc = build_model(MMGPTConfig.from_preset("tiny", max_images=4, text={"n_positions": 256}), texts=texts)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        answer = VisionLanguagePipeline(model, proc, device="cpu").chat(conv, max_new_tokens=32)
        if answer.count(" ") >= 6:
            break
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def streamed_turn(client, messages: list, max_tokens: int) -> dict:
    """One streamed turn: seconds to the first content, decode tokens/s after it, the usage chunk."""
    start = time.perf_counter()
    first = last = None
    usage = None
    for chunk in client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}, temperature=0):
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or now
            last = now
        if chunk.usage is not None:
            usage = chunk.usage
    tokens = usage.completion_tokens
    decode = (last - first) if first and last and last > first else float("nan")
    return {"ttft_s": (first or time.perf_counter()) - start, "tokens": tokens,
            "tokens_per_s": (tokens - 1) / decode if tokens > 1 else float("nan"),
            "total_s": time.perf_counter() - start, "cached": usage.prompt_tokens_details.cached_tokens,
            "prompt": usage.prompt_tokens}


def timed_chat(vl, messages: list, max_tokens: int) -> tuple[float, object]:
    start = time.perf_counter()
    vl.chat(messages, max_new_tokens=max_tokens, do_sample=False)
    return time.perf_counter() - start, vl.chats.last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder (default: an untrained tiny model built on the spot)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        from openai import OpenAI
    except ImportError:
        print("chat_latency needs the openai client: pip install -e '.[dev]'", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or tiny_model(tmp)
        vl = load(folder, device=args.device)
        what = args.model or ("an untrained tiny model (configs/model/tiny.json, 256 positions, random weights "
                                   "jittered until its answers have spaces)")
        app = create_app(vl, max_wait_ms=0)
        rows = []
        with background(app) as url:
            client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
            image = data_url(shapes_image((220, 40, 40)))
            first_msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                       {"type": "text", "text": QUESTIONS[0]}]}]
            streamed_turn(client, first_msgs, args.max_tokens)  # warm-up: allocations, kernels
            firsts, follows = [], []
            for i in range(args.repeats):
                vl.chats.reset()  # the first turn starts from nothing kept
                msgs = [{**first_msgs[0], "content": [first_msgs[0]["content"][0],
                                                      {"type": "text", "text": f"{QUESTIONS[0]} ({i})"}]}]
                first = streamed_turn(client, msgs, args.max_tokens)
                answer = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                    model="m", messages=msgs, max_tokens=args.max_tokens, stream=True, temperature=0) if c.choices)
                msgs = [*msgs, {"role": "assistant", "content": answer}, {"role": "user", "content": QUESTIONS[1]}]
                firsts.append(first)
                follows.append(streamed_turn(client, msgs, args.max_tokens))
        for name, runs in (("first turn (streamed API)", firsts), ("follow-up turn (streamed API)", follows)):
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append(f"| {name} | {med['ttft_s'] * 1000:.1f} | {med['tokens_per_s']:.1f} | {med['tokens']:.0f} "
                        f"| {med['prompt']:.0f} | {med['cached']:.0f} |")

        # the follow-up's cost through vl.chat: kept past against nothing kept, whole turns and the prompt
        # alone (1 new token: what reusing the past saves, without the answer's decoding steps around it)
        pil = shapes_image((220, 40, 40))
        conv = [{"role": "user", "content": [{"type": "image", "image": pil}, {"type": "text", "text": QUESTIONS[0]}]}]
        timed_chat(vl, conv, args.max_tokens)  # warm-up
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeats):
            for n in (args.max_tokens, 1):
                vl.chats.reset()
                s, turn1 = timed_chat(vl, conv, n)
                times.setdefault(("first", n), []).append(s)
                if n == 1:
                    _, turn1 = timed_chat(vl, conv, args.max_tokens)  # the answer the follow-up repeats
                follow = [*conv, {"role": "assistant", "content": turn1.text},
                          {"role": "user", "content": QUESTIONS[1]}]
                s, kept = timed_chat(vl, follow, n)
                times.setdefault(("kept", n), []).append(s)
                vl.chats.reset()
                s, _ = timed_chat(vl, follow, n)
                times.setdefault(("cold", n), []).append(s)
            vl.chats.reset()
            _, turn1 = timed_chat(vl, conv, args.max_tokens)
            _, kept = timed_chat(vl, [*conv, {"role": "assistant", "content": turn1.text},
                                      {"role": "user", "content": QUESTIONS[1]}], args.max_tokens)

    def ms(key: str, n: int) -> str:
        return f"{statistics.median(times[(key, n)]) * 1000:.1f}"

    print(f"# chat latency: {what}; device {args.device}, {torch.get_num_threads()} torch threads, "
          f"{args.max_tokens} new tokens, median of {args.repeats}\n")
    print("| turn | time to first token (ms) | tokens/s after it | tokens | prompt tokens | cached tokens |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n| vl.chat turn | ms, {args.max_tokens} new tokens | ms, 1 new token | prompt tokens | reused tokens "
          "| images encoded |")
    print("|---|---|---|---|---|---|")
    print(f"| first | {ms('first', args.max_tokens)} | {ms('first', 1)} | {turn1.prompt_tokens} | {turn1.reused_tokens} "
          f"| {turn1.images_encoded} |")
    print(f"| follow-up, past kept | {ms('kept', args.max_tokens)} | {ms('kept', 1)} | {kept.prompt_tokens} "
          f"| {kept.reused_tokens} | {kept.images_encoded} |")
    print(f"| follow-up, nothing kept | {ms('cold', args.max_tokens)} | {ms('cold', 1)} | {kept.prompt_tokens} | 0 | "
          f"{turn1.images_encoded} |")
    # the answer's decoding steps are the same in both turns; what the follow-up adds is its prompt
    first_ms, kept_ms = (statistics.median(times[(k, 1)]) for k in ("first", "kept"))
    ok = kept.reused_tokens > 0 and kept.images_encoded == 0 and kept_ms <= first_ms * 1.10
    print(f"\nfollow-up with the past kept: {kept.reused_tokens} tokens reused, no image encoded again, its prompt "
          f"{kept_ms * 1000:.1f} ms against the first turn's {first_ms * 1000:.1f} ms: "
          f"{'costs no more than the first' if ok else 'COSTS MORE than the first'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
