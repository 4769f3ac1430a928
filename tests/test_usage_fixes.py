"""Fixes from a user audit: eval grouping without image_id, `mmgpt data shapes` input checks,
generation options in the Python API, a model folder without tokenizer.json, a split asked of a
saved single Dataset, and the distinct first bad records of the bad-data summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_api import ANSWERS, CAPTIONS, QUESTION, trained_tiny_dir, world_images

import train.evaluate as evaluate_module
from mmgpt.api import ModelLoadError, load
from mmgpt.cli import main
from train.data import BadDataCounter, BadRecord, DataError, build_source
from train.evaluate import evaluate, group_records

pytestmark = pytest.mark.usefixtures("single_torch_thread")

NO_METEOR = ("bleu", "rouge", "cider")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(rc: int, err: str) -> bool:
    return rc == 2 and err.count("\n") == 1 and "Traceback" not in err


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- 1. eval groups rows by the image's file when there is no image_id -------------------------------


@pytest.fixture()
def two_captions_each(tmp_path) -> Path:
    """4 images, each with a caption row and a question row, no image_id; then a second caption
    row of every image."""
    rows = []
    for i, (im, cap, answer) in enumerate(zip(world_images(), CAPTIONS, ANSWERS)):
        im.save(tmp_path / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "caption": cap})
        rows.append({"image": f"./img{i}.png", "question": QUESTION, "answer": answer})
    rows += [{"image": f"img{i}.png", "caption": f"{cap} again"} for i, cap in enumerate(CAPTIONS)]
    return write_jsonl(tmp_path / "two.jsonl", rows)


def test_group_records_groups_jsonl_rows_by_image_path(two_captions_each):
    source = build_source(f"jsonl:{two_captions_each}")
    assert len(source) == 12
    groups, bad = group_records(source)
    assert bad == 0 and len(groups) == 4
    for cap, group in zip(CAPTIONS, groups):
        assert group.references == [cap, f"{cap} again"]
        assert [q.question for q in group.questions] == [QUESTION]
    # --max-images counts images, not rows: reading stops at the first row of the third image (each
    # caption row already holds all captions of its image as references).
    groups, _ = group_records(build_source(f"jsonl:{two_captions_each}"), max_images=2)
    assert [(g.references, len(g.questions)) for g in groups] == [
        ([c, f"{c} again"], 1) for c in CAPTIONS[:2]
    ]


def test_eval_captions_each_image_once_and_retrieval_has_each_image_once(two_captions_each, monkeypatch):
    gallery_sizes = []
    real_embed = evaluate_module.embed

    def counting_embed(model, processor, images, texts, batch_size):
        gallery_sizes.append((len(images), len(texts)))
        return real_embed(model, processor, images, texts, batch_size)

    monkeypatch.setattr(evaluate_module, "embed", counting_embed)
    vl = load(trained_tiny_dir(), device="cpu")
    result = evaluate(vl.model, vl.processor, build_source(f"jsonl:{two_captions_each}"), batch_size=4,
                      caption_scorers=NO_METEOR)
    m = result.metrics
    assert (m["num_images"], m["num_questions"], m["bad_records"]) == (4, 4, 0)
    assert gallery_sizes == [(4, 8)]  # 4 images, each with its 2 captions
    captions = [ex for ex in result.examples if ex["task"] == "caption"]
    assert len(captions) == 4
    assert [ex["caption"] for ex in captions] == vl.caption(world_images())  # the API, an independent path
    assert m["caption_exact_match"] == 1.0  # each image's caption matches one of its two references


def test_eval_command_counts_images_not_rows(two_captions_each, capsys):
    rc, out, err = run_cli(capsys, "eval", trained_tiny_dir(), "--data", f"jsonl:{two_captions_each}", "--json",
                           "--task", "vqa", "--max-images", "3")
    assert rc == 0, err
    m = json.loads(out)
    assert (m["num_images"], m["num_questions"]) == (3, 3)


# --- 2. mmgpt data shapes checks its input --------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [(["--n", "-3"], "--n must be at least 1"), (["--n", "0"], "--n must be at least 1"),
     (["--image-size", "0"], "--image-size must be at least 32"),
     (["--image-size", "16"], "--image-size must be at least 32")],
)
def test_data_shapes_refuses_bad_numbers(capsys, tmp_path, args, words):
    out_dir = tmp_path / "out"
    rc, out, err = run_cli(capsys, "data", "shapes", out_dir, "--n", "2", *args)
    assert one_line_error(rc, err) and words in err and out == ""
    assert not out_dir.exists()


def test_data_shapes_refuses_a_file_or_unwritable_out_dir(capsys, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for target in (a_file, a_file / "sub"):
        rc, _, err = run_cli(capsys, "data", "shapes", target, "--n", "2")
        assert one_line_error(rc, err) and str(target) in err and "cannot write" in err, err
    assert a_file.read_text() == "x"


def test_data_shapes_rerun_with_fewer_images_removes_its_stale_images(capsys, tmp_path):
    out_dir = tmp_path / "shapes"
    rc, _, err = run_cli(capsys, "data", "shapes", out_dir, "--n", "3", "--split", "test")
    assert rc == 0, err
    (out_dir / "notes.txt").write_text("mine")
    (out_dir / "photo.png").write_bytes(b"not ours")
    (out_dir / "12345.png").write_bytes(b"a user's image with a number for a name")
    rc, out, err = run_cli(capsys, "data", "shapes", out_dir, "--n", "1", "--split", "test")
    assert rc == 0, err
    assert "wrote 1 test images" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["00000.png", "12345.png", "metadata.jsonl", "notes.txt",
                                                         "photo.png"]
    rows = [json.loads(line) for line in (out_dir / "metadata.jsonl").read_text().splitlines()]
    assert {r["file_name"] for r in rows} == {"00000.png"}
    assert len(build_source(f"imagefolder:{out_dir}")) == len(rows)
    assert "removed" in run_help(capsys, "data", "shapes")


def run_help(capsys, *argv) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


# --- 3. generation options are checked by the Python API ------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [({"num_beams": 0}, "num_beams"), ({"num_beams": 1.5}, "num_beams"), ({"batch_size": 0}, "batch_size"),
     ({"max_new_tokens": 0}, "max_new_tokens"), ({"num_return_sequences": 0}, "num_return_sequences")],
)
def test_api_generation_options_give_a_value_error_naming_them(kwargs, name):
    vl = load(trained_tiny_dir(), device="cpu")
    image = world_images()[0]
    with pytest.raises(ValueError, match=rf"^{name} must be an integer >= 1"):
        vl.caption([image], **kwargs)
    with pytest.raises(ValueError, match=rf"^{name} must be an integer >= 1"):
        vl.ask([image], QUESTION, **kwargs)


def test_api_stream_embed_and_evaluate_check_their_options():
    vl = load(trained_tiny_dir(), device="cpu")
    image = world_images()[0]
    with pytest.raises(ValueError, match="^num_beams must be"):
        vl.stream_answer(image, QUESTION, num_beams=0)
    with pytest.raises(ValueError, match="^batch_size must be"):
        vl.embed_images([image], batch_size=0)
    with pytest.raises(ValueError, match="^batch_size must be"):
        vl.embed_texts(["a red circle"], batch_size=0)
    with pytest.raises(ValueError, match="^num_beams must be"):
        evaluate(vl.model, vl.processor, [], num_beams=0)
    assert vl.caption(image, num_beams=2, batch_size=1) == CAPTIONS[0]  # valid options still work


# --- 4. a model folder without a usable tokenizer.json --------------------------------------------


def test_missing_or_broken_tokenizer_json_is_named(tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(trained_tiny_dir(), folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"model: no tokenizer\.json \(save the processor"):
        load(folder, device="cpu")
    rc, _, err = run_cli(capsys, "caption", folder, tmp_path / "x.png")
    assert one_line_error(rc, err) and "tokenizer.json" in err and str(folder) in err

    (folder / "tokenizer.json").write_text("{cut off")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json is unreadable .*save the processor again"):
        load(folder, device="cpu")


# --- 5. a split asked of a saved single Dataset ---------------------------------------------------


@pytest.fixture()
def saved_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    for i, im in enumerate(world_images()):
        im.save(tmp_path / f"img{i}.png")
    cols = {"image": [str(tmp_path / f"img{i}.png") for i in range(4)], "caption": CAPTIONS}
    datasets.Dataset.from_dict(cols).save_to_disk(str(tmp_path / "plain"))
    datasets.Dataset.from_dict(cols, split="validation").save_to_disk(str(tmp_path / "val"))
    return tmp_path / "plain", tmp_path / "val"


def test_split_of_a_saved_single_dataset(saved_datasets, capsys):
    plain, val = saved_datasets
    assert len(build_source(f"hf:{plain}")) == 4  # no split: all rows
    assert len(build_source(f"hf:{plain}:train")) == 4  # the default split of an unsplit dataset
    with pytest.raises(DataError, match=rf"{plain}: the folder holds one Dataset without splits.*drop the split"):
        build_source(f"hf:{plain}:validation")
    assert len(build_source(f"hf:{val}:validation")) == 4  # the split it recorded
    with pytest.raises(DataError, match=r"without splits \(its recorded split is 'validation'\), so split 'test'"):
        build_source({"format": "hf", "name": str(val), "split": "test"})
    # the command line: one line, exit 2, before the model is even looked at
    rc, _, err = run_cli(capsys, "eval", plain / "no-model", "--data", f"hf:{plain}:validation")
    assert one_line_error(rc, err) and str(plain) in err and "without splits" in err


# --- 6. the bad-data summary lists distinct records ------------------------------------------------


def test_bad_data_counter_keeps_the_first_distinct_records():
    a = BadRecord("corrupt_image", "bad.jsonl:21", "corrupt.png")
    b = BadRecord("not_an_image", "bad.jsonl:22", "text.png")
    c = BadRecord("missing_file", "bad.jsonl:23", "nope.png")
    counter = BadDataCounter(keep=5)
    for _ in range(3):  # three epochs over the same bad records
        counter.add([a, b, c])
    assert counter.total == 3 and counter.repeats == 6 and counter.first == [a, b, c]  # distinct records
    lines = counter.summary(60).splitlines()
    assert lines[1:] == [f"  {a}", f"  {b}", f"  {c}"]
    # round trip (a checkpoint) and merge (another rank) keep them distinct too
    again = BadDataCounter.from_dict(counter.to_dict())
    again.merge(counter)
    again.merge(counter.to_dict())
    assert again.first == [a, b, c] and again.total == 3
    small = BadDataCounter(keep=2)
    small.add([a, a, b, c])
    assert small.first == [a, b]


def test_bad_data_summary_names_a_text_file_passed_as_image(tmp_path):
    for i, im in enumerate(world_images()):
        im.save(tmp_path / f"img{i}.png")
    (tmp_path / "corrupt.png").write_bytes((tmp_path / "img0.png").read_bytes()[:60])
    (tmp_path / "text.png").write_text("hello")
    rows = [{"image": f"img{i}.png", "caption": c} for i, c in enumerate(CAPTIONS)]
    rows += [{"image": "corrupt.png", "caption": "x"}, {"image": "text.png", "caption": "y"},
             {"image": "nope.png", "caption": "z"}]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    source = build_source(f"jsonl:{data}")
    counter = BadDataCounter()
    for _epoch in range(3):
        counter.add([r for r in (source[i] for i in range(len(source))) if isinstance(r, BadRecord)])
    summary = counter.summary()
    assert summary.startswith("3 bad records, read 9 times")  # distinct records, repeats said
    listed = summary.splitlines()[1:]
    assert [line.split(": ")[0].strip() for line in listed] == [f"{data}:5", f"{data}:6", f"{data}:7"]
    assert "not_an_image" in listed[1] and "text.png" in listed[1]


# --- the model and processor API, as a transformers user calls them ------------------------------------


def test_generate_asks_several_questions_of_one_image_on_both_paths():
    """One image for N prompts is broadcast (the fast greedy path crashed; the generic path broadcast);
    N images for M prompts is a ValueError naming both counts."""
    import torch

    from mmgpt import MMGPTModel, MMGPTProcessor

    folder = trained_tiny_dir()
    model, proc = MMGPTModel.from_pretrained(folder).eval(), MMGPTProcessor.from_pretrained(folder)
    px = proc.images(world_images()[:1])
    prompts = proc.batch_prompts(["vqa"] * 3, [QUESTION, "what shape is it?", "how many objects are there?"])
    fast = model.generate(pixel_values=px, **prompts, max_new_tokens=4)
    generic = model.generate(pixel_values=px, **prompts, max_new_tokens=4, fast=False)
    alone = model.generate(pixel_values=px.expand(3, -1, -1, -1), **prompts, max_new_tokens=4)
    assert torch.equal(fast, generic) and torch.equal(fast, alone)
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        model.generate(pixel_values=proc.images(world_images()[:2]), **prompts, max_new_tokens=4)


def test_processor_decodes_whole_outputs_and_refuses_ragged_lists():
    from mmgpt import MMGPTModel, MMGPTProcessor

    folder = trained_tiny_dir()
    model, proc = MMGPTModel.from_pretrained(folder).eval(), MMGPTProcessor.from_pretrained(folder)
    out = model.generate(pixel_values=proc.images(world_images()[:2]), max_new_tokens=8)
    assert proc.batch_decode(out) == proc.batch_decode(out[:, 1:]) and all(proc.batch_decode(out))  # BOS skipped
    assert proc.batch_decode(out[0]) == proc.batch_decode(out[:1])  # one row
    with pytest.raises(ValueError, match="tasks 2, prompts 1, targets 2"):
        proc.batch_examples(["caption", "caption"], [""], ["a", "b"])
    with pytest.raises(ValueError, match="empty batch"):
        proc.batch_prompts([], [])
    assert proc(text=QUESTION)["input_ids"].tolist() == proc.batch_prompts(["vqa"], [QUESTION])["input_ids"].tolist()
    assert proc.images(world_images()[0]).shape[0] == 1  # one image, not a sequence of characters


def test_max_length_is_cut_to_the_decoders_positions():
    from mmgpt import MMGPTModel, MMGPTProcessor

    folder = trained_tiny_dir()
    model, proc = MMGPTModel.from_pretrained(folder).eval(), MMGPTProcessor.from_pretrained(folder)
    limit = model.config.text_config.n_positions
    with pytest.warns(UserWarning, match=f"max_length={limit + 100} cut to {limit}"):
        out = model.generate(pixel_values=proc.images(world_images()[:1]), max_length=limit + 100, min_new_tokens=80)
    assert out.shape[1] == limit


def test_pipeline_follows_the_saved_generation_config(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(trained_tiny_dir(), folder)
    vl = load(folder)
    full = vl.caption(world_images()[0])
    vl.model.generation_config.max_new_tokens = 2
    vl.model.save_pretrained(folder)
    short = load(folder).caption(world_images()[0])
    assert len(load(folder).processor.tokenizer.encode(short)) <= 2 < len(vl.processor.tokenizer.encode(full))
    assert load(folder, dtype="auto").dtype == load(folder).dtype
    import torch

    if not torch.cuda.is_available():  # refused before the weights are read
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            load(folder, device="cuda")
