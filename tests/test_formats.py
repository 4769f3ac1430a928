"""Every format reads back the same records; schema errors, bad records and the short forms.

The writers here are written by hand from each format's documentation, independently of the
readers under test.
"""

import csv
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from train.data import BadDataCounter, DataError, SkipBad, SourceSpec, build_source, parse_source
from train.data.webdataset import expand_braces

# Ten records: six captions, four questions (with 1, 3, 10 and 2 reference answers).
RECORDS = [
    {"task": "caption", "prompt": "", "target": "a red square on grey"},
    {"task": "vqa", "prompt": "what color is the circle?", "target": "blue", "answers": ["blue"]},
    {"task": "caption", "prompt": "", "target": "two dots, one green"},
    {"task": "caption", "prompt": "", "target": 'a photo with a comma, and "quotes"'},
    {"task": "vqa", "prompt": "how many objects are there?", "target": "two", "answers": ["two", "2", "two"]},
    {"task": "caption", "prompt": "", "target": "noise"},
    {"task": "vqa", "prompt": "is it day?", "target": "yes", "answers": ["yes"] * 7 + ["no"] * 3},
    {"task": "caption", "prompt": "", "target": "ünïcode caption"},
    {"task": "vqa", "prompt": "what is it?", "target": "a cat", "answers": ["a cat", "cat"]},
    {"task": "caption", "prompt": "", "target": "the last one"},
]
CAPTIONS = [i for i, r in enumerate(RECORDS) if r["task"] == "caption"]
QUESTIONS = [i for i, r in enumerate(RECORDS) if r["task"] == "vqa"]


def _image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (12 + i, 16, 3), dtype=np.uint8))


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    _image(i).save(buf, format="PNG")
    return buf.getvalue()


def _row(i: int, image_key: str, image_value) -> dict:
    r = RECORDS[i]
    if r["task"] == "caption":
        return {image_key: image_value, "caption": r["target"]}
    return {image_key: image_value, "question": r["prompt"], "answer": r["target"], "answers": r["answers"]}


