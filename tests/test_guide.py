"""docs/guide.md stays true: its ```python blocks run in order in one namespace (each asserts what it
explains), its training YAML examples load into the typed config with valid data sources, and the
files it links to exist."""

from __future__ import annotations

import re
import time

from _docs import ROOT, broken_links
from _docs import blocks as _blocks

GUIDE = ROOT / "docs" / "guide.md"


def blocks(lang: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block of this language in the guide, in order."""
    return _blocks(GUIDE, lang)


def test_guide_has_python_snippets_for_every_part():
    code = "\n".join(c for _, c in blocks("python"))
    assert len(blocks("python")) >= 10
    for name in ("build_model", "tr.h", "vit.embeddings", "build_adapter",
                 "contrastive_loss", "gather_with_grad", "unimodal_layers", "explain("):
        assert name in code, name


def test_guide_python_snippets_run_in_order(quiet_and_one_thread, capsys):
    namespace: dict = {"__name__": "guide"}
    start = time.perf_counter()
    for line, code in blocks("python"):
        try:
            exec(compile(code, f"{GUIDE}:{line}", "exec"), namespace)  # noqa: S102 - the guide is ours
        except Exception as err:
            raise AssertionError(f"the ```python block at docs/guide.md line {line} failed: {err!r}") from err
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "M parameters" in out and "cross-attention weights" in out
    # Keep the guide quick to check (the budget is generous: a loaded 2-core machine is slower).
    assert elapsed < 120, f"the guide's snippets took {elapsed:.0f} s"


def test_guide_yaml_examples_are_valid_training_configs(tmp_path):
    from train.config import load_config
    from train.data.sources import SourceSpec

    found = blocks("yaml")
    assert len(found) >= 5
    formats = set()
    for line, text in found:
        path = tmp_path / f"guide-{line}.yaml"
        path.write_text(text)
        cfg = load_config(path)  # unknown keys raise ConfigError naming them
        sources = list(cfg.data.train) + [s for s in (cfg.data.validation, cfg.data.test) if s]
        for spec in sources:
            formats.add(SourceSpec.from_dict(spec).format)  # unknown or missing keys raise
    assert formats >= {"jsonl", "csv", "imagefolder", "coco", "vqav2", "hf", "webdataset"}


def test_guide_links_and_named_files_exist():
    text = GUIDE.read_text(encoding="utf-8")
    assert not broken_links(GUIDE)
    image = GUIDE.parent / "images" / "explain-example.png"
    assert image.is_file()
    assert sum(p.stat().st_size for p in (GUIDE.parent / "images").iterdir()) < 300_000
    for name in set(re.findall(r"`((?:mmgpt|encoders|train|configs|tests)/[\w./-]+\.(?:py|yaml|json))`", text)):
        assert (ROOT / name).is_file(), name
    for name in re.findall(r"--config_file (\S+)", text):
        assert (ROOT / name).is_file(), name
