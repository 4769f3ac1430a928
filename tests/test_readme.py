"""README.md and docs/*.md stay true.

The README's ```python blocks run in order in one namespace, from a fresh folder holding what `make demo`
leaves (runs/demo/model, here trained by the demo's recipe for 2 steps: the demo's architecture and
tokenizer, not its skill); its ```yaml blocks are written to the file their first comment names; its
`mmgpt train` commands on such a file train (2 steps), `mmgpt caption / ask / classify / search` run, and
`mmgpt serve` is started so that the `openai` block talks to it. Every `mmgpt` command of the README
parses with the real argument parser. Across README.md and docs/*.md: every `--flag` shown for an `mmgpt`
subcommand exists, every `mmgpt train` / `-m train` config and its `key=value` overrides load into the
typed training config, every ```yaml block is a valid training config, and relative links (and their
#anchors) resolve.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from _docs import DOCS, FENCE, ROOT, broken_links, commands, fences, train_calls, unknown_flags

README = ROOT / "README.md"
PAGES = [README, *DOCS]
DEMO_RECIPE = ROOT / "configs" / "train" / "shapes-tiny.yaml"
QUICK = ["max_steps=2", "max_minutes=null", "time_schedule=false", "progress=false", "data.num_workers=0",
         "batch_size=8", "optim.warmup_steps=0"]
RUN_IN_PROCESS = {"caption", "ask", "classify", "search"}  # quick on a tiny model; the others are parsed only


def run_cli(args: list[str]) -> None:
    from mmgpt.cli import main

    status = main(args)
    assert status == 0, f"mmgpt {' '.join(args)} exited with {status}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, single_torch_thread):
    """A fresh folder with runs/demo/model (the demo's recipe, 2 steps) and configs/ linked in."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "configs").symlink_to(ROOT / "configs")
    run_cli(["train", str(DEMO_RECIPE), *QUICK, "data.validation=null", "model.tokenizer_texts=400",
             f"output_dir={folder / 'runs' / 'demo'}"])
    # An untrained model answers with as many tokens as it may: keep answers short so that a conversation
    # stays within the tiny decoder's 64 positions (the demo's model stops after a word or two by itself).
    gen = folder / "runs" / "demo" / "model" / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "max_new_tokens": 4}))
    return folder


class Server:
    """`mmgpt serve ...` as the README shows it, on a free port; `url()` waits until it answers."""

    def __init__(self, args: list[str], cwd):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "mmgpt.cli", *args, "--port", "0"], cwd=cwd, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.found = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):  # keeps the pipe drained (uvicorn logs every request) and finds the URL
        for line in self.proc.stderr:
            self.lines.append(line)
            if " on http://" in line:
                self.found.set()

    def url(self) -> str:
        import httpx

        if not self.found.wait(120):
            raise AssertionError("mmgpt serve did not start:\n" + "".join(self.lines))
        url = next(ln for ln in self.lines if " on http://" in ln).split(" on ")[1].split("/ ")[0]
        deadline = time.monotonic() + 60
        while True:  # the URL is printed just before uvicorn listens
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("mmgpt serve did not answer /health:\n" + "".join(self.lines))
            time.sleep(0.1)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def test_readme_starts_with_the_two_commands_and_stays_short():
    text = README.read_text(encoding="utf-8")
    first = fences(README)[0]
    assert first[1] == "bash" and [ln.split("#")[0].strip() for ln in first[3].splitlines()] == ["make demo", "make test"]
    assert text.index("make demo") < text.index("## ")  # before any section
    assert len(text.splitlines()) <= 260


def test_readme_runs_in_order(workdir, monkeypatch, quiet_and_one_thread, capsys):
    from train.config import load_config

    monkeypatch.chdir(workdir)
    namespace: dict = {"__name__": "readme"}
    written: set[str] = set()  # the YAML files the README has the reader write
    trained: set[str] = set()
    serve = [args for _, lang, _, code in fences(README) if lang == "bash" for args in commands(code)
             if args[0] == "serve"]
    assert len(serve) == 1
    server = Server(serve[0], workdir)  # boots while the blocks before it run
    start = time.perf_counter()
    try:
        for line, lang, _, code in fences(README):
            where = f"README.md line {line}"
            if lang == "yaml":
                name = code.splitlines()[0].lstrip("# ").strip()
                assert name.endswith(".yaml"), f"{where}: a yaml block starts with '# FILE.yaml'"
                (workdir / name).write_text(code)
                written.add(name)
            elif lang == "bash":
                for args in commands(code):
                    if args[0] == "train" and args[1] in written - trained:
                        trained.add(args[1])
                        run_cli(["train", *args[1:], *QUICK])
                    elif args[0] == "train":
                        load_config(args[1], args[2:])
                    elif args[0] in RUN_IN_PROCESS:
                        run_cli(args)
            elif lang == "python":
                if "OpenAI(" in code:
                    code = code.replace("http://127.0.0.1:8000", server.url())
                try:
                    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README is ours
                except Exception as err:
                    raise AssertionError(f"the ```python block at {where} failed: {err!r}") from err
    finally:
        server.stop()
    elapsed = time.perf_counter() - start
    assert trained == {"my-run.yaml"}
    assert (workdir / "runs" / "mine" / "model" / "model.safetensors").is_file()
    out = capsys.readouterr().out
    assert "pictures/00000.png\t" in out  # mmgpt caption's line
    assert elapsed < 120, f"the README took {elapsed:.0f} s"


