"""`mmgpt chat MODEL [IMAGE ...]`: a conversation with a model in the terminal.

Each line is a user turn; the answer streams in as it is generated, and every turn is sent with the
whole conversation (`vl.stream_chat`), whose kept state makes a follow-up cost only its own tokens.
The images named on the command line join the first user turn; `/image PATH ...` adds images to the
next one; `/reset` starts over with an empty conversation; `/quit` (or end of input) ends.

At a terminal the line is edited with `readline` (history, Tab completes commands and paths) and a
mistake (a bad image, a turn without any image) is one line on stderr, after which the conversation
goes on; Ctrl-C stops an answer. When stdin is not a terminal, each input line is a user turn and
each answer one line of stdout, and the first mistake ends the run with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import threading
from dataclasses import dataclass, field

from mmgpt.commands.use import _add_common, _load_pipeline, _positive, quiet

COMMANDS = {
    "/image": "/image PATH ...  add images to your next question",
    "/reset": "/reset           start over (forget the conversation and its images)",
    "/quit": "/quit            end (or Ctrl-D)",
    "/help": "/help            this list",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files; they join the first question")
    parser.add_argument("--system", metavar="TEXT", help="a system message that opens the conversation")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="longest answer (default: the model's generation_config, else 32)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="sample at this temperature (default: 0, greedy)")
    parser.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling (with --temperature)")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="seed the sampler")


class _Stop:
    """A stopping criterion for generate(): ends the answer once `event` is set (Ctrl-C)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TurnError(Exception):
    """A mistake in one turn (bad image, no image, a refused conversation): one line, then go on."""

    def __str__(self) -> str:
        return " ".join(super().__str__().split())


@dataclass
class Conversation:
    """The turns so far and the images waiting for the next user turn."""

    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    pending: list = field(default_factory=list)  # PIL images for the next user turn
    images: int = 0  # images in `messages`

    def reset(self) -> None:
        self.messages, self.pending, self.images = [], [], 0

    def ask(self, text: str) -> list[dict]:
        """The messages to send for the user turn `text` (nothing is kept until `answered`)."""
        if self.images + len(self.pending) == 0:
            raise TurnError("no image in the conversation yet: add one with /image PATH")
        head = [{"role": "system", "content": self.system}] if self.system and not self.messages else []
        parts = [{"type": "image", "image": im} for im in self.pending] + [{"type": "text", "text": text}]
        return head + self.messages + [{"role": "user", "content": parts}]

    def answered(self, sent: list[dict], answer: str) -> None:
        self.messages = sent + [{"role": "assistant", "content": answer}]
        self.images += len(self.pending)
        self.pending = []


def _gen_options(args) -> dict:
    from mmgpt.cli import UserError

    gen: dict = {"num_beams": 1}  # streaming is greedy or sampled, never beam search
    if args.max_new_tokens is not None:
        _positive("--max-new-tokens", args.max_new_tokens)
        gen["max_new_tokens"] = args.max_new_tokens
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.temperature > 0:
        gen.update(do_sample=True, temperature=args.temperature)
        if args.top_p is not None:
            gen["top_p"] = args.top_p
    elif args.top_p is not None:
        raise UserError("--top-p samples: give a --temperature above 0 with it")
    return gen