def _write_images(folder: Path, name=lambda i: f"img_{i}.png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(RECORDS)):
        (folder / name(i)).write_bytes(_png(i))


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _write_csv(path: Path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["file_name", "caption", "question", "answer", "answers"])
        w.writeheader()
        k = 0
        for r in rows:
            r = dict(r)
            if "answers" in r:  # alternate the two documented encodings: JSON list, `|`-separated
                r["answers"] = "|".join(r["answers"]) if k % 2 else json.dumps(r["answers"])
                k += 1
            w.writerow(r)


def _write_tar(path: Path, indices) -> None:
    with tarfile.open(path, "w") as tar:
        for i in indices:
            r = RECORDS[i]
            if r["task"] == "caption":
                text = ("txt", r["target"].encode())
            else:
                text = ("json", json.dumps(_row(i, "unused", None) | {"image_id": f"k{i:03d}"}).encode())
            for ext, data in (("png", _png(i)), text):
                info = tarfile.TarInfo(f"sample/k{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _write_all(root: Path) -> dict:
    """The ten records in every format; returns spec -> indices of RECORDS it holds."""
    n = range(len(RECORDS))
    img_dir = root / "images"
    _write_images(img_dir)
    # JSONL / CSV next to an image folder, paths relative to the file; one absolute path
    rows = [_row(i, "image", f"images/img_{i}.png") for i in n]
    rows[3]["image"] = str(img_dir / "img_3.png")
    _write_jsonl(root / "data.jsonl", rows)
    _write_csv(root / "data.csv", [_row(i, "file_name", f"images/img_{i}.png") for i in n])
    # imagefolder, metadata.jsonl and metadata.csv
    for kind in ("jsonl", "csv"):
        folder = root / f"folder_{kind}"
        _write_images(folder)
        meta = [_row(i, "file_name", f"img_{i}.png") for i in n]
        (_write_jsonl if kind == "jsonl" else _write_csv)(folder / f"metadata.{kind}", meta)
    # COCO captions
    coco = {
        "images": [
            {"id": 100 + i, "file_name": f"img_{i}.png", "width": 16, "height": 12 + i} for i in CAPTIONS
        ],
        "annotations": [
            {"id": 7 * i, "image_id": 100 + i, "caption": RECORDS[i]["target"] + " "} for i in CAPTIONS
        ],
    }
    (root / "coco.json").write_text(json.dumps(coco))
    # VQAv2: PNG bytes under COCO's .jpg names (the loader reads the content, not the name)
    vqa_dir = root / "val2014"
    _write_images(vqa_dir, lambda i: f"COCO_val2014_{500 + i:012d}.jpg")
    qs = {
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 500 + i, "question": RECORDS[i]["prompt"], "question_id": 9000 + i}
            for i in QUESTIONS
        ],
    }
    anns = {
        "data_subtype": "val2014",
        "annotations": [
            {
                "question_id": 9000 + i,
                "image_id": 500 + i,
                "question_type": "what",
                "answer_type": "other",
                "multiple_choice_answer": RECORDS[i]["target"],
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                    for k, a in enumerate(RECORDS[i]["answers"])
                ],
            }
            for i in QUESTIONS
        ],
    }
    (root / "q.json").write_text(json.dumps(qs))
    (root / "a.json").write_text(json.dumps(anns))
    # Hugging Face save_to_disk: PIL images, and a second copy with path strings
    import datasets

    cols = {"image": [_image(i) for i in n], "caption": [], "question": [], "answer": [], "answers": []}
    for r in RECORDS:
        vqa = r["task"] == "vqa"
        cols["caption"].append(None if vqa else r["target"])
        cols["question"].append(r["prompt"] if vqa else None)
        cols["answer"].append(r["target"] if vqa else None)
        cols["answers"].append(r.get("answers", []))
    feats = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "answers": datasets.Sequence(datasets.Value("string")),
        }
    )
    datasets.Dataset.from_dict(cols, features=feats).save_to_disk(str(root / "hf"))
    paths = dict(cols, image=[str(img_dir / f"img_{i}.png") for i in n], text=cols["caption"])
    del paths["caption"]
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(paths)}).save_to_disk(
        str(root / "hf_paths")
    )
    # WebDataset: three shards
    (root / "wds").mkdir()
    for s, idx in enumerate((range(4), range(4, 7), range(7, 10))):
        _write_tar(root / "wds" / f"shard-{s:02d}.tar", idx)
    all_ = list(n)
    return {
        "jsonl": ({"format": "jsonl", "path": str(root / "data.jsonl")}, all_),
        "csv": ({"format": "csv", "path": str(root / "data.csv")}, all_),
        "imagefolder_jsonl": ({"format": "imagefolder", "path": str(root / "folder_jsonl")}, all_),
        "imagefolder_csv": ({"format": "imagefolder", "path": str(root / "folder_csv")}, all_),
        "coco": (
            {"format": "coco", "annotations": str(root / "coco.json"), "images": str(root / "images")},
            CAPTIONS,
        ),
        "vqav2": (
            {
                "format": "vqav2",
                "questions": str(root / "q.json"),
                "annotations": str(root / "a.json"),
                "images": str(vqa_dir),
            },
            QUESTIONS,
        ),
        "hf": ({"format": "hf", "name": str(root / "hf"), "split": "train"}, all_),
        "hf_paths": (
            {
                "format": "hf",
                "name": str(root / "hf_paths"),
                "split": "validation",
                "columns": {"caption": "text"},
            },
            all_,
        ),
        "webdataset": (
            {"format": "webdataset", "urls": str(root / "wds" / "shard-{00..02}.tar"), "shuffle_buffer": 0},
            all_,
        ),
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    return root, _write_all(root)


def _read_all(ds) -> list:
    items = [ds[i] for i in range(len(ds))] if hasattr(ds, "__len__") else list(ds)
    return items


@pytest.mark.parametrize(
    "fmt",
    ["jsonl", "csv", "imagefolder_jsonl", "imagefolder_csv", "coco", "vqav2", "hf", "hf_paths", "webdataset"],
)
def test_every_format_reads_back_the_same_records(written, fmt):
    _, specs = written
    spec, indices = specs[fmt]
    got = _read_all(build_source(spec))
    assert len(got) == len(indices)
    for rec, i in zip(got, indices):
        want = RECORDS[i]
        assert isinstance(rec, dict), rec
        assert {k: rec.get(k) for k in want} == want, (fmt, i)
        if rec["task"] == "caption":
            assert rec["references"] == [want["target"]]
        assert rec["image"].mode == "RGB"
        assert np.array_equal(np.asarray(rec["image"]), np.asarray(_image(i))), (fmt, i)
    if fmt == "vqav2":
        assert got[0]["image_id"] == str(500 + QUESTIONS[0]) and got[0]["qtype"] == "what"


def test_coco_references_and_vqa_majority(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(0))
    coco = {
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [{"image_id": 1, "caption": c} for c in ("one cat", "a cat", "cat")],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    ds = build_source(f"coco:{tmp_path / 'c.json'}:{tmp_path}")
    assert [ds[i]["target"] for i in range(3)] == ["one cat", "a cat", "cat"]
    assert all(ds[i]["references"] == ["one cat", "a cat", "cat"] for i in range(3))
    # JSONL with only `answers`: the target is the most common one
    _write_jsonl(tmp_path / "v.jsonl", [{"image": "a.png", "question": "q?", "answers": ["b", "a", "a"]}])
    rec = build_source(str(tmp_path / "v.jsonl"))[0]
    assert rec["target"] == "a" and rec["answers"] == ["b", "a", "a"]
    # a list of captions in one cell: one record per caption, all of them as references
    _write_jsonl(tmp_path / "l.jsonl", [{"image": "a.png", "caption": ["x y", "z"]}])
    ds = build_source(str(tmp_path / "l.jsonl"))
    assert [(ds[k]["target"], ds[k]["references"]) for k in range(2)] == [
        ("x y", ["x y", "z"]),
        ("z", ["x y", "z"]),
    ]
    import datasets

    datasets.Dataset.from_dict(
        {
            "image": [str(tmp_path / "a.png")] * 2,
            "captions": [["p", "q"], ["r"]],
            "question": [None, None],
            "answers": [None, None],
        }
    ).save_to_disk(str(tmp_path / "hf"))
    ds = build_source({"format": "hf", "name": str(tmp_path / "hf"), "columns": {"caption": "captions"}})
    assert [ds[k]["target"] for k in range(len(ds))] == ["p", "q", "r"] and ds[2]["references"] == ["r"]
    assert np.array_equal(np.asarray(ds[2]["image"]), np.asarray(_image(0)))
    # VQAv2-style answer dicts in JSONL
    _write_jsonl(
        tmp_path / "d.jsonl", [{"image": "a.png", "question": "q?", "answers": [{"answer": "b"}] * 2}]
    )
    assert build_source(str(tmp_path / "d.jsonl"))[0]["answers"] == ["b", "b"]


def test_unknown_spec_key_names_nearest(written):
    _, specs = written
    with pytest.raises(ValueError, match="shufle_buffer.*did you mean 'shuffle_buffer'"):
        build_source(dict(specs["webdataset"][0], shufle_buffer=10))
    with pytest.raises(ValueError, match="'size' is not used by format 'jsonl'"):
        build_source(dict(specs["jsonl"][0], size=10))
    with pytest.raises(ValueError, match="did you mean 'jsonl'"):
        SourceSpec.from_dict({"format": "jsnl", "path": "x"})
    with pytest.raises(ValueError, match="needs 'images'"):
        SourceSpec.from_dict({"format": "coco", "annotations": "x.json"})
    with pytest.raises(ValueError, match="did you mean 'caption'"):
        build_source(dict(specs["csv"][0], columns={"captoin": "text"}))


def test_schema_errors_name_file_and_columns(tmp_path, written):
    root, _ = written
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file_name,description\na.png,hello\n")
    with pytest.raises(DataError) as e:
        build_source(f"csv:{bad_csv}")
    assert str(bad_csv) in str(e.value) and "['description', 'file_name']" in str(e.value)
    assert "caption" in str(e.value)

    bad_jsonl = tmp_path / "bad.jsonl"
    _write_jsonl(bad_jsonl, [{"image": "a.png", "caption": "ok"}, {"image": "b.png", "desc": "x"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected .*found keys \['desc', 'image'\]"):
        build_source(str(bad_jsonl))
    bad_jsonl.write_text('{"image": "a.png", "caption": "ok"}\n{"image": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        build_source(str(bad_jsonl))

    (tmp_path / "coco.json").write_text(json.dumps({"images": [], "captions": []}))
    with pytest.raises(
        DataError, match=r"coco.json: expected COCO captions JSON .*found keys \['captions', 'images'\]"
    ):
        build_source({"format": "coco", "annotations": str(tmp_path / "coco.json"), "images": str(tmp_path)})
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="broken.json: cannot read"):
        build_source(
            {"format": "coco", "annotations": str(tmp_path / "broken.json"), "images": str(tmp_path)}
        )

    with pytest.raises(
        DataError, match=r"expected .*found columns \['answer', 'answers', 'caption', 'image'"
    ):
        build_source({"format": "hf", "name": str(root / "hf"), "columns": {"image": "picture"}})
    with pytest.raises(DataError, match="no split 'test'.*validation"):
        build_source({"format": "hf", "name": str(root / "hf_paths"), "split": "test"})
    with pytest.raises(DataError, match="metadata.jsonl or metadata.csv"):
        build_source({"format": "imagefolder", "path": str(tmp_path)})


def _bad_jsonl(root: Path, n_good: int) -> Path:
    """n_good good captions plus one of each kind of bad record, shuffled."""
    (root / "good.png").write_bytes(_png(1))
    (root / "corrupt.png").write_bytes(_png(2)[:60])  # PNG header, then cut off
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("not an image at all")
    rows = [{"image": "good.png", "caption": f"good {k}"} for k in range(n_good)]
    rows += [
        {"image": "missing.png", "caption": "missing file"},
        {"image": "corrupt.png", "caption": "corrupt bytes"},
        {"image": "empty.png", "caption": "zero bytes"},
        {"image": "text.png", "caption": "not an image"},
        {"image": "good.png", "caption": "  "},
        {"image": "good.png", "question": "q?", "answer": ""},
    ]
    random.Random(0).shuffle(rows)
    path = root / "mixed.jsonl"
    _write_jsonl(path, rows)
    return path


def test_bad_records_skipped_and_counted_in_workers(tmp_path):
    ds = build_source(str(_bad_jsonl(tmp_path, n_good=14)))
    assert len(ds) == 20
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=SkipBad())
    counter, good = BadDataCounter(), []
    for batch, bad in loader:
        counter.add(bad)
        good += batch or []
    assert sorted(r["target"] for r in good) == sorted(f"good {k}" for k in range(14))
    assert dict(counter.by_reason) == {
        "missing_file": 1,
        "corrupt_image": 1,
        "empty_file": 1,
        "not_an_image": 1,
        "empty_text": 2,
    }
    assert counter.total == 6
    assert "missing_file: 1" in counter.summary(20) and "missing.png" in counter.summary(20)


def test_max_bad_fraction(tmp_path):
    ds = build_source(str(_bad_jsonl(tmp_path, n_good=94)))  # 6 bad of 100
    counter = BadDataCounter(keep=3)
    seen = 0
    for i in range(len(ds)):
        _, bad = SkipBad()([ds[i]])
        counter.add(bad)
        seen += 1
        if seen < 100:
            counter.check(seen, max_bad_fraction=0.01)  # not judged before 100 seen
    counter.check(seen, max_bad_fraction=0.10)  # 6% is fine under a 10% limit
    with pytest.raises(DataError) as e:
        counter.check(seen, max_bad_fraction=0.01)
    first = counter.first[0]
    assert f"{first.where}: {first.reason}" in str(e.value) and "6 bad records of 100" in str(e.value)
    assert len(counter.first) == 3
    small = BadDataCounter()
    small.add(counter.first[:1])
    small.check(10)  # too few seen to judge
    with pytest.raises(DataError):
        small.check(10, final=True)
    merged = BadDataCounter.from_dict(counter.to_dict())
    merged.merge(small.to_dict())
    assert merged.total == 6  # small holds one of counter's records: counted once


def _wds_keys(spec: dict, world: int, workers: int) -> list[str]:
    keys = []
    for rank in range(world):
        ds = build_source(dict(spec, rank=rank, world_size=world, shuffle_buffer=3))
        loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=SkipBad())
        for batch, bad in loader:
            assert not bad
            keys += [r["image_id"] for r in batch or []]
    return keys


@pytest.mark.parametrize("n_shards", [3, 5])
def test_webdataset_split_over_ranks_and_workers(tmp_path, n_shards):
    """2 ranks x 2 workers read every sample exactly once: by shard (5 shards) or by sample (3)."""
    chunks = np.array_split(np.arange(len(RECORDS)), n_shards)
    for s, idx in enumerate(chunks):
        _write_tar(tmp_path / f"s{s}.tar", idx.tolist())
    spec = {"format": "wds", "urls": str(tmp_path / "s*.tar")}
    keys = _wds_keys(spec, world=2, workers=2)
    want = [
        f"sample/k{i:03d}" if RECORDS[i]["task"] == "caption" else f"k{i:03d}" for i in range(len(RECORDS))
    ]
    assert sorted(keys) == sorted(want)


def test_webdataset_shuffles_and_counts_bad(tmp_path):
    _write_tar(tmp_path / "a.tar", range(10))
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        for name, data in (
            ("x.png", b""),
            ("x.txt", b"empty image"),
            ("y.png", _png(0)),
            ("y.json", b"{bad"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = build_source(
        {
            "format": "webdataset",
            "urls": [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")],
            "shuffle_buffer": 5,
            "rank": 0,
            "world_size": 1,
        }
    )
    epoch0 = [r["target"] if isinstance(r, dict) else r.reason for r in ds]
    ds.set_epoch(1)
    epoch1 = [r["target"] if isinstance(r, dict) else r.reason for r in ds]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    assert sorted(x for x in epoch0 if x in ("empty_file", "bad_json")) == ["bad_json", "empty_file"]


def test_parse_source_short_forms(written):
    root, _ = written
    assert parse_source("shapes:train:10000") == {"format": "shapes", "split": "train", "size": 10000}
    assert parse_source("shapes:test:50:128") == {
        "format": "shapes",
        "split": "test",
        "size": 50,
        "image_size": 128,
    }
    assert parse_source("shapes") == {"format": "shapes"}
    assert parse_source("jsonl:data/x.jsonl") == {"format": "jsonl", "path": "data/x.jsonl"}
    assert parse_source("csv:x.csv") == {"format": "csv", "path": "x.csv"}
    assert parse_source("imagefolder:dir") == {"format": "imagefolder", "path": "dir"}
    assert parse_source("coco:ann.json:imgs") == {
        "format": "coco",
        "annotations": "ann.json",
        "images": "imgs",
    }
    assert parse_source("vqav2:q.json:a.json:imgs") == {
        "format": "vqav2",
        "questions": "q.json",
        "annotations": "a.json",
        "images": "imgs",
    }
    assert parse_source("hf:user/set") == {"format": "hf", "name": "user/set"}
    assert parse_source("hf:user/set:validation") == {
        "format": "hf",
        "name": "user/set",
        "split": "validation",
    }
    assert parse_source("wds:shards/{000..003}.tar") == {
        "format": "webdataset",
        "urls": "shards/{000..003}.tar",
    }
    # bare paths: the format is inferred
    assert parse_source(str(root / "data.jsonl"))["format"] == "jsonl"
    assert parse_source(str(root / "data.csv"))["format"] == "csv"
    assert parse_source(str(root / "folder_csv"))["format"] == "imagefolder"
    assert parse_source(str(root / "hf"))["format"] == "hf"
    assert parse_source(str(root / "wds" / "shard-{00..02}.tar"))["format"] == "webdataset"
    for bad in ("coco:only.json", "vqav2:q.json:a.json", "shapes:train:many", "nowhere/at/all"):
        with pytest.raises(ValueError):
            parse_source(bad)
    # a short form builds the same source as its dict
    ds = build_source(f"vqav2:{root / 'q.json'}:{root / 'a.json'}:{root / 'val2014'}")
    assert [ds[i]["target"] for i in range(len(ds))] == [RECORDS[i]["target"] for i in QUESTIONS]
    assert expand_braces("s-{0..2}-{a,b}.tar") == [
        "s-0-a.tar",
        "s-0-b.tar",
        "s-1-a.tar",
        "s-1-b.tar",
        "s-2-a.tar",
        "s-2-b.tar",
    ]


def test_no_heavy_imports():
    """train.data imports neither accelerate nor mmgpt, and datasets only inside functions."""
    import ast

    import train.data

    for path in Path(train.data.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not [n for n in names if n.split(".")[0] in ("accelerate", "mmgpt", "datasets")], (
                path,
                names,
            )
