"""Evaluation metrics: COCO caption metrics, VQA accuracy, retrieval recall."""

from __future__ import annotations

import ast
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from train.metrics import (
    MetricsWarning,
    _coco_tokenize,
    caption_metrics,
    close_meteor,
    meteor,
    normalize_vqa_answer,
    retrieval_metrics,
    vqa_accuracy,
    vqa_score,
)

HAVE_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAVE_JAVA, reason="java is not installed")

# Five images, 2-5 references each, with the punctuation, case, contractions, quotes and
# brackets that make tokenization matter; one empty candidate.
REFS = {
    "surf": ["A man riding a wave on top of a surfboard.",
             "A surfer rides the large wave in the ocean!",
             "a man on a surfboard riding a wave"],
    "dogs": ["Two dogs playing with a frisbee in the park.",
             "Dogs chasing a red frisbee on the grass...",
             "Two brown dogs run after a flying disc.",
             "A couple of dogs that are playing outside."],
    "kitchen": ["A kitchen with stainless steel appliances and granite counter-tops.",
                "The kitchen's counters are clean, and it's well lit.",
                "An empty kitchen (with a stove) and a fridge.",
                "a small kitchen with white cabinets",
                "Kitchen area with a refrigerator, stove, and microwave."],
    "sign": ['A sign that reads "STOP" on a street corner.',
             "a red stop sign next to a road"],
    "giraffes": ["Three giraffes standing near a tree at the zoo.",
                 "Giraffes don't seem to mind the people watching them.",
                 "A group of giraffes in an enclosure; it's sunny."],
}
PREDS = {
    "surf": "A man riding a wave on a surfboard.",
    "dogs": "two dogs playing with a frisbee",
    "kitchen": "",
    "sign": "A red stop sign on the corner of a street.",
    "giraffes": "a giraffe standing next to a tree",
}
KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")


