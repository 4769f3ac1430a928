"""Conversation readers (train/data/chat.py): LLaVA JSON and the messages + images layout give the same
records for the same data, and every bad conversation is skipped, counted by reason and named."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from train.data import BadDataCounter, BadRecord, DataError, DataWarning, SkipBad, build_source, parse_source

COLORS = [(220, 40, 40), (40, 80, 220), (40, 170, 60)]


def _images(folder: Path) -> list[str]:
    names = []
    for i, color in enumerate(COLORS):
        im = Image.new("RGB", (20, 16), color)
        im.putpixel((i, i), (0, 0, 0))  # no two alike
        im.save(folder / f"{i}.png")
        names.append(f"{i}.png")
    return names


# The same conversations in both layouts: LLaVA items, and (messages, image indices) as TRL writes them.
LLAVA = [
    {"id": "one", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the picture?"}, {"from": "gpt", "value": "red"}]},
    {"id": "two", "image": ["0.png", "1.png"], "conversations": [
        {"from": "system", "value": "You compare pictures."},
        {"from": "human", "value": "<image>\n<image>\nWhich picture is blue?"}, {"from": "gpt", "value": "the second"},
        {"from": "human", "value": "And the first?"}, {"from": "gpt", "value": "red"}]},
    {"id": "none", "image": "2.png", "conversations": [  # no placeholder, one image: before the first human text
        {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "a green picture"}]},
    {"id": "text", "conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "hi"}]},
]


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


IMG = {"type": "image"}
MESSAGES = [
    ([{"role": "user", "content": [IMG, _text("What color is the picture?")]},
      {"role": "assistant", "content": [_text("red")]}], [0]),
    ([{"role": "system", "content": [_text("You compare pictures.")]},
      {"role": "user", "content": [IMG, IMG, _text("Which picture is blue?")]},
      {"role": "assistant", "content": [_text("the second")]},
      {"role": "user", "content": [_text("And the first?")]},
      {"role": "assistant", "content": [_text("red")]}], [0, 1]),
    ([{"role": "user", "content": [IMG, _text("Describe it.")]},
      {"role": "assistant", "content": [_text("a green picture")]}], [2]),
    ([{"role": "user", "content": [_text("Hello?")]}, {"role": "assistant", "content": [_text("hi")]}], []),
]


def _pixels(rec: dict) -> list[np.ndarray]:
    return [np.asarray(im) for im in rec["images"]]


def _same_records(a, b) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        if isinstance(ra, BadRecord) or isinstance(rb, BadRecord):  # both bad, for the same reason
            assert (type(ra), getattr(ra, "reason", None)) == (type(rb), getattr(rb, "reason", None))
            continue
        assert ra["task"] == rb["task"] == "chat" and (ra["prompt"], ra["target"]) == ("", "")
        assert ra["messages"] == rb["messages"]
        pa, pb = _pixels(ra), _pixels(rb)
        assert len(pa) == len(pb) and all(np.array_equal(x, y) for x, y in zip(pa, pb))
        assert all(im.mode == "RGB" for im in ra["images"] + rb["images"])
        assert (ra["image"] is None) == (not ra["images"])


def test_llava_json_and_messages_images_give_the_same_records(tmp_path):
    datasets = pytest.importorskip("datasets")
    names = _images(tmp_path)
    (tmp_path / "llava.json").write_text(json.dumps(LLAVA))
    llava = build_source(f"llava:{tmp_path / 'llava.json'}")
    got = [llava[i] for i in range(len(llava))]
    # the hand-written expectation: placeholders where they stood, the lone image first, roles mapped
    assert [r["messages"] for r in got[:3]] == [m for m, _ in MESSAGES[:3]]
    assert [r.get("image_id") for r in got[:3]] == ["one", "two", "none"]
    assert got[0]["image_source"] == str(tmp_path / "0.png") and got[1]["image_ids"] == [
        str(tmp_path / "0.png"), str(tmp_path / "1.png")]
    # a conversation without images is skipped (the model answers about images): a counted bad record
    assert (got[3].reason, got[3].where) == ("no_image", f"{tmp_path / 'llava.json'}:item 3")

    pil = [Image.open(tmp_path / n).convert("RGB") for n in names]
    rows = {"messages": [m for m, _ in MESSAGES], "images": [[pil[i] for i in idx] for _, idx in MESSAGES]}
    saved = tmp_path / "trl"
    datasets.Dataset.from_dict(rows).save_to_disk(str(saved))
    trl = build_source(f"hf:{saved}")
    _same_records(got, [trl[i] for i in range(len(trl))])

    # the same with the images as paths (relative to the saved folder) and as bytes
    for i, n in enumerate(names):
        (saved / n).write_bytes((tmp_path / n).read_bytes())
    as_paths = tmp_path / "trl_paths"
    datasets.Dataset.from_dict({"messages": rows["messages"],
                                "images": [[names[i] for i in idx] for _, idx in MESSAGES]}).save_to_disk(str(as_paths))
    for n in names:
        (as_paths / n).write_bytes((tmp_path / n).read_bytes())
    paths = build_source(f"hf:{as_paths}")
    _same_records(got, [paths[i] for i in range(len(paths))])

    # LLaVA as JSONL, with an image folder elsewhere; messages + images rows in a plain JSONL file
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "llava.jsonl").write_text("".join(json.dumps(x) + "\n" for x in LLAVA))
    jsonl = build_source(parse_source(f"llava:{tmp_path / 'sub' / 'llava.jsonl'}:{tmp_path}"))
    _same_records(got, [jsonl[i] for i in range(len(jsonl))])
    (tmp_path / "msgs.jsonl").write_text("".join(
        json.dumps({"messages": m, "images": [names[i] for i in idx]}) + "\n" for m, idx in MESSAGES))
    plain = build_source(f"jsonl:{tmp_path / 'msgs.jsonl'}")
    _same_records(got, [plain[i] for i in range(len(plain))])
    # image parts that carry their image (a path relative to the file) instead of an images list
    inline = [[dict(m, content=[dict(p, image=names[idx[k]]) if p["type"] == "image" else p
                                for k, p in enumerate(m["content"])]) for m in msgs] for msgs, idx in MESSAGES]
    (tmp_path / "inline.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in inline))
    carried = build_source(f"jsonl:{tmp_path / 'inline.jsonl'}")
    _same_records(got, [carried[i] for i in range(len(carried))])


def test_a_hub_style_llava_dataset_reads_as_the_llava_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    names = _images(tmp_path)
    items = [LLAVA[0], LLAVA[2]]  # one image each, as LLaVA sets on the hub have them (an Image column)
    (tmp_path / "l.json").write_text(json.dumps(items))
    llava = build_source(f"llava:{tmp_path / 'l.json'}")
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}]})
    rows = {"id": [x["id"] for x in items], "image": [str(tmp_path / x["image"]) for x in items],
            "conversations": [x["conversations"] for x in items]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hub"))
    hub = build_source(f"hf:{tmp_path / 'hub'}")
    _same_records([llava[0], llava[1]], [hub[0], hub[1]])
    assert [hub[i]["image_id"] for i in range(2)] == ["one", "none"] and names


def test_a_webdataset_conversation_sample(tmp_path):
    _images(tmp_path)
    with tarfile.open(tmp_path / "chat.tar", "w") as tar:
        for key, parts in (("a", {"png": "0.png", "json": LLAVA[0]}),
                           ("b", {"0.png": "0.png", "1.png": "1.png", "json": LLAVA[1]})):
            for ext, value in parts.items():
                data = json.dumps(dict(value, image=None)).encode() if ext == "json" else (tmp_path / value).read_bytes()
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    recs = list(build_source({"format": "webdataset", "urls": str(tmp_path / "chat.tar"), "shuffle_buffer": 0}))
    llava_file = tmp_path / "l.json"
    llava_file.write_text(json.dumps(LLAVA[:2]))
    llava = build_source(f"llava:{llava_file}")
    _same_records([llava[0], llava[1]], recs)


BAD = [  # (item, reason): each is skipped, counted and named
    ({"id": "b1", "image": "corrupt.png", "conversations": [
        {"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "x"}]}, "corrupt_image"),
    ({"id": "b2", "image": "missing.png", "conversations": [
        {"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "x"}]}, "missing_file"),
    ({"id": "b3", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "x"}]}, "image_count"),
    ({"id": "b4", "image": ["0.png", "1.png"], "conversations": [
        {"from": "human", "value": "which?"}, {"from": "gpt", "value": "x"}]}, "image_count"),
    ({"id": "b5", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "  "}]}, "empty_assistant_turn"),
    ({"id": "b6", "image": "0.png", "conversations": [{"from": "human", "value": "<image> what?"}]},
     "no_assistant_turn"),
    ({"id": "b7", "image": "0.png", "conversations": [
        {"from": "robot", "value": "<image> what?"}, {"from": "gpt", "value": "x"}]}, "bad_conversation"),
]


def test_bad_conversations_are_counted_by_reason_and_named(tmp_path):
    _images(tmp_path)
    (tmp_path / "corrupt.png").write_bytes((tmp_path / "0.png").read_bytes()[:60])  # a PNG cut short
    items = [LLAVA[0]] + [dict(item, extra="?") for item, _ in BAD] + [LLAVA[1]]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(items))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_source(f"llava:{path}")
    told = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(told) == 1 and "['extra']" in told[0]  # once, naming the key
    counter, good = BadDataCounter(keep=20), []
    for batch, bad in DataLoader(ds, batch_size=3, collate_fn=SkipBad()):
        counter.add(bad)
        good += batch or []
    assert [r["image_id"] for r in good] == ["one", "two"]
    expected = {}
    for _, reason in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(counter.by_reason) == expected
    named = {b.where: b.reason for b in counter.first}
    assert named == {f"{path}:item {k + 1}": reason for k, (_, reason) in enumerate(BAD)}
    details = {b.where: b.detail for b in counter.first}
    assert details[f"{path}:item 3"] == "1 image(s) for 2 <image> placeholder(s)"
    assert details[f"{path}:item 4"] == "2 image(s) for 0 <image> placeholder(s)"
    assert "robot" in details[f"{path}:item 7"]

    # the messages + images layout: a count that does not match, and no assistant turn
    datasets = pytest.importorskip("datasets")
    pil = Image.open(tmp_path / "0.png").convert("RGB")
    rows = {"messages": [MESSAGES[0][0], MESSAGES[0][0], MESSAGES[0][0][:1]], "images": [[pil], [pil, pil], [pil]]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "trl"))
    trl = build_source(f"hf:{tmp_path / 'trl'}")
    out = [trl[i] for i in range(len(trl))]
    assert isinstance(out[0], dict)
    assert [(b.reason, b.where) for b in out[1:]] == [
        ("image_count", f"{tmp_path / 'trl'} [train] row 1"), ("no_assistant_turn", f"{tmp_path / 'trl'} [train] row 2")]


def test_llava_schema_errors_and_short_forms(tmp_path):
    assert parse_source("llava:a.json") == {"format": "llava", "path": "a.json"}
    assert parse_source("llava:a.json:imgs") == {"format": "llava", "path": "a.json", "images": "imgs"}
    (tmp_path / "x.json").write_text(json.dumps([{"id": 1, "image": "a.png", "text": "no conversations"}]))
    with pytest.raises(DataError, match=r"x.json:item 0: expected a LLaVA item with 'conversations'"):
        build_source(f"llava:{tmp_path / 'x.json'}")
    (tmp_path / "y.json").write_text("[{")
    with pytest.raises(DataError, match="y.json: not valid JSON"):
        build_source(f"llava:{tmp_path / 'y.json'}")
    with pytest.raises(DataError, match="image folder does not exist"):
        build_source(f"llava:{tmp_path / 'y.json'}:{tmp_path / 'nowhere'}")
