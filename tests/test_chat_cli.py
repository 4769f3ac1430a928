"""`mmgpt chat`: piped input (one turn per line) against `vl.chat` on the same conversation, /image and
/reset, one-line errors with exit status 2, and an interactive session through a pseudo-terminal
(readline's history included).

The model is the tiny preset with room for 4 images, trained on the spot (~5 s) on two 2-turn
conversations, so its answers are words that depend on the image and on the turn: red circle ->
"it is red" then "a circle", blue square -> "it is blue" then "a square".
"""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from mmgpt import build_model
from mmgpt.api import load
from mmgpt.cli import main
from mmgpt.config import MMGPTConfig
from mmgpt.processor import image_slots

ROOT = Path(__file__).resolve().parent.parent
WORLD = [((220, 40, 40), "circle", "red"), ((40, 80, 220), "square", "blue")]  # (fill, shape, colour)
Q1, Q2 = "what color is it?", "what shape is it?"
ANSWERS = {"red": ("it is red", "a circle"), "blue": ("it is blue", "a square")}  # to Q1 and Q2: several words

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def draw(color, shape) -> Image.Image:
    im = Image.new("RGB", (64, 64), (235, 235, 235))
    d = ImageDraw.Draw(im)
    (d.ellipse if shape == "circle" else d.rectangle)((12, 12, 52, 52), fill=color)
    return im


def conversation(first: str, second: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q1}]},
        {"role": "assistant", "content": [{"type": "text", "text": first}]},
        {"role": "user", "content": [{"type": "text", "text": Q2}]},
        {"role": "assistant", "content": [{"type": "text", "text": second}]},
    ]