def _pycocoevalcap_reference(preds, refs, meteor_scorer=None):
    """The official pipeline, called directly: PTBTokenizer, then each scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in refs[k]] for k in preds})
    res = tok.tokenize({k: [{"caption": preds[k]}] for k in preds})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"bleu_{i + 1}": b for i, b in enumerate(bleu)}
    out["rouge_l"] = Rouge().compute_score(gts, res)[0]
    out["cider"] = Cider().compute_score(gts, res)[0]
    if meteor_scorer is not None:
        out["meteor"] = meteor_scorer.compute_score(gts, res)[0]
    return out, gts, res


# ------------------------------------------------------------------------------ captions


class _SharedJvm:
    """Lets pycocoevalcap's own ``Meteor.compute_score`` talk to the METEOR process that
    ``caption_metrics(keep_meteor=True)`` keeps, so the comparison needs one slow JVM start."""

    def __init__(self, kept):
        self.stdin = kept._proc.stdin
        self.stdout = self
        self._lines = kept._lines

    def readline(self):
        return self._lines.get(timeout=120)

    def kill(self):
        pass

    def wait(self):
        pass


@needs_java
def test_caption_metrics_equal_pycocoevalcap_pipeline():
    import threading

    from pycocoevalcap.meteor import meteor as meteor_module

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", MetricsWarning)
            ours = caption_metrics(PREDS, REFS, keep_meteor=True)
        reference_meteor = meteor_module.Meteor.__new__(meteor_module.Meteor)
        reference_meteor.meteor_p = _SharedJvm(meteor._kept_meteor)
        reference_meteor.lock = threading.Lock()
        expected, _, _ = _pycocoevalcap_reference(PREDS, REFS, reference_meteor)
    finally:
        close_meteor()
    assert set(ours) == set(KEYS)
    for key in KEYS:
        assert ours[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key
        assert isinstance(ours[key], float)
    assert 0 < ours["bleu_4"] < ours["bleu_1"] < 1 and 0 < ours["meteor"] < 1 and ours["cider"] > 0
    # ... and the jar is started exactly as pycocoevalcap starts it
    cmd, folder = meteor._meteor_command()
    assert cmd[1:] == ["-jar", "-Xmx2G", meteor_module.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
    assert Path(folder) == Path(meteor_module.__file__).parent


@needs_java
def test_java_tokenizer_equals_pycocoevalcap_ptbtokenizer():
    _, gts, res = _pycocoevalcap_reference(PREDS, REFS)
    tok_refs, tok_preds = _coco_tokenize.ptb_tokenize_java(
        [[c for k in PREDS for c in REFS[k]], list(PREDS.values())])
    assert tok_refs == [c for k in PREDS for c in gts[k]]
    assert tok_preds == [res[k][0] for k in PREDS]
    assert "the kitchen 's counters are clean and it 's well lit" in tok_refs
    assert "an empty kitchen -lrb- with a stove -rrb- and a fridge" in tok_refs  # the jar's quirk


TRICKY = [
    "A man's hat, the dogs' bowls; I'm sure we'll see.",
    "He can't, won't, cannot stop -- gonna go.",
    'It\'s a "big" (red) {blue} [green] ball!',
    "The U.S. flag, Mr. Smith's car... etc. at 5 p.m. in St. Louis",
    "A black-and-white photo - of a cat on a 10-year-old mat: yes?!",
    "3.5 cats cost $5 and 1,000 dogs 50% of the time & more/less",
    "'Single quoted' `text` and rock 'n' roll in the '90s",
    "café naïve \u2014 \u201ccurly\u201d \u2018quotes\u2019 \u2026 \u00bd",
    "the letter a. and the answer is no.",
    "12 people",
    "",
    "   ",
    "two\nlines",
]


@needs_java
def test_python_tokenizer_matches_the_jar():
    streams = [[c for k in PREDS for c in REFS[k]] + TRICKY, list(PREDS.values()) + TRICKY[::-1]]
    assert _coco_tokenize.ptb_tokenize_python(streams) == _coco_tokenize.ptb_tokenize_java(streams)


def test_python_tokenizer_known_output():
    (out,) = _coco_tokenize.ptb_tokenize_python([TRICKY[:5] + TRICKY[8:10]])
    assert out == [
        "a man 's hat the dogs bowls i 'm sure we 'll see",
        "he ca n't wo n't can not stop gon na go",
        "it 's a big -lrb- red -rrb- -lcb- blue -rcb- -lsb- green -rsb- ball",
        "the u.s. flag mr. smith 's car etc. at 5 p.m. in st. louis",
        "a black-and-white photo of a cat on a 10-year-old mat yes ?!",
        "the letter a. and the answer is no.",  # "no." keeps its period: next line starts with a digit
        "12 people",
    ]
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    assert _coco_tokenize.PUNCTUATIONS == PUNCTUATIONS


def test_hand_computable_bleu():
    refs = {i: [c] * 3 for i, c in enumerate(["a man riding a brown horse on the beach",
                                                "two dogs playing with a red frisbee",
                                                "a plate of food with broccoli and rice"])}
    same = caption_metrics({i: r[0] for i, r in refs.items()}, refs, metrics=("bleu", "rouge"))
    assert same["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert same["bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert same["rouge_l"] == pytest.approx(1.0)
    disjoint = caption_metrics({i: "zebra xylophone quartz jumps" for i in refs}, refs,
                               metrics=("bleu", "rouge", "cider"))
    for n in range(1, 5):
        assert disjoint[f"bleu_{n}"] < 1e-6
    assert disjoint["rouge_l"] == 0.0 and disjoint["cider"] == 0.0


def test_without_java_falls_back_and_skips_meteor(monkeypatch):
    expected = caption_metrics(PREDS, REFS, metrics=("bleu", "rouge", "cider"))
    monkeypatch.setattr(_coco_tokenize, "java_available", lambda: False)
    monkeypatch.setattr(_coco_tokenize, "ptb_tokenize_java", lambda *a, **k: pytest.fail("java used"))
    with pytest.warns(MetricsWarning, match="java is not on PATH.*METEOR"):
        got = caption_metrics(PREDS, REFS)
    assert "meteor" not in got
    assert got == expected  # same numbers: the Python tokenizer reproduces the jar here
    with pytest.raises(RuntimeError, match="java"):
        caption_metrics(PREDS, REFS, tokenizer="java")


def test_empty_and_malformed_inputs():
    with pytest.warns(MetricsWarning, match="no predictions"):
        assert caption_metrics({}, REFS) == dict.fromkeys(KEYS, 0.0)
    all_empty = caption_metrics({k: "" for k in PREDS}, REFS, metrics=("bleu", "rouge", "cider"))
    assert all_empty == {k: 0.0 for k in KEYS if k != "meteor"}
    punct_only = caption_metrics({"a": "..."}, {"a": ["!", "--"]}, metrics=("bleu", "rouge", "cider"))
    assert punct_only["cider"] == 0.0
    assert caption_metrics({"a": ["a dog"], "b": None}, {"a": "a dog", "b": ["a cat"]},
                           metrics=("rouge",)) == {"rouge_l": pytest.approx(0.5)}
    with pytest.raises(KeyError, match="no references"):
        caption_metrics({"x": "a dog"}, {"y": ["a dog"]})
    with pytest.raises(ValueError, match="no reference captions"):
        caption_metrics({"x": "a dog"}, {"x": []})
    with pytest.raises(ValueError, match="unknown caption metric"):
        caption_metrics(PREDS, REFS, metrics=("spice",))


FAKE_METEOR = r"""
import sys
for line in sys.stdin:
    fields = line.rstrip("\n").split(" ||| ")
    if fields[0] == "SCORE":  # stats: number of references, hypothesis length
        print(len(fields) - 2, len(fields[-1].split()), flush=True)
    elif fields[0] == "EVAL":
        for stat in fields[1:]:
            print(stat.split()[0], flush=True)
        print(sum(float(s.split()[0]) for s in fields[1:]) / 100, flush=True)
