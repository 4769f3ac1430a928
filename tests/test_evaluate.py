"""train.evaluate against hand-computed values (a fake model whose outputs we choose), end to end with
the tiny trained model, and the `mmgpt eval` command on a JSONL source written here."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from test_api import ANSWERS, CAPTIONS, QUESTION, trained_tiny_dir, world_images
from torch import nn

from mmgpt import MMGPTProcessor, train_bpe_tokenizer
from mmgpt.api import load
from mmgpt.cli import main
from train.data.bad import BadRecord
from train.evaluate import evaluate, normalize_caption
from train.metrics import caption_metrics

NO_METEOR = ("bleu", "rouge", "cider")  # METEOR starts a Java VM (seconds); train.metrics tests cover it


pytestmark = pytest.mark.usefixtures("single_torch_thread")


# --- a fake model whose outputs are fixed by hand ---------------------------------------------------

NAMES = ["A", "B", "C", "D", "E"]
COLORS = [(220, 40, 40), (40, 80, 220), (40, 170, 60), (225, 200, 30), (140, 60, 190)]
# (image, prompt as the processor writes it) -> what the fake generates
OUTPUTS = {
    ("A", ""): "A Red  Circle.",  # equals the reference "a red circle" after normalisation: a hit
    ("B", ""): "a blue square and more",  # a miss
    ("C", ""): "a green circle",  # a hit
    ("E", ""): "a blue square",  # a hit
    ("A", "question: what color is it? answer:"): "red",
    ("C", "question: what shape is it? answer:"): "square",
    ("D", "question: how many objects? answer:"): "2",
}
# Image embeddings are one-hot over the captioned images (A, B, C, E); a text embedding is its column
# of the similarity matrix (rows A, B, C, E), chosen so the recalls below are easy to count by hand.
IMAGE_ROW = {"A": 0, "B": 1, "C": 2, "E": 3}
TEXT_COLUMN = {
    "a red circle": [0.6, 0.1, 0.2, 0.0],
    "a red ball": [0.3, 0.5, 0.0, 0.0],
    "a blue square": [0.0, 0.7, 0.1, 0.8],  # B's and E's caption: the same string
    "a green circle": [0.9, 0.0, 0.95, 0.0],
}


class FakeModel(nn.Module):
    """Knows images by their pixels and prompts by their text; records what it was asked."""

    def __init__(self, processor, images: dict[str, Image.Image]):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # device and dtype come from the parameters
        self.processor = processor
        self.known = {name: processor.images([im])[0] for name, im in images.items()}
        self.calls: list[tuple[str, str]] = []
        self.gen_kwargs: list[dict] = []

    def which(self, pixels: torch.Tensor) -> str:
        return min(self.known, key=lambda n: float((self.known[n] - pixels).abs().sum()))

    def text_of(self, ids: torch.Tensor, mask: torch.Tensor) -> str:
        return self.processor.tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)

    def generate(self, pixel_values, input_ids, attention_mask, **kwargs):
        self.gen_kwargs.append(kwargs)
        tok = self.processor.tokenizer
        new = []
        for px, ids, mask in zip(pixel_values, input_ids, attention_mask):
            key = (self.which(px), self.text_of(ids, mask))
            self.calls.append(key)
            new.append(tok.encode(" " + OUTPUTS[key] if key[1] else OUTPUTS[key], add_special_tokens=False)
                       + [tok.eos_token_id])
        width = max(map(len, new)) + 1  # at least one pad after EOS: decoding must stop at EOS
        tail = torch.full((len(new), width), tok.eos_token_id)
        for i, seq in enumerate(new):
            tail[i, : len(seq)] = torch.tensor(seq)
        return torch.cat([input_ids, tail], dim=1)  # (B, T + new): prompt and new tokens, like generate()

    def embed_image(self, pixel_values):
        rows = [IMAGE_ROW[self.which(px)] for px in pixel_values]
        return torch.eye(4)[rows]  # (B, 4)

    def embed_text(self, input_ids, attention_mask):
        eos = self.processor.tokenizer.eos_token_id
        texts = [self.text_of(ids[1:], mask[1:] * (ids[1:] != eos)) for ids, mask in zip(input_ids, attention_mask)]
        return torch.tensor([TEXT_COLUMN[t] for t in texts])  # (B, 4)


def caption_rec(image, target, image_id=None, references=None):
    rec = {"image": image, "task": "caption", "prompt": "", "target": target}
    if references is not None:
        rec["references"] = references
    if image_id is not None:
        rec["image_id"] = image_id
    return rec


def vqa_rec(image, question, answers, qtype, image_id=None):
    rec = {"image": image, "task": "vqa", "prompt": question, "target": answers[0], "answers": answers,
           "qtype": qtype}
    if image_id is not None:
        rec["image_id"] = image_id
    return rec


@pytest.fixture(scope="module")
def fake():
    texts = list(TEXT_COLUMN) + list(OUTPUTS.values()) + [k[1] for k in OUTPUTS]
    processor = MMGPTProcessor(train_bpe_tokenizer(texts, vocab_size=300), image_size=16)
    images = {n: Image.new("RGB", (16, 16), c) for n, c in zip(NAMES, COLORS)}
    return processor, images


def hand_records(images):
    a, b, c, d, e = (images[n] for n in NAMES)
    red_answers = ["red", "red"] + ["crimson"] * 8
    return [
        caption_rec(a, "a red circle", "A"),
        vqa_rec(a.copy(), "what color is it?", red_answers, "color", "A"),  # grouped by image_id, not object
        {**caption_rec(b, "a blue square", "B"), "ctype": "two"},
        None,  # a bad record
        caption_rec(a.copy(), "A red ball", "A", references=["a red circle", "a red ball"]),
        caption_rec(c, "a green circle"),  # no image_id: grouped by the image object
        vqa_rec(c, "what shape is it?", ["circle"], "shape"),
        BadRecord("missing_file", "x.jsonl:7", "gone.png"),
        vqa_rec(d, "how many objects?", ["two"], "count", "D"),  # D has no caption: not captioned
        {**caption_rec(e, "a blue square", "E"), "ctype": "two"},
    ]


def test_evaluate_matches_hand_computed_metrics(fake):
    processor, images = fake
    model = FakeModel(processor, images).train()
    result = evaluate(model, processor, hand_records(images), batch_size=2, max_new_tokens=7, num_beams=2,
                      caption_scorers=NO_METEOR)
    m = result.metrics
    assert model.training  # mode restored

    # Each image captioned once (D never: it has no reference caption), each question asked once.
    assert sorted(model.calls) == sorted(OUTPUTS)
    assert all(k["max_new_tokens"] == 7 and k["num_beams"] == 2 for k in model.gen_kwargs)
    assert (m["num_images"], m["num_questions"], m["bad_records"]) == (5, 3, 2)

    # Exact match: A ("A Red  Circle." ~ "a red circle"), C and E hit; B misses.
    assert m["caption_exact_match"] == pytest.approx(3 / 4)
    assert m["caption_exact_match/two"] == pytest.approx(1 / 2)  # per caption type: B misses, E hits
    assert not any(k.startswith("caption_exact_match/") and k != "caption_exact_match/two" for k in m)
    refs = {0: ["a red circle", "a red ball"], 1: ["a blue square"], 2: ["a green circle"], 3: ["a blue square"]}
    preds = {0: "A Red  Circle.", 1: "a blue square and more", 2: "a green circle", 3: "a blue square"}
    direct = caption_metrics(preds, refs, metrics=NO_METEOR)
    for key in ("bleu_1", "bleu_4", "rouge_l", "cider"):
        assert m[key] == pytest.approx(direct[key]), key

    # VQA: "red" with 2 of 10 humans -> mean over leave-one-out of min(matches/3, 1)
    #   = (2 * 1/3 + 8 * 2/3) / 10 = 0.6; "2" vs "two" -> 1 (number words normalised); "square" -> 0.
    assert m["vqa_accuracy"] == pytest.approx((0.6 + 1.0 + 0.0) / 3)
    assert m["vqa_accuracy/color"] == pytest.approx(0.6)
    assert m["vqa_accuracy/count"] == pytest.approx(1.0)
    assert m["vqa_accuracy/shape"] == pytest.approx(0.0)

    # Retrieval, texts t0 "a red circle"(A) t1 "a red ball"(A) t2 "a blue square"(B) t3 "a green circle"(C)
    # t4 "a blue square"(E). i2t top-1: A -> t3 miss, B -> t2 hit, C -> t3 hit, E -> t2 hit (same string
    # as its own caption). t2i top-1: t0 -> A hit, t1 -> B miss, t2 -> E hit (same string), t3 -> C hit,
    # t4 -> E hit. Everything is within the top 5.
    assert m["retrieval_i2t_r1"] == pytest.approx(3 / 4)
    assert m["retrieval_t2i_r1"] == pytest.approx(4 / 5)
    assert m["retrieval_i2t_r5"] == 1.0 and m["retrieval_t2i_r5"] == 1.0

    captions = {ex["image_id"]: ex for ex in result.examples if ex["task"] == "caption"}
    assert set(captions) == {"A", "B", "E", "image-2"}
    assert captions["A"]["caption"] == "A Red  Circle." and captions["A"]["references"] == ["a red circle",
                                                                                          "a red ball"]
    assert captions["image-2"]["image"] is images["C"]
    answers = {ex["question"]: ex for ex in result.examples if ex["task"] == "vqa"}
    assert answers["how many objects?"]["answer"] == "2" and answers["how many objects?"]["answers"] == ["two"]
    assert answers["what color is it?"]["image_id"] == "A"

    # Only the tasks asked for, and only the first images with max_images.
    model.calls.clear()
    only = evaluate(model, processor, hand_records(images), tasks=("vqa",), max_images=2).metrics
    assert "caption_exact_match" not in only and "retrieval_i2t_r1" not in only
    assert only["num_images"] == 2 and only["num_questions"] == 1 and only["vqa_accuracy"] == pytest.approx(0.6)
    assert model.calls == [("A", "question: what color is it? answer:")]


def test_normalize_caption():
    assert normalize_caption("  A Red\tCircle.. ") == "a red circle"
    assert normalize_caption("a red circle") != normalize_caption("a red circles")


# --- the tiny trained model, end to end -------------------------------------------------------------


def world_records(images):
    recs = []
    for i, (im, cap, ans) in enumerate(zip(images, CAPTIONS, ANSWERS)):
        recs.append(caption_rec(im, cap, str(i)))
        recs.append(vqa_rec(im, QUESTION, [ans], "color", str(i)))
    return recs


def test_evaluate_end_to_end_with_the_tiny_model():
    vl = load(trained_tiny_dir(), device="cpu")
    images = world_images()
    result = evaluate(vl.model, vl.processor, world_records(images), batch_size=3, caption_scorers=NO_METEOR)
    m = result.metrics
    assert m["caption_exact_match"] == 1.0 and m["vqa_accuracy"] == 1.0 and m["vqa_accuracy/color"] == 1.0
    # 3-word captions have no 4-grams, so BLEU-4 is tiny even for perfect captions; BLEU-1..3 are 1.
    assert m["bleu_3"] == pytest.approx(1.0, abs=1e-6) and m["rouge_l"] == pytest.approx(1.0) and m["cider"] > 1.0
    assert "meteor" not in m
    assert (m["num_images"], m["num_questions"], m["bad_records"]) == (4, 4, 0)
    for key in ("retrieval_i2t_r1", "retrieval_i2t_r5", "retrieval_t2i_r1", "retrieval_t2i_r5"):
        assert 0.0 <= m[key] <= 1.0
    assert m["retrieval_i2t_r5"] == 1.0  # only 4 texts
    # The captions and answers are the API's (an independent code path).
    assert [ex["caption"] for ex in result.examples if ex["task"] == "caption"] == vl.caption(images)
    assert [ex["answer"] for ex in result.examples if ex["task"] == "vqa"] == vl.ask(images, QUESTION)


def test_eval_command_on_a_jsonl_source(tmp_path, capsys):
    pytest.importorskip("train.data", reason="the data layer (train.data) has not landed")
    rows = []
    for i, (im, cap, ans) in enumerate(zip(world_images(), CAPTIONS, ANSWERS)):
        im.save(tmp_path / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "caption": cap, "image_id": str(i)})
        rows.append({"image": f"img{i}.png", "question": QUESTION, "answer": ans, "image_id": str(i),
                     "qtype": "color"})
    rows.append({"image": "missing.png", "caption": "a purple triangle", "image_id": "9"})
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    rc = main(["eval", str(trained_tiny_dir()), "--data", f"jsonl:{data}", "--json", "--batch-size", "3",
               "--no-meteor"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    m = json.loads(out.out)
    assert m["caption_exact_match"] == 1.0 and m["vqa_accuracy"] == 1.0
    assert (m["num_images"], m["num_questions"], m["bad_records"]) == (4, 4, 1)
    assert "skipped 1 bad records" in out.err

    rc = main(["eval", str(trained_tiny_dir()), "--data", str(data), "--task", "vqa", "--max-images", "2"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    table = dict(line.split() for line in out.out.splitlines())
    assert table == {"vqa_accuracy": "1.0000", "vqa_accuracy/color": "1.0000", "num_images": "2",
                     "num_questions": "2", "bad_records": "0"}

    rc = main(["eval", str(tmp_path / "nope"), "--data", str(data)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no such model folder" in err
    rc = main(["eval", str(trained_tiny_dir()), "--data", "jsonl:" + str(tmp_path / "absent.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "absent.jsonl" in err