class Chat:
    """One terminal conversation: reads commands and questions, prints answers."""

    def __init__(self, vl, gen: dict, interactive: bool, system: str | None = None):
        self.vl, self.gen, self.interactive = vl, gen, interactive
        self.conv = Conversation(system=system)
        model = getattr(vl, "model", None)
        config = getattr(model, "config", None)
        # cross-attention reads at most config.max_images images; prefix models are bounded by their context
        self.max_images = None if getattr(model, "uses_prefix", True) else getattr(config, "max_images", None)

    def note(self, text: str) -> None:
        if self.interactive:
            print(text, file=sys.stderr, flush=True)

    # --- commands --------------------------------------------------------------------------------

    def add_images(self, paths: list[str]) -> None:
        """Read each image now, so a bad path is named at once; the good ones wait for the next turn."""
        from encoders import ImageLoadError, load_image

        if not paths:
            raise TurnError("/image needs a path: /image PATH ...")
        for path in paths:
            path = os.path.expanduser(path)
            count = self.conv.images + len(self.conv.pending)
            if self.max_images is not None and count >= self.max_images:
                raise TurnError(f"{path}: this model reads at most {self.max_images} images in a conversation "
                                f"(config.max_images); /reset to start over")
            try:
                image = load_image(path)
            except ImageLoadError as err:
                raise TurnError(str(err)) from None
            self.conv.pending.append(image)
            self.note(f"(image {count + 1}: {path})")

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, rest = line.partition(" ")
        if name == "/quit":
            return False
        if name == "/reset":
            self.conv.reset()
            self.note("(conversation cleared; add an image with /image PATH)")
        elif name == "/image":
            try:
                paths = shlex.split(rest)
            except ValueError as err:  # an unbalanced quote
                raise TurnError(f"/image {rest.strip()}: {err}") from None
            self.add_images(paths)
        elif name == "/help":
            self.note("\n".join(COMMANDS.values()))
        else:
            raise TurnError(f"{name}: unknown command; the commands are {', '.join(COMMANDS)}")
        return True

    # --- turns -----------------------------------------------------------------------------------

    def turn(self, text: str) -> None:
        """Send the conversation with the user turn `text`; print the answer as it streams in."""
        sent = self.conv.ask(text)
        before = set(threading.enumerate())
        stop = threading.Event()
        gen = dict(self.gen)
        if self.interactive:
            from transformers import StoppingCriteriaList

            gen["stopping_criteria"] = StoppingCriteriaList([_Stop(stop)])
        answer = ""
        try:
            for piece in self.vl.stream_chat(sent, **gen):
                answer += piece
                print(piece.replace("\r", " ").replace("\n", " "), end="", flush=True)
        except ValueError as err:  # the model refused the conversation (too many images, too long, ...)
            if answer:
                print(flush=True)
            raise TurnError(str(err)) from None
        except KeyboardInterrupt:
            stop.set()  # ends generate() at its next token; wait for it before the next turn starts
            for worker in set(threading.enumerate()) - before:
                worker.join(timeout=30)
            print(" [stopped]", flush=True)
            return
        print(flush=True)
        self.conv.answered(sent, answer)

    def line(self, line: str) -> bool:
        """One input line (a command or a question); False means quit."""
        line = line.encode("utf-8", "replace").decode("utf-8").strip()  # lone surrogates (undecodable bytes): '?'
        if not line:
            return True
        if line.startswith("/"):
            return self.command(line)
        self.turn(line)
        return True


# --- terminal --------------------------------------------------------------------------------------


def _complete(text: str, state: int):
    """readline completion: the commands, and paths after /image."""
    import glob
    import readline

    buffer = readline.get_line_buffer()
    if buffer.startswith("/image "):
        options = [p + ("/" if os.path.isdir(p) else "") for p in glob.glob(os.path.expanduser(text) + "*")]
    elif buffer.startswith("/") and " " not in buffer:
        options = [c + " " for c in COMMANDS if c.startswith(text)]
    else:
        options = []
    return sorted(options)[state] if state < len(options) else None


def _setup_readline() -> None:
    try:
        import readline  # imported for its side effect: input() edits lines and keeps history
    except ImportError:  # e.g. Windows without pyreadline: plain input()
        return
    readline.set_completer_delims(" \t\n")
    readline.set_completer(_complete)
    readline.parse_and_bind("tab: complete")


def _interactive(chat: Chat, args) -> int:
    _setup_readline()
    for path in args.images:
        try:
            chat.add_images([path])
        except TurnError as err:
            print(f"mmgpt chat: {err}", file=sys.stderr, flush=True)
    n = len(chat.conv.pending)
    have = f"{n} image{'s' * (n != 1)} for your first question" if n else "no image yet: add one with /image PATH"
    chat.note(f"mmgpt chat · {args.model} · {have}. /help lists the commands, /quit or Ctrl-D ends.")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as a shell does
            print(file=sys.stderr)
            continue
        try:
            if not chat.line(line):
                return 0
        except TurnError as err:
            print(f"mmgpt chat: {err}", file=sys.stderr, flush=True)


def _piped(chat: Chat, args) -> int:
    from mmgpt.cli import UserError

    try:
        if args.images:
            chat.add_images(args.images)
        for line in sys.stdin:
            if not chat.line(line):
                break
    except TurnError as err:
        raise UserError(str(err)) from None
    return 0


def _warn_in_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for the terminal: the message (e.g. an answer cut to the decoder's room), no source."""
    print(f"mmgpt chat: {message}", file=sys.stderr, flush=True)


@quiet
def run(args) -> int:
    import warnings

    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not text in the input's encoding become U+FFFD
        sys.stdin.reconfigure(errors="replace")
    gen = _gen_options(args)  # a bad option is reported before the model loads
    vl = _load_pipeline(args)
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    chat = Chat(vl, gen, interactive, system=args.system)
    shown = warnings.showwarning
    warnings.showwarning = _warn_in_one_line
    try:
        return _interactive(chat, args) if interactive else _piped(chat, args)
    finally:
        warnings.showwarning = shown