"""


def _fake_meteor(monkeypatch, code):
    monkeypatch.setattr(_coco_tokenize, "java_available", lambda: True)
    monkeypatch.setattr(meteor, "_meteor_command", lambda: ([sys.executable, "-c", code], "."))


def test_meteor_protocol_and_kept_process(monkeypatch):
    _fake_meteor(monkeypatch, FAKE_METEOR)
    got = caption_metrics(PREDS, REFS, metrics=("meteor",), tokenizer="python")
    assert got == {"meteor": pytest.approx(sum(len(r) for r in REFS.values()) / 100)}
    try:
        caption_metrics(PREDS, REFS, metrics=("meteor",), tokenizer="python", keep_meteor=True)
        pid = meteor._kept_meteor._proc.pid
        again = caption_metrics(PREDS, REFS, metrics=("meteor",), tokenizer="python", keep_meteor=True)
        assert again == got and meteor._kept_meteor._proc.pid == pid
    finally:
        close_meteor()
    assert meteor._kept_meteor is None


@pytest.mark.parametrize("code, message", [
    ("import time; time.sleep(60)", "timed out"),
    ("import sys; sys.stderr.write('boom'); sys.exit(3)", "METEOR"),
    ("print('not a number', flush=True); print('x', flush=True); input()", "METEOR"),
])
def test_meteor_failure_is_a_warning_not_a_hang(monkeypatch, code, message):
    _fake_meteor(monkeypatch, code)
    start = time.monotonic()
    with pytest.warns(MetricsWarning, match=f"METEOR skipped.*{message}"):
        got = caption_metrics({"a": "a dog on grass"}, {"a": ["a dog on the grass"]},
                              tokenizer="python", meteor_timeout=1.5, keep_meteor=True)
    assert time.monotonic() - start < 15
    assert "meteor" not in got and set(got) == set(KEYS) - {"meteor"}
    assert meteor._kept_meteor is None  # a failed kept process is dropped


# ------------------------------------------------------------------------------ VQA


@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"),
    ("the dog.", "dog"),
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("yes!", "yes"),
    ("3,000", "3000"),  # a comma between digits: every punctuation mark is deleted
    ("a red ball", "red ball"),
    ("  Yes\tplease\n", "yes please"),
    ("3.5", "3.5"),  # a period followed by a digit stays
    ("black/white", "black white"),  # a mark not next to a space becomes a space
    ("black / white", "black white"),  # ... and one next to a space is deleted
    ("none", "0"),
    ("An apple, an orange", "apple orange"),
])
def test_normalize_vqa_answer(raw, norm):
    assert normalize_vqa_answer(raw) == norm


def test_vqa_accuracy_leave_one_out():
    others = ["blue"] * 10
    assert vqa_accuracy("red", ["red"] * 3 + others[:7]) == pytest.approx(0.9)  # (3*2/3 + 7*1)/10
    assert vqa_accuracy("red", ["red"] + others[:9]) == pytest.approx(0.3)  # (0 + 9*1/3)/10
    assert vqa_accuracy("red", ["red"] * 2 + others[:8]) == pytest.approx(0.6)
    assert vqa_accuracy("red", ["red"] * 4 + others[:6]) == pytest.approx(1.0)
    assert vqa_accuracy("red", others) == 0.0
    assert vqa_accuracy("Two", ["2"] * 3 + ["two"] + ["3"] * 6) == pytest.approx(1.0)  # normalized
    assert vqa_accuracy("The dog.", ["dog"]) == 1.0  # one answer: exact match after normalizing
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    assert vqa_accuracy("red", ["red"] * 3) == 1.0  # not 10 answers: any match counts (tests/test_data_trial.py)
    assert vqa_accuracy("Yes", [{"answer": "yes", "answer_id": i} for i in range(10)]) == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy("red", [])


def test_vqa_score_per_type():
    got = vqa_score(["2", "red", "yes"], [["two"] * 10, ["red"] + ["blue"] * 9, ["no"] * 10],
                    question_types=["count", "color", "yes/no"])
    assert got == pytest.approx({"vqa_accuracy": 1.3 / 3, "vqa_accuracy/count": 1.0,
                                 "vqa_accuracy/color": 0.3, "vqa_accuracy/yes/no": 0.0})
    assert vqa_score([], []) == {"vqa_accuracy": 0.0}
    with pytest.raises(ValueError):
        vqa_score(["a"], [])


# ------------------------------------------------------------------------------ retrieval

SIM4 = np.array([[0.9, 0.1, 0.3, 0.2],
                 [0.2, 0.4, 0.8, 0.1],
                 [0.1, 0.7, 0.6, 0.5],
                 [0.3, 0.2, 0.1, 0.0]])


def test_retrieval_square_diagonal():
    # i2t ranks of the true text: img0 0, img1 1, img2 1, img3 3; t2i likewise 0, 1, 1, 3
    got = retrieval_metrics(SIM4, ks=(1, 2, 4))
    assert got == pytest.approx({"retrieval_i2t_r1": 0.25, "retrieval_i2t_r2": 0.75, "retrieval_i2t_r4": 1.0,
                                 "retrieval_t2i_r1": 0.25, "retrieval_t2i_r2": 0.75, "retrieval_t2i_r4": 1.0})
    default = retrieval_metrics(SIM4)
    assert set(default) == {f"retrieval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert default["retrieval_i2t_r5"] == 1.0
    # a transposed score matrix swaps the directions
    t = retrieval_metrics(SIM4.T, ks=(1, 2))
    assert t["retrieval_i2t_r1"] == got["retrieval_t2i_r1"]


def test_retrieval_several_captions_per_image():
    sim = np.array([[0.1, 0.5, 0.9, 0.2, 0.3],
                    [0.8, 0.1, 0.2, 0.7, 0.05]])
    expected = {"retrieval_i2t_r1": 0.0, "retrieval_i2t_r2": 1.0,
                "retrieval_t2i_r1": 0.4, "retrieval_t2i_r2": 1.0}
    assert retrieval_metrics(sim, text_to_image=[0, 0, 1, 1, 1], ks=(1, 2)) == pytest.approx(expected)
    assert retrieval_metrics(sim, image_to_texts=[[0, 1], [2, 3, 4]], ks=(1, 2)) == pytest.approx(expected)
    with pytest.raises(ValueError):
        retrieval_metrics(sim)  # not square, no ground truth
    with pytest.raises(ValueError):
        retrieval_metrics(sim, text_to_image=[0, 0, 1, 1, 2])


def test_retrieval_duplicate_captions_count_as_hits():
    sim = np.array([[0.5, 0.1, 0.9],
                    [0.2, 0.8, 0.3],
                    [0.9, 0.1, 0.4]])
    captions = ["a red circle", "a blue square", "a red circle"]
    plain = retrieval_metrics(sim, ks=(1,))
    assert plain == pytest.approx({"retrieval_i2t_r1": 1 / 3, "retrieval_t2i_r1": 1 / 3})
    keyed = retrieval_metrics(sim, ks=(1,), text_keys=captions)
    assert keyed == {"retrieval_i2t_r1": 1.0, "retrieval_t2i_r1": 1.0}


def test_retrieval_ties_nan_and_torch():
    torch = pytest.importorskip("torch")
    zeros = retrieval_metrics(np.zeros((3, 3)), ks=(1, 2, 3))  # ties rank by index
    assert zeros == pytest.approx({"retrieval_i2t_r1": 1 / 3, "retrieval_i2t_r2": 2 / 3, "retrieval_i2t_r3": 1.0,
                                   "retrieval_t2i_r1": 1 / 3, "retrieval_t2i_r2": 2 / 3, "retrieval_t2i_r3": 1.0})
    nan = SIM4.copy()
    nan[0, 0] = np.nan  # a NaN score ranks last
    assert retrieval_metrics(nan, ks=(1, 3))["retrieval_i2t_r3"] == 0.5
    as_tensor = retrieval_metrics(torch.tensor(SIM4, dtype=torch.bfloat16), ks=(1, 2))
    assert as_tensor == retrieval_metrics(SIM4, ks=(1, 2))
    # an image without any caption is left out of the image->text average
    extra = retrieval_metrics(np.vstack([SIM4, np.ones(4)]), text_to_image=[0, 1, 2, 3], ks=(1,))
    assert extra["retrieval_i2t_r1"] == 0.25


# ------------------------------------------------------------------------------ layering


def test_metrics_imports_only_stdlib_numpy_torch_pycocoevalcap():
    allowed = set(sys.stdlib_module_names) | {"numpy", "torch", "pycocoevalcap", "__future__"}
    root = Path(meteor.__file__).parent  # the train.metrics package
    names = sorted(p.name for p in root.glob("*.py"))
    assert {"__init__.py", "caption.py", "meteor.py", "vqa.py", "retrieval.py", "_coco_tokenize.py"} <= set(names)
    for name in names:
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
                if node.module == "train.metrics" or (node.module or "").startswith("train.metrics."):
                    continue  # the package's own modules
            else:
                continue
            for mod in mods:
                assert mod.split(".")[0] in allowed, f"{name} imports {mod}"
