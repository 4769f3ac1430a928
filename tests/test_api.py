"""The high-level API against hand-driven model calls, on a tiny model trained on the spot.

`trained_tiny_dir()` (also used by test_cli_use.py and test_evaluate.py) trains the tiny preset for
a few dozen steps on four drawn images with distinct captions and colour answers, so captions and
answers are meaningful, and saves it once per test session.
"""

from __future__ import annotations

import atexit
import functools
import io
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from encoders import ImageLoadError
from mmgpt import MMGPTModel, MMGPTProcessor, build_model
from mmgpt.api import ModelLoadError, VisionLanguagePipeline, load

# (fill colour, shape, caption, answer to "what color is it?")
WORLD = [
    ((220, 40, 40), "circle", "a red circle", "red"),
    ((40, 80, 220), "square", "a blue square", "blue"),
    ((40, 170, 60), "circle", "a green circle", "green"),
    ((225, 200, 30), "square", "a yellow square", "yellow"),
]
QUESTION = "what color is it?"
CAPTIONS = [w[2] for w in WORLD]
ANSWERS = [w[3] for w in WORLD]


def draw(color, shape) -> Image.Image:
    im = Image.new("RGB", (64, 64), (235, 235, 235))
    d = ImageDraw.Draw(im)
    (d.ellipse if shape == "circle" else d.rectangle)((12, 12, 52, 52), fill=color)
    return im


def world_images() -> list[Image.Image]:
    return [draw(c, s) for c, s, _, _ in WORLD]


