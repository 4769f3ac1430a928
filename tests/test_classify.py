"""Zero-shot classification: `vl.classify` against a softmax computed by hand from the model's own
embeddings, one text at a time; the output shape of transformers' zero-shot-image-classification; the
command line; `mmgpt eval --task classify` on shapes."""

from __future__ import annotations

import json

import pytest
import torch
from test_api import WORLD
from test_search import drawing, search_model_dir

from mmgpt import MMGPTModel, MMGPTProcessor
from mmgpt.api import load
from mmgpt.cli import main as cli
from train.classify_eval import ensemble_templates, single_object_images

pytestmark = pytest.mark.usefixtures("single_torch_thread")
LABELS = ["red circle", "blue square", "green circle", "yellow square"]  # WORLD's kinds
TEMPLATES = ["a {}", "{}", "a {} ."]


@pytest.fixture(scope="module")
def vl():
    return load(search_model_dir(), device="cpu")


def hand_probs(folder, images, labels, templates) -> torch.Tensor:
    """(N, L) probabilities from a model loaded apart, each text embedded alone."""
    model, proc = MMGPTModel.from_pretrained(folder).eval(), MMGPTProcessor.from_pretrained(folder)
    with torch.no_grad():
        rows = []
        for label in labels:
            zs = []
            for t in templates:
                b = proc.batch_texts([t.replace("{}", label)])
                zs.append(model.embed_text(b["input_ids"], b["attention_mask"])[0])  # (E,)
            mean = torch.stack(zs).mean(0)
            rows.append(mean / mean.norm())
        txt = torch.stack(rows)  # (L, E)
        img = model.embed_image(proc.images(images))  # (N, E)
        logits = model.logit_scale.exp().clamp(max=model.config.logit_scale_max) * img @ txt.T
        exp = (logits - logits.max(-1, keepdim=True).values).exp()
    return exp / exp.sum(-1, keepdim=True)


def test_classify_equals_a_hand_computed_softmax_over_template_averaged_embeddings(vl):
    images = [drawing(k, v) for k in range(len(WORLD)) for v in (0, 3)]
    out = vl.classify(images, LABELS, templates=TEMPLATES)
    ref = hand_probs(search_model_dir(), images, LABELS, TEMPLATES)  # (8, 4)
    assert len(out) == len(images)
    for row, probs in zip(out, ref):
        assert [set(r) for r in row] == [{"label", "score"}] * len(LABELS)
        scores = [r["score"] for r in row]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)
        got = {r["label"]: r["score"] for r in row}
        assert [got[lab] for lab in LABELS] == pytest.approx(probs.tolist(), abs=1e-5)
    # the trained model labels every drawing with its own kind
    assert [row[0]["label"] for row in out] == [LABELS[k] for k in range(len(WORLD)) for _ in (0, 3)]
    # one image -> one list (transformers' pipeline shape); default template: the label alone
    one = vl.classify(drawing(1, 2), LABELS)
    assert isinstance(one, list) and isinstance(one[0], dict) and one[0]["label"] == "blue square"
    ref1 = hand_probs(search_model_dir(), [drawing(1, 2)], LABELS, ["{}"])[0]
    assert {r["label"]: r["score"] for r in one} == pytest.approx(dict(zip(LABELS, ref1.tolist())), abs=1e-5)


def test_templates_average_before_the_softmax_not_after(vl):
    """Ensembling averages the normed text embeddings: not the mean of per-template probabilities."""
    im = drawing(2, 1)
    ens = {r["label"]: r["score"] for r in vl.classify(im, LABELS, templates=TEMPLATES)}
    per = [{r["label"]: r["score"] for r in vl.classify(im, LABELS, templates=[t])} for t in TEMPLATES]
    mean_of_probs = {lab: sum(p[lab] for p in per) / len(per) for lab in LABELS}
    assert ens != pytest.approx(mean_of_probs, abs=1e-6)


def test_bad_templates_and_labels_are_refused(vl):
    with pytest.raises(ValueError, match="has no {}"):
        vl.classify(drawing(0, 0), LABELS, templates=["a photo"])
    with pytest.raises(ValueError, match="at least one label"):
        vl.classify(drawing(0, 0), [])


def test_command_line(vl, tmp_path, capsys):
    paths = []
    for k in range(len(WORLD)):
        paths.append(tmp_path / f"{k}.png")
        drawing(k, 0).save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    argv = ["classify", str(search_model_dir()), *map(str, paths), str(tmp_path / "bad.png"),
            "--labels", *LABELS, "--template", "a {}", "--template", "{}", "--json"]
    assert cli(argv) == 1  # the bad image: its own line on stderr, the others done
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    api = vl.classify([drawing(k, 0) for k in range(len(WORLD))], LABELS, templates=["a {}", "{}"])
    assert [r["image"] for r in rows] == list(map(str, paths))
    for row, ref in zip(rows, api):
        assert [x["label"] for x in row["labels"]] == [x["label"] for x in ref]
        assert [x["score"] for x in row["labels"]] == pytest.approx([x["score"] for x in ref], abs=1e-5)
    assert "bad.png" in captured.err
    assert cli(["classify", str(search_model_dir()), str(paths[0]), "--labels", "a", "b", "--template", "x"]) == 2
    assert "has no {}" in capsys.readouterr().err


def test_shapes_classify_eval_data_and_command(tmp_path, capsys):
    data = single_object_images(20, "test", 64)
    assert all(len(im.getcolors(64 * 64)) >= 2 for im, _ in data)  # background + the one object
    assert {obj.size for _, obj in data} == {"small", "large"} and len({obj.shape for _, obj in data}) == 3
    assert len(ensemble_templates("shape")) == 10 and "a small red {}" in ensemble_templates("shape")
    assert "a {} purple triangle" in ensemble_templates("size")
    assert cli(["eval", str(search_model_dir()), "--data", "shapes:test:12", "--task", "classify", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["num_images"] == 12 and all(0 <= m[f"classify_{a}_top1"] <= 1 for a in ("shape", "color", "size"))
    assert cli(["eval", str(search_model_dir()), "--data", "jsonl:x.jsonl", "--task", "classify"]) == 2
    assert "reads the shapes world" in capsys.readouterr().err
