"""Data formats as a new user meets them (issue 26): k-answer VQA accuracy, WebDataset samples with
several questions, bad records named by `mmgpt eval`, imagefolder split folders, bad records counted
once against the records read, and a run shorter than its warm-up."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest
from test_api import ANSWERS, CAPTIONS, QUESTION, trained_tiny_dir, world_images

from mmgpt.cli import main as cli
from train.data import DataError, DataWarning, build_source, parse_source
from train.data.bad import SkipBad, split_bad
from train.evaluate import group_records
from train.metrics import vqa_accuracy

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _world_folder(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, im in enumerate(world_images()):
        im.save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


def _eval(model: Path, data: str, *extra: str, capsys) -> tuple[int, str, str]:
    rc = cli(["eval", str(model), "--data", data, "--no-meteor", "--batch-size", "4", *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- 1. VQA accuracy with k reference answers ------------------------------------------------------


def test_vqa_accuracy_k_answers_by_hand():
    # k = 10: the official rule, mean over the 10 leave-one-out subsets of min(matches / 3, 1)
    ten = ["red"] * 3 + ["blue"] * 7
    assert vqa_accuracy("red", ten) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa_accuracy("blue", ten) == pytest.approx(1.0)
    assert vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx((0 + 9 * 1 / 3) / 10)  # 0.3
    assert vqa_accuracy("green", ten) == 0.0
    # k = 3: any match counts 1 (the official formula would give 2/3 for three identical answers)
    assert vqa_accuracy("red", ["red"] * 3) == 1.0
    assert vqa_accuracy("red", ["blue", "red", "blue"]) == 1.0
    assert vqa_accuracy("Red.", ["red", "red", "red"]) == 1.0  # after the official normalization
    assert vqa_accuracy("green", ["red"] * 3) == 0.0
    # k = 1: exact match after normalization
    assert vqa_accuracy("Two", ["2"]) == 1.0
    assert vqa_accuracy("three", ["2"]) == 0.0


@pytest.mark.parametrize("k, expected, rules", [
    (1, 1.0, {"official_10_answers": 0, "one_answer": 4, "any_of_k_answers": 0}),
    (3, 1.0, {"official_10_answers": 0, "one_answer": 0, "any_of_k_answers": 4}),
    (10, 0.9, {"official_10_answers": 4, "one_answer": 0, "any_of_k_answers": 0}),  # 3 of 10 said it: 0.9
])
def test_eval_scores_k_answers_and_says_which_rule(tmp_path, capsys, k, expected, rules):
    names = _world_folder(tmp_path)
    rows = []
    for name, ans in zip(names, ANSWERS):
        answers = [ans] if k == 1 else [ans] * 3 + ["wrong"] * (k - 3)
        rows.append({"image": name, "question": QUESTION, "answers": answers})
    data = _write_jsonl(tmp_path / f"k{k}.jsonl", rows)
    rc, out, err = _eval(trained_tiny_dir(), f"jsonl:{data}", "--task", "vqa", "--json", capsys=capsys)
    assert rc == 0, err
    m = json.loads(out)
    assert m["vqa_accuracy"] == pytest.approx(expected)  # the tiny model answers every question right
    assert m["vqa_rules"] == rules
    if rules["any_of_k_answers"]:
        assert "4 questions with 2-9 or over 10 reference answers scored 1 when the answer matches any" in err
    else:
        assert "VQA accuracy" not in err


# --- 2. WebDataset samples with several questions --------------------------------------------------


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_webdataset_sample_with_a_questions_list(tmp_path, capsys):
    samples = []
    for i, (im, cap, ans) in enumerate(zip(world_images(), CAPTIONS, ANSWERS)):
        meta = {"caption": cap, "source": "trial",
                "questions": [{"question": QUESTION, "answer": ans},
                              {"question": "is there a circle?", "answers": ["yes", "yes", "yes"]}]}
        samples.append((f"s{i}", {"png": _png(im), "json": json.dumps(meta).encode()}))
    shard = _tar(tmp_path / "multi.tar", samples)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(build_source({"format": "webdataset", "urls": str(shard), "shuffle_buffer": 0}))
    told = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(told) == 1 and "['source']" in told[0]  # said once, naming the key not read
    assert all(isinstance(it, list) and len(it) == 3 for it in items)  # one image: caption + 2 questions
    good, bad = split_bad(items)
    assert not bad
    assert [(r["task"], r["prompt"], r["target"]) for r in good[:3]] == [
        ("caption", "", CAPTIONS[0]), ("vqa", QUESTION, ANSWERS[0]), ("vqa", "is there a circle?", "yes")]
    assert [r["answers"] for r in good[1:3]] == [[ANSWERS[0]], ["yes"] * 3]
    assert len({r["image_id"] for r in good[:3]}) == 1  # the records of one sample share its image
    groups, nbad = group_records(iter(items))
    assert (len(groups), sum(len(g.questions) for g in groups), nbad) == (4, 8, 0)
    # training reads them too: the collator gets the caption and both questions of each image
    from mmgpt import MMGPTProcessor
    from train.collate import Collator

    batch = Collator(MMGPTProcessor.from_pretrained(trained_tiny_dir()))(items)
    assert (batch["num_images"], batch["num_rows"]) == (4, 12)
    # and `mmgpt eval --task vqa` finds the questions
    rc, out, err = _eval(trained_tiny_dir(), f"wds:{shard}", "--task", "vqa", "--json", capsys=capsys)
    assert rc == 0, err
    m = json.loads(out)
    assert m["num_questions"] == 8 and "no questions" not in err
    assert "['source']" in err  # the reader's note reaches the user


def test_a_questions_list_in_jsonl_rows(tmp_path):
    names = _world_folder(tmp_path)
    rows = [{"image": names[0], "questions": [{"question": QUESTION, "answer": ANSWERS[0]},
                                              {"question": "is it round?", "answers": ["yes", "no", "yes"]}]},
            {"image": names[1], "questions": ["one?", "two?"], "answers": ["1", ["2", "two"]]},  # parallel lists
            {"image": names[2], "questions": [{"question": "", "answer": "x"}]}]  # an empty question: bad
    ds = build_source(f"jsonl:{_write_jsonl(tmp_path / 'q.jsonl', rows)}")
    got = [ds[i] for i in range(len(ds))]
    good, bad = split_bad(got)
    assert [(r["prompt"], r["target"], r["answers"]) for r in good] == [
        (QUESTION, ANSWERS[0], [ANSWERS[0]]), ("is it round?", "yes", ["yes", "no", "yes"]),
        ("one?", "1", ["1"]), ("two?", "2", ["2", "two"])]
    assert [(b.where, b.reason) for b in bad] == [(f"{tmp_path / 'q.jsonl'}:3 question 0", "empty_text")]


# --- 3. mmgpt eval names the bad records -----------------------------------------------------------


def test_eval_names_bad_records_in_text_and_json(tmp_path, capsys):
    names = _world_folder(tmp_path)
    (tmp_path / "broken.png").write_bytes(_png(world_images()[0])[:60])  # a PNG cut short
    rows = [{"image": n, "caption": c} for n, c in zip(names, CAPTIONS)]
    rows += [{"image": "missing.png", "caption": "a purple triangle"},  # line 5
             {"image": "broken.png", "caption": "a red square"},  # line 6
             {"image": names[0], "caption": ""}]  # line 7
    data = _write_jsonl(tmp_path / "bad.jsonl", rows)
    rc, out, err = _eval(trained_tiny_dir(), f"jsonl:{data}", "--task", "caption", "--json", capsys=capsys)
    assert rc == 0, err
    m = json.loads(out)
    assert m["bad_records"] == 3
    assert [(b["where"], b["reason"]) for b in m["bad"]] == [
        (f"{data}:5", "missing_file"), (f"{data}:6", "corrupt_image"), (f"{data}:7", "empty_text")]
    assert m["bad"][0]["detail"].endswith("missing.png")
    rc, out, err = _eval(trained_tiny_dir(), f"jsonl:{data}", "--task", "caption", capsys=capsys)
    assert rc == 0
    for line, reason in ((5, "missing_file"), (6, "corrupt_image"), (7, "empty_text")):
        assert f"{data}:{line}: {reason}" in err


# --- 4. imagefolder with split folders ------------------------------------------------------------


def test_imagefolder_split_folders_read_as_datasets_reads_them(tmp_path):
    root = tmp_path / "folder"
    images = world_images()
    layout = {"train": [0, 1, 2], "test": [3]}
    for split, idx in layout.items():
        (root / split).mkdir(parents=True)
        rows = []
        for i in idx:
            images[i].save(root / split / f"{i}.png")
            rows.append({"file_name": f"{i}.png", "caption": CAPTIONS[i]})
        _write_jsonl(root / split / "metadata.jsonl", rows)

    def captions(short: str) -> list[str]:
        ds = build_source(parse_source(short))
        return [ds[i]["target"] for i in range(len(ds))]

    assert captions(f"imagefolder:{root}") == [CAPTIONS[i] for i in layout["train"]]  # train by default
    assert captions(f"imagefolder:{root}:train") == [CAPTIONS[i] for i in layout["train"]]
    assert captions(f"imagefolder:{root}:test") == [CAPTIONS[i] for i in layout["test"]]
    assert captions(str(root)) == [CAPTIONS[i] for i in layout["train"]]  # a bare folder path
    assert parse_source(f"imagefolder:{root}:test") == {"format": "imagefolder", "path": str(root), "split": "test"}
    with pytest.raises(DataError, match="no split folder 'validation'.*test, train"):
        build_source(f"imagefolder:{root}:validation")
    # the independent reference: datasets' own imagefolder builder on the same folder
    datasets = pytest.importorskip("datasets")
    ref = datasets.load_dataset("imagefolder", data_dir=str(root))
    assert sorted(ref) == ["test", "train"]
    for split in ref:
        assert sorted(ref[split]["caption"]) == sorted(captions(f"imagefolder:{root}:{split}"))


# --- 5. bad records counted once, against the records read; the run saves what it trained ----------


SMALL = ["data.num_workers=0", "log_every=1", "progress=false", "model.tokenizer_texts=400",
         "time_schedule=false", "max_minutes=null", "data.validation=null", "optim.warmup_steps=2"]


def test_bad_records_counted_once_and_the_stopped_run_saves_its_model(tmp_path, capsys):
    from train.main import main as train_main

    images = world_images()
    rows = []
    for k in range(60):  # 60 rows, 4 of them bad (6.7%)
        name = f"{k}.png"
        if k in (7, 23, 41):
            (tmp_path / name).write_bytes(b"not a png")
        elif k != 55:  # row 55 names a file that does not exist
            images[k % 4].save(tmp_path / name)
        rows.append({"image": name, "caption": CAPTIONS[k % 4]})
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    rc = train_main([str(ROOT / "configs/train/shapes-tiny.yaml"), *SMALL, "max_steps=30", "batch_size=6",
                     f"output_dir={out}", f"data.train=jsonl:{data}"])
    err = capsys.readouterr().err
    assert rc == 2
    # 60 rows, batch 6: the first pass is 10 steps; the judgement comes at the first step after it
    assert "stopped at step 11 of 30" in err
    assert "4 bad records of 60 seen (6.7%)" in err and "data.max_bad_fraction=0.01" in err
    assert "not_an_image: 3" in err and "missing_file: 1" in err and f"{data}:8: not_an_image" in err
    assert str(out / "model") in err and (out / "model" / "model.safetensors").is_file()
    # with a limit the 4 bad rows fit, the run trains to its end
    rc = train_main([str(ROOT / "configs/train/shapes-tiny.yaml"), *SMALL, "max_steps=12", "batch_size=6",
                     f"output_dir={tmp_path / 'run2'}", f"data.train=jsonl:{data}", "data.max_bad_fraction=0.1"])
    assert rc == 0, capsys.readouterr().err


def test_bad_counter_in_a_data_loader_counts_each_record_once(tmp_path):
    from torch.utils.data import DataLoader

    from train.data import BadDataCounter

    names = _world_folder(tmp_path)
    rows = [{"image": n, "caption": c} for n, c in zip(names, CAPTIONS)] + [{"image": "gone.png", "caption": "x"}]
    ds = build_source(f"jsonl:{_write_jsonl(tmp_path / 'd.jsonl', rows)}")
    counter = BadDataCounter()
    for _epoch in range(3):
        for _batch, bad in DataLoader(ds, batch_size=2, collate_fn=SkipBad()):
            counter.add(bad)
    assert (counter.total, counter.repeats) == (1, 2)
    assert counter.summary(5).startswith("1 bad records of 5 seen (20.0%), read 3 times")


# --- 6. a run shorter than its warm-up -----------------------------------------------------------


def test_a_warmup_longer_than_the_run_is_scaled_and_said():
    from train.config import load_config
    from train.parts import lr_lambda

    recipe = ROOT / "configs/train/shapes-tiny.yaml"
    with pytest.warns(UserWarning, match=r"optim.warmup_steps=100 is longer than the run \(max_steps=30\).*over 3 steps"):
        cfg = load_config(recipe, ["max_steps=30"])
    assert cfg.optim.warmup_steps == 3
    f = lr_lambda(cfg)
    assert [f(s) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])  # optim.lr reached at the 3rd step
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a run longer than its warm-up: nothing to say, nothing changed
        assert load_config(recipe, ["max_steps=1000"]).optim.warmup_steps == 100
        assert load_config(recipe, ["max_steps=30", "optim.warmup_steps=0"]).optim.warmup_steps == 0
        assert load_config(recipe, ["max_steps=30", "optim.warmup_steps=30"]).optim.warmup_steps == 30  # lr at the end