@functools.lru_cache(maxsize=1)
def trained_tiny_dir() -> Path:
    """Train the tiny preset on WORLD (captions + questions) and save it; cached for the session."""
    texts = CAPTIONS + [f"question: {QUESTION} answer: {a}" for a in ANSWERS]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster than two fighting over 2 cores
    try:
        torch.manual_seed(0)
        model, proc = build_model("tiny", texts=texts)
        pixels = proc.images(world_images())  # (4, 3, 64, 64)
        n = len(WORLD)
        batch = proc.batch_examples(["caption"] * n + ["vqa"] * n, [""] * n + [QUESTION] * n, CAPTIONS + ANSWERS)
        image_index = torch.arange(n).repeat(2)  # (2n,): each image has a caption row and a question row
        itc_mask = torch.arange(2 * n) < n
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        model.train()
        for _ in range(60):
            out = model(pixel_values=pixels, image_index=image_index, itc_mask=itc_mask, **batch)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        assert out.lm_loss.item() < 0.2, out.lm_loss.item()
    finally:
        torch.set_num_threads(threads)
    folder = Path(tempfile.mkdtemp(prefix="mmgpt-tiny-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    model.eval().save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return trained_tiny_dir()


@pytest.fixture(scope="module")
def vl(model_dir) -> VisionLanguagePipeline:
    return load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def reference(model_dir):
    """The same weights loaded independently of the API, driven by hand."""
    return MMGPTModel.from_pretrained(model_dir).eval(), MMGPTProcessor.from_pretrained(model_dir)


def hand_decode(tokenizer, ids: torch.Tensor) -> list[str]:
    out = []
    for row in ids.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        out.append(tokenizer.decode(row).strip())
    return out


def test_caption_equals_hand_driven_generate(vl, reference):
    model, proc = reference
    images = world_images()
    with torch.no_grad():
        seqs = model.generate(pixel_values=proc.images(images), max_new_tokens=32, num_beams=1, do_sample=False)
    expect = hand_decode(proc.tokenizer, seqs[:, 1:])  # drop BOS, the whole caption prompt
    assert vl.caption(images) == expect
    assert expect == CAPTIONS  # the model learned its captions: outputs are meaningful

    with torch.no_grad():
        seqs = model.generate(pixel_values=proc.images(images), max_new_tokens=2, num_beams=3)
    assert vl.caption(images, max_new_tokens=2, num_beams=3) == hand_decode(proc.tokenizer, seqs[:, 1:])


def test_batched_caption_equals_one_by_one_and_inputs_may_be_paths_or_bytes(vl, tmp_path):
    images = world_images()
    one_by_one = [vl.caption(im) for im in images]
    assert all(isinstance(c, str) for c in one_by_one)
    assert vl.caption(images, batch_size=3) == one_by_one
    assert vl.caption(images, batch_size=3, num_beams=2) == [vl.caption(im, num_beams=2) for im in images]

    path = tmp_path / "blue.png"
    images[1].save(path)
    buf = io.BytesIO()
    images[2].save(buf, format="PNG")
    assert vl.caption([path, str(path), buf.getvalue()]) == [CAPTIONS[1], CAPTIONS[1], CAPTIONS[2]]

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageLoadError, match="broken.png"):
        vl.caption([path, bad])


def test_ask_one_question_for_many_images_and_one_per_image(vl, reference):
    model, proc = reference
    images = world_images()
    answers = vl.ask(images, QUESTION, batch_size=3)
    assert answers == ANSWERS

    # Hand-driven: left-padded prompts with different lengths in one batch, new tokens only.
    questions = [QUESTION, "what is it?", QUESTION, "what color is the big square in the middle?"]
    batch = proc.batch_prompts(["vqa"] * 4, questions)
    assert (batch["attention_mask"][:, 0] == 0).any()  # really left-padded
    with torch.no_grad():
        seqs = model.generate(pixel_values=proc.images(images), **batch, max_new_tokens=32, do_sample=False)
    expect = hand_decode(proc.tokenizer, seqs[:, batch["input_ids"].shape[1]:])
    assert vl.ask(images, questions) == expect
    assert [vl.ask(im, q) for im, q in zip(images, questions)] == expect

    assert vl.ask(images[0], [QUESTION, QUESTION]) == ["red", "red"]  # several questions, one image
    with pytest.raises(ValueError, match="3 questions for 4 images"):
        vl.ask(images, questions[:3])


def test_stream_answer_pieces_join_to_ask(vl):
    image = world_images()[3]
    pieces = list(vl.stream_answer(image, QUESTION))
    assert pieces and "".join(pieces) == vl.ask(image, QUESTION) == "yellow"
    pieces = list(vl.stream_caption(image))
    assert len(pieces) > 1 and "".join(pieces) == vl.caption(image) == "a yellow square"


def test_similarity_is_cosine_of_model_embeddings(vl, reference):
    model, proc = reference
    images = world_images()
    texts = CAPTIONS + ["something else entirely"]
    sim = vl.similarity(images, texts)
    assert sim.shape == (4, 5)
    img, txt = vl.embed_images(images), vl.embed_texts(texts)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(sim, img @ txt.T, atol=1e-6)
    with torch.no_grad():
        direct_img = model.embed_image(proc.images(images))
        batch = proc.batch_texts(texts)
        direct_txt = model.embed_text(batch["input_ids"], batch["attention_mask"])
        # one text at a time, no padding at all: padding must not change an embedding
        single_txt = torch.cat([model.embed_text(torch.tensor([proc.batch_texts([t])["input_ids"][0].tolist()]))
                                for t in texts])
    assert torch.allclose(img, direct_img, atol=1e-5)
    assert torch.allclose(txt, direct_txt, atol=1e-5)
    assert torch.allclose(txt, single_txt, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(direct_img[:, None, :], direct_txt[None, :, :], dim=-1)
    assert torch.allclose(sim, cos, atol=1e-5)
    assert torch.allclose(vl.embed_texts(texts, batch_size=2), txt, atol=1e-5)


def test_bad_model_folders_raise_model_load_error(tmp_path, model_dir):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelLoadError, match="no such model folder") as err:
        load(missing)
    assert str(missing) in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(empty)

    no_weights = tmp_path / "no_weights"
    shutil.copytree(model_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no_weights: no weights \(expected model.safetensors\)"):
        load(no_weights)

    no_processor = tmp_path / "no_processor"
    shutil.copytree(model_dir, no_processor)
    (no_processor / "mmgpt_processor.json").unlink()
    with pytest.raises(ModelLoadError, match="mmgpt_processor.json"):
        load(no_processor)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(model_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="corrupt: could not load the model"):
        load(corrupt)

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError, match="'bert', not an mmgpt model"):
        load(other)

    with pytest.raises(ModelLoadError, match="is a file"):
        load(model_dir / "config.json")
    assert issubclass(ModelLoadError, ValueError)


def test_arrays_and_tensors_are_images_one_or_a_batch():
    import numpy as np

    vl = load(trained_tiny_dir(), device="cpu")
    pil = world_images()[:2]
    arrays = np.stack([np.asarray(im.convert("RGB")) for im in pil])  # (2, H, W, 3)
    want = vl.caption(pil)
    assert vl.caption(arrays[0]) == want[0] and vl.caption(arrays) == want
    tensor = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255  # (2, 3, H, W) as torchvision
    assert vl.caption(list(tensor)) == want and vl.caption(tensor[1]) == want[1]
    assert vl.ask(arrays[0], QUESTION) == vl.ask(pil[0], QUESTION)
    assert torch.allclose(vl.embed_images(arrays), vl.embed_images(pil))
