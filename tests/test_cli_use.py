"""`mmgpt caption / ask / retrieve` in-process (capsys) and once through the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_api import ANSWERS, CAPTIONS, QUESTION, trained_tiny_dir, world_images

from mmgpt.api import VisionLanguagePipeline, load
from mmgpt.cli import main

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return trained_tiny_dir()


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, im in enumerate(world_images()):
        path = folder / f"img{i}.png"
        im.save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def corrupt_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bad") / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return str(path)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_caption_prints_path_tab_caption_and_json_lines(capsys, model_dir, image_files):
    rc, out, err = run_cli(capsys, "caption", model_dir, *image_files, "--batch-size", "3")
    assert rc == 0, err
    assert out.splitlines() == [f"{p}\t{c}" for p, c in zip(image_files, CAPTIONS)]

    rc, out, _ = run_cli(capsys, "caption", model_dir, *image_files[:2], "--json", "--num-beams", "2")
    assert rc == 0
    assert [json.loads(line) for line in out.splitlines()] == [
        {"image": p, "caption": c} for p, c in zip(image_files[:2], CAPTIONS[:2])
    ]

    rc, out, _ = run_cli(capsys, "caption", model_dir, image_files[0], "--max-new-tokens", "1")
    assert rc == 0 and out == f"{image_files[0]}\ta\n"  # one token: the caption's first word


def test_bad_images_get_their_own_line_and_the_rest_are_done(capsys, model_dir, image_files, corrupt_file, tmp_path):
    missing = str(tmp_path / "missing.png")
    argv = [image_files[0], corrupt_file, image_files[1], missing, image_files[2]]
    rc, out, err = run_cli(capsys, "caption", model_dir, *argv, "--batch-size", "2")
    assert rc == 1
    assert out.splitlines() == [f"{p}\t{c}" for p, c in zip(image_files[:3], CAPTIONS[:3])]
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith(f"{corrupt_file}: ") and "corrupt" in lines[0]
    assert lines[1] == f"{missing}: file not found"


def test_missing_or_invalid_model_is_one_line_and_exit_2(capsys, tmp_path, image_files):
    missing = tmp_path / "nowhere" / "model"
    rc, out, err = run_cli(capsys, "caption", missing, image_files[0])
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and str(missing) in err and "no such model folder" in err
    assert "Traceback" not in err

    (tmp_path / "empty").mkdir()
    for argv in (["ask", tmp_path / "empty", image_files[0], QUESTION],
                 ["retrieve", tmp_path / "empty", "--images", image_files[0], "--texts", "x"]):
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 2 and out == "" and err.count("\n") == 1 and "no config.json" in err, err


def test_ask_plain_json_and_stream(capsys, model_dir, image_files, monkeypatch):
    rc, out, err = run_cli(capsys, "ask", model_dir, image_files[0], QUESTION)
    assert rc == 0 and out == "red\n", err

    rc, out, _ = run_cli(capsys, "ask", model_dir, *image_files, QUESTION, "--json")
    assert rc == 0
    assert [json.loads(line) for line in out.splitlines()] == [
        {"image": p, "question": QUESTION, "answer": a} for p, a in zip(image_files, ANSWERS)
    ]

    streamed = []
    real = VisionLanguagePipeline.stream_answer

    def spy(self, image, question, **gen):
        for piece in real(self, image, question, **gen):
            streamed.append(piece)
            yield piece

    monkeypatch.setattr(VisionLanguagePipeline, "stream_answer", spy)
    rc, out, _ = run_cli(capsys, "ask", model_dir, image_files[3], QUESTION, "--stream")
    assert rc == 0 and out == "yellow\n" and "".join(streamed) == "yellow"

    rc, _, err = run_cli(capsys, "ask", model_dir, image_files[3], QUESTION, "--stream", "--json")
    assert rc == 2 and "--stream and --json" in err


def test_retrieve_json_and_text(capsys, model_dir, image_files):
    texts = CAPTIONS[:3]
    rc, out, err = run_cli(capsys, "retrieve", model_dir, "--images", *image_files, "--texts", *texts,
                           "--top-k", "2", "--json")
    assert rc == 0, err
    got = json.loads(out)
    sim = load(model_dir, device="cpu").similarity(image_files, texts)  # (4, 3)
    assert [r["image"] for r in got["image_to_text"]] == image_files
    for i, row in enumerate(got["image_to_text"]):
        order = sorted(range(3), key=lambda j: -float(sim[i, j]))[:2]
        assert [m["text"] for m in row["matches"]] == [texts[j] for j in order]
        assert [m["score"] for m in row["matches"]] == pytest.approx([float(sim[i, j]) for j in order], abs=1e-4)
    for j, row in enumerate(got["text_to_image"]):
        order = sorted(range(4), key=lambda i: -float(sim[i, j]))[:2]
        assert row["text"] == texts[j]
        assert [m["image"] for m in row["matches"]] == [image_files[i] for i in order]

    rc, out, _ = run_cli(capsys, "retrieve", model_dir, "--images", *image_files[:2], "--texts", *texts,
                         "--top-k", "1")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "# images -> texts" and lines[1] == image_files[0]
    assert lines[2].startswith("  1\t") and lines[2].split("\t")[2] == got["image_to_text"][0]["matches"][0]["text"]
    assert "# texts -> images" in lines and len(lines) == 2 + 2 * 2 + 3 * 2


def console_script() -> list[str]:
    exe = Path(sys.executable).parent / "mmgpt"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("mmgpt")
    return [found] if found else [sys.executable, "-m", "mmgpt.cli"]


def test_console_script_in_a_subprocess(model_dir, image_files, corrupt_file):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = console_script()
    done = subprocess.run([*cmd, "caption", str(model_dir), image_files[0], corrupt_file, image_files[1], "--json"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert [json.loads(line)["caption"] for line in done.stdout.splitlines()] == CAPTIONS[:2]
    # Nothing else on stderr: no progress bars, no transformers warnings, no traceback.
    assert done.stderr.startswith(f"{corrupt_file}: ") and done.stderr.count("\n") == 1, done.stderr


def test_a_question_longer_than_the_decoder_reads_is_one_line_and_exit_2(capsys, model_dir, image_files, tmp_path):
    question = "what color is the circle next to the square? " * 12  # > 64 positions of the tiny decoder
    for command in (["ask", model_dir, image_files[0], question],
                    ["explain", model_dir, image_files[0], "--question", question, "--out", str(tmp_path / "x.png")]):
        rc, _, err = run_cli(capsys, *command)
        assert rc == 2 and "shorten the question" in err and "Traceback" not in err, command
        assert len(err.strip().splitlines()) == 1