def train_chat_model(folder: Path) -> Path:
    """The tiny preset (4 images, 128 positions) trained on the two conversations of WORLD; saved in `folder`.
    Also the chat model of tests/test_serve_browser.py."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster than two fighting over 2 cores
    try:
        torch.manual_seed(0)
        cfg = MMGPTConfig.from_preset("tiny", max_images=4, text={"n_positions": 128})
        model, proc = build_model(cfg, texts=[f"{Q1} {Q2} {a} {b}" for a, b in ANSWERS.values()])
        enc = [proc.encode_conversation(conversation(*ANSWERS[c])) for _, _, c in WORLD]
        ids = proc.pad([e[0] for e in enc])  # (2, T)
        labels = proc.pad([e[1] for e in enc], value=-100)  # (2, T): the assistant turns only
        mask = proc.pad([[1] * len(e[0]) for e in enc], value=0)
        pixels = proc.images([draw(f, s) for f, s, _ in WORLD])  # (2, 3, 64, 64)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(40):
            out = model(pixel_values=pixels, image_slots=image_slots([1, 1]), input_ids=ids, attention_mask=mask,
                        labels=labels, compute_itc=False)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        assert out.loss.item() < 0.2, out.loss.item()
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return train_chat_model(tmp_path_factory.mktemp("chat-model"))


@pytest.fixture(scope="module")
def vl(model_dir):
    return load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("chat-images")
    paths = {}
    for fill, shape, color in WORLD:
        paths[color] = str(folder / f"{color}.png")
        draw(fill, shape).save(paths[color])
    return paths


def piped(capsys, monkeypatch, stdin: str | bytes, *argv) -> tuple[int, str, str]:
    stream = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8") if isinstance(stdin, bytes) else io.StringIO(stdin)
    monkeypatch.setattr(sys, "stdin", stream)
    rc = main(["chat", *map(str, argv), "--device", "cpu"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def user(text: str, *images) -> dict:
    return {"role": "user", "content": [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]}


def answers_of(vl, turns: list[dict]) -> list[str]:
    """vl.chat on each prefix of a conversation of user turns, each answer appended as it comes."""
    msgs, out = [], []
    for turn in turns:
        msgs.append(turn)
        out.append(vl.chat(msgs, num_beams=1))
        msgs.append({"role": "assistant", "content": out[-1]})
    return out


def test_piped_lines_are_turns_answered_as_vl_chat(capsys, monkeypatch, model_dir, vl, images):
    rc, out, err = piped(capsys, monkeypatch, f"{Q1}\n{Q2}\n", model_dir, images["red"])
    assert rc == 0 and err == ""
    expected = answers_of(vl, [user(Q1, images["red"]), user(Q2)])
    assert out.splitlines() == expected == list(ANSWERS["red"])

    rc, out, _ = piped(capsys, monkeypatch, f"\n{Q1}\n\n{Q2}\n", model_dir, images["blue"])  # blank lines skipped
    assert rc == 0 and out.splitlines() == list(ANSWERS["blue"])

    # --system opens the conversation; --max-new-tokens is passed on
    rc, out, _ = piped(capsys, monkeypatch, f"{Q2}\n", model_dir, images["blue"], "--system", "be brief",
                       "--max-new-tokens", "1")
    system = {"role": "system", "content": "be brief"}
    assert rc == 0 and out.splitlines() == [vl.chat([system, user(Q2, images["blue"])], max_new_tokens=1)]

    # bytes that are not UTF-8 are read as U+FFFD, not a traceback
    rc, out, err = piped(capsys, monkeypatch, b"what color\xff is it?\n", model_dir, images["red"])
    assert rc == 0 and err == ""
    assert out.splitlines() == [vl.chat([user("what color\ufffd is it?", images["red"])], num_beams=1)]

    # --temperature samples, --seed makes it reproducible: as vl.chat sampling from the same seed
    rc, out, _ = piped(capsys, monkeypatch, f"{Q1}\n", model_dir, images["red"], "--temperature", "5", "--seed", "3")
    torch.manual_seed(3)
    sampled = vl.chat([user(Q1, images["red"])], do_sample=True, temperature=5.0, num_beams=1)
    assert rc == 0 and out == sampled.replace("\r", " ").replace("\n", " ") + "\n"
    assert sampled != ANSWERS["red"][0]  # it did sample


def test_piped_image_and_reset(capsys, monkeypatch, model_dir, vl, images):
    red, blue = images["red"], images["blue"]
    script = f"{Q1}\n/reset\n/image {blue}\n{Q1}\n{Q2}\n/image '{red}'\n{Q1}\n/quit\n{Q2}\n"
    rc, out, err = piped(capsys, monkeypatch, script, model_dir, red)
    assert rc == 0 and err == ""
    # /reset forgets the first turn and its image; the second image joins the turn after /image
    expected = answers_of(vl, [user(Q1, red)]) + answers_of(vl, [user(Q1, blue), user(Q2), user(Q1, red)])
    assert out.splitlines() == expected  # and nothing after /quit
    assert expected[:3] == [ANSWERS["red"][0], *ANSWERS["blue"]]

    # several paths in one /image (quoted as a shell would), before the first question
    rc, out, _ = piped(capsys, monkeypatch, f'/image "{blue}" {red}\n{Q1}\n', model_dir)
    assert rc == 0 and out.splitlines() == answers_of(vl, [user(Q1, blue, red)])


def test_piped_mistakes_are_one_line_and_exit_2(capsys, monkeypatch, model_dir, images, tmp_path):
    missing = tmp_path / "missing.png"
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    cases = [
        # (stdin, images on the command line, what the one stderr line says, answers printed before it)
        (f"{Q1}\n", [missing], f"{missing}: file not found", []),
        (f"{Q1}\n", [corrupt], f"{corrupt}: ", []),
        (f"{Q1}\n", [], "no image in the conversation yet: add one with /image PATH", []),
        (f"{Q1}\n/image {missing}\n{Q2}\n", [images["red"]], f"{missing}: file not found", [ANSWERS["red"][0]]),
        (f"{Q1}\n/reset\n{Q2}\n", [images["red"]], "no image in the conversation", [ANSWERS["red"][0]]),
        ("/image\n", [], "/image needs a path", []),
        ("/image 'unclosed\n", [], "No closing quotation", []),
        ("/colour red\n", [images["red"]], "/colour: unknown command; the commands are /image, /reset, /quit", []),
        (f"/image {images['red']} {images['blue']} {images['red']}\n", [images["blue"], images["red"]],
         "this model reads at most 4 images in a conversation (config.max_images)", []),
    ]
    for stdin, argv, message, answers in cases:
        rc, out, err = piped(capsys, monkeypatch, stdin, model_dir, *argv)
        assert rc == 2, (stdin, err)
        assert out.splitlines() == answers, (stdin, out)
        assert len(err.splitlines()) == 1 and err.startswith("mmgpt chat: error: ") and message in err, (stdin, err)
        assert "Traceback" not in err

    rc, out, err = piped(capsys, monkeypatch, f"{Q1}\n", model_dir, images["red"], "--temperature", "-1")
    assert rc == 2 and err == "mmgpt chat: error: --temperature must be >= 0, got -1.0\n"


# SIGINT back to its default first: an ignored signal stays ignored through exec, and a test earlier in the same
# pytest process may have left it ignored (then Python installs no KeyboardInterrupt handler and Ctrl-C is lost)
CONTROLLING_TTY = ("import fcntl, os, signal, sys, termios; signal.signal(signal.SIGINT, signal.SIG_DFL); os.setsid(); "
                   "fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execv(sys.argv[1], sys.argv[1:])")


class Terminal:
    """A child process on a pseudo-terminal: type lines, wait for text to appear."""

    def __init__(self, argv: list[str], env: dict):
        self.fd, child = pty.openpty()
        # a session of its own whose controlling terminal is the pty, so that Ctrl-C there is SIGINT
        self.proc = subprocess.Popen([sys.executable, "-c", CONTROLLING_TTY, *argv], stdin=child, stdout=child,
                                     stderr=child, env=env, cwd=ROOT)
        os.close(child)
        self.seen = ""

    def expect(self, text: str, timeout: float = 60) -> str:
        """Wait until `text` appears after what was already matched; return what came before it."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"no {text!r} within {timeout} s; the terminal shows {self.seen!r}")
            try:
                self.seen += os.read(self.fd, 4096).decode("utf-8", "replace").replace("\r", "")
            except OSError:  # the child closed the terminal
                raise AssertionError(f"the program ended before {text!r}; the terminal shows {self.seen!r}") from None
        before, _, self.seen = self.seen.partition(text)
        return before

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            os.close(self.fd)


