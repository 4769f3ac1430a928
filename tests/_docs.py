"""Helpers for the tests that keep the documentation true (tests/test_guide.py, tests/test_readme.py):
fenced blocks, relative links and their anchors, and the `mmgpt` / `-m train` command lines of shell
blocks checked against the real argument parser and training config."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
ENDS = ("|", "||", "&&", ";")  # what ends one command of a shell line
LINK = re.compile(r"\]\(([^)\s]+)\)")


def fences(path: Path) -> list[tuple[int, str, str, str]]:
    """(line number, language, the rest of the info string, code) of every fenced block, in order."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2).strip(), m.group(3))
            for m in FENCE.finditer(text)]


def blocks(path: Path, lang: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block of this language, in order."""
    return [(line, code) for line, found, _, code in fences(path) if found == lang]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.MULTILINE)}


def broken_links(path: Path) -> list[str]:
    """Relative links (and #anchors) of a markdown file that point nowhere."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    bad = []
    for target in LINK.findall(text):
        if "://" in target or target.startswith("mailto:"):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            bad.append(target)
    return bad


def shell_lines(code: str) -> list[str]:
    """The logical lines of a shell block: continuations joined, comment-only and blank lines dropped."""
    lines = code.replace("\\\n", " ").splitlines()
    return [line for line in lines if line.strip() and not line.strip().startswith("#")]


def commands(code: str, program: str = "mmgpt") -> list[list[str]]:
    """The argument lists given to `program` (`mmgpt`, `.venv/bin/mmgpt`) in a shell block, one per call;
    a pipe, `&&` or `;` ends a call."""
    found = []
    for line in shell_lines(code):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        for i, word in enumerate(words):
            if word.rsplit("/", 1)[-1] == program and (i == 0 or "=" in words[i - 1] or words[i - 1] in ENDS):
                args = []
                for w in words[i + 1:]:
                    if w in ENDS or w in (">", "2>"):
                        break
                    args.append(w)
                found.append(args)
    return found


def train_calls(code: str) -> list[list[str]]:
    """`CONFIG key=value ...` of every `mmgpt train` and `... -m train` (accelerate launch) in a shell block."""
    calls = [args[1:] for args in commands(code) if args[:1] == ["train"]]
    for line in shell_lines(code):
        words = shlex.split(line, comments=True)
        for i in range(len(words) - 1):
            if words[i] == "-m" and words[i + 1] == "train":
                calls.append(words[i + 2:])
    return calls


def unknown_flags(args: list[str]) -> list[str]:
    """The `--flags` of one `mmgpt ...` call that its subcommand does not have. Placeholder syntax of
    usage lines (`[--num-beams K]`) is read too: brackets are dropped."""
    from mmgpt.cli import build_parser

    parser = build_parser()
    words = [w.strip("[]") for w in args]
    while True:  # descend through subcommands (`mmgpt index build`, `mmgpt data shapes`)
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs or not words or words[0] not in subs[0].choices:
            if subs:
                return [f"no subcommand {words[:1]}"]
            break
        parser, words = subs[0].choices[words[0]], words[1:]
    known = set(parser._option_string_actions)
    return [w for w in words if w.startswith("--") and w.split("=", 1)[0] not in known]