@pytest.mark.parametrize("name", ["using.md", "models.md", "data.md"])
def test_docs_python_blocks_run(name, workdir, monkeypatch, quiet_and_one_thread):
    """The reference pages' ```python blocks, in order in one namespace per page, beside the files they name
    (a.png, b.png, c.png, query.png, photo.png, photos/): they show calls as a reader writes them."""
    from train.data import render, sample_scene

    monkeypatch.chdir(workdir)
    (workdir / "photos").mkdir(exist_ok=True)
    for i, name_ in enumerate(["a.png", "b.png", "c.png", "query.png", "photo.png", *(f"photos/{k}.png" for k in range(4))]):
        render(sample_scene(100 + i)).save(workdir / name_)
    namespace: dict = {"__name__": name}
    for line, lang, _, code in fences(ROOT / "docs" / name):
        if lang == "python":
            try:
                exec(compile(code, name, "exec"), namespace)  # noqa: S102 - our own docs
            except Exception as err:
                raise AssertionError(f"the ```python block at docs/{name} line {line} failed: {err!r}") from err


def test_docs_python_blocks_compile():
    for page in PAGES:
        for line, lang, _, code in fences(page):
            if lang == "python":
                compile(code, f"{page.name}:{line}", "exec")


def test_readme_mmgpt_commands_parse():
    from mmgpt.cli import build_parser

    parser = build_parser()
    found = [(line, args) for line, lang, _, code in fences(README) if lang == "bash" for args in commands(code)]
    assert len(found) >= 12
    for line, args in found:
        try:
            parser.parse_args(args)
        except SystemExit as err:
            raise AssertionError(f"README.md line {line}: mmgpt {' '.join(args)} does not parse") from err


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_docs_mmgpt_flags_exist(page):
    for line, lang, _, code in fences(page):
        if lang in ("bash", "sh", "shell"):
            for args in commands(code):
                assert not unknown_flags(args), f"{page.name} line {line}: mmgpt {' '.join(args)}: {unknown_flags(args)}"
    prose = FENCE.sub("", page.read_text(encoding="utf-8"))
    inline = re.findall(r"`((?:\.venv/bin/)?mmgpt [^`]+)`", prose)
    for span in inline:  # `mmgpt serve MODEL --index INDEX` in the text
        for args in commands(span):
            assert not unknown_flags(args), f"{page.name}: `{span}`: {unknown_flags(args)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_docs_train_commands_load(page):
    """`mmgpt train CONFIG key=value ...` and `accelerate launch ... -m train CONFIG ...`: the config and
    its overrides become the typed config (unknown keys and bad values are errors naming them)."""
    from train.config import load_config

    for line, lang, _, code in fences(page):
        if lang == "bash":
            for args in train_calls(code):
                config = ROOT / args[0]
                if config.is_file():  # files the page has the reader write are checked where they are written
                    try:
                        load_config(config, args[1:])
                    except Exception as err:
                        raise AssertionError(f"{page.name} line {line}: train {' '.join(args)}: {err}") from err


def test_docs_yaml_blocks_are_training_configs(tmp_path):
    from train.config import load_config

    found = 0
    for page in PAGES:
        for line, lang, _, code in fences(page):
            if lang == "yaml":
                path = tmp_path / f"{page.stem}-{line}.yaml"
                path.write_text(code)
                try:
                    load_config(path)  # unknown keys, bad values and bad data source specs raise, naming them
                except Exception as err:
                    raise AssertionError(f"{page.name} line {line}: {err}") from err
                found += 1
    assert found >= 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_docs_links_and_named_files_exist(page):
    assert not broken_links(page)
    if page.name == "guide.md":
        return  # tests/test_guide.py checks the files the guide names
    text = page.read_text(encoding="utf-8")
    for name in set(re.findall(r"`((?:mmgpt|encoders|train|configs|tests|benchmarks)/[\w./-]+\.(?:py|yaml|json|jsonl|c))`",
                               text)):
        assert (ROOT / name).is_file(), f"{page.name} names {name}, which is not there"