def test_interactive_session_in_a_pseudo_terminal(model_dir, vl, images, tmp_path):
    env = {**os.environ, "TERM": "xterm", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "HOME": str(tmp_path)}  # readline reads ~/.inputrc: none here
    term = Terminal([sys.executable, "-m", "mmgpt.cli", "chat", str(model_dir), images["red"], "--device", "cpu"],
                    env)
    try:
        term.expect("1 image for your first question", timeout=180)  # the model loads (slow on a busy machine)
        term.expect("> ")
        term.type(Q1 + "\n")
        assert term.expect("> ").split("\n")[-2] == ANSWERS["red"][0]  # the line after the echoed question
        term.type("/image " + str(tmp_path / "nope.png") + "\n")
        assert f"mmgpt chat: {tmp_path / 'nope.png'}: file not found" in term.expect("> ")
        term.type(Q2 + "\n")  # the conversation went on
        assert term.expect("> ").split("\n")[-2] == ANSWERS["red"][1]
        term.type("\x1b[A" * 3 + "\n")  # readline's history: up 3 times (past /image) is the first question
        third = answers_of(vl, [user(Q1, images["red"]), user(Q2), user(Q1)])[-1]
        assert term.expect("> ").split("\n")[-2] == third
        term.type("/reset\n")
        assert "conversation cleared" in term.expect("> ")
        term.type(Q1 + "\n")
        assert "mmgpt chat: no image in the conversation yet" in term.expect("> ")
        term.type(f"/image {images['blue']}\n{Q1}\n")
        term.expect("(image 1: ")
        term.expect("> ")
        assert term.expect("> ").split("\n")[-2] == ANSWERS["blue"][0]
        # Ctrl-C at the prompt: a fresh prompt, the conversation goes on. Typed once readline echoed the half
        # line, as a person would: a SIGINT between readline's prompt and its select() waits for the next key
        # (CPython's readline checks signals only when select() is interrupted), and the ^C flushed that key
        term.type("half a questi")
        term.expect("half a questi")
        term.type("\x03")
        term.expect("> ")
        term.type(Q2 + "\n")
        assert term.expect("> ").split("\n")[-2] == ANSWERS["blue"][1]
        term.type("\x04")  # Ctrl-D ends
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
