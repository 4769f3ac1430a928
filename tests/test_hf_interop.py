"""transformers' Auto classes and image-text-to-text pipeline on a tiny trained mmgpt folder, against
mmgpt's own API (`mmgpt.api.load`: what `mmgpt caption` / `mmgpt ask` run)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_api import ANSWERS, CAPTIONS, QUESTION, trained_tiny_dir, world_images

import mmgpt  # noqa: F401 - registers mmgpt with the Auto classes
from mmgpt.api import load
from mmgpt.hf_interop import MMGPTForZeroShotImageClassification, MMGPTHFProcessor, write_hub_files
from mmgpt.model import MMGPTModel
from mmgpt.processor import MMGPTProcessor

pytestmark = pytest.mark.usefixtures("single_torch_thread")
ROOT = Path(__file__).resolve().parent.parent
GEN = {"max_new_tokens": 32}  # mmgpt's default (the pipeline's own is 256)


@pytest.fixture(scope="module")
def folder() -> Path:
    return trained_tiny_dir()


@pytest.fixture(scope="module")
def pipe(folder):
    from transformers import pipeline

    return pipeline("image-text-to-text", model=str(folder), device="cpu")


def test_auto_classes_load_the_folder_with_the_same_weights(folder):
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    assert type(AutoConfig.from_pretrained(folder)).__name__ == "MMGPTConfig"
    ref = MMGPTModel.from_pretrained(folder)
    for auto in (AutoModel, AutoModelForImageTextToText):
        model = auto.from_pretrained(folder)
        assert isinstance(model, MMGPTModel)
        for (name, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
            assert torch.equal(a, b), name
    proc = AutoProcessor.from_pretrained(folder)
    assert isinstance(proc, MMGPTHFProcessor)
    own = MMGPTProcessor.from_pretrained(folder)
    ims = world_images()
    batch = proc(images=ims[:2], text=QUESTION)
    assert torch.equal(batch["pixel_values"], own.images(ims[:2]))
    assert torch.equal(batch["input_ids"], own.batch_prompts(["vqa"] * 2, [QUESTION] * 2)["input_ids"])
    assert proc.batch_decode(batch["input_ids"]) == [f"question: {QUESTION} answer:"] * 2


def test_import_mmgpt_is_what_registers(folder):
    code = ("from transformers import AutoModel\n"
            f"try:\n    AutoModel.from_pretrained(r'{folder}'); print('loaded')\nexcept Exception:\n    print('refused')\n"
            f"import mmgpt\nprint(type(AutoModel.from_pretrained(r'{folder}')).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
                         env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["refused", "MMGPTModel"], out.stdout + out.stderr[-2000:]


def test_pipeline_captions_and_answers_as_mmgpt_does(folder, pipe):
    vl = load(folder, device="cpu")
    ims = world_images()
    caps = [r["generated_text"] for r in pipe(ims, text=[""] * len(ims), **GEN)]
    assert caps == vl.caption(ims) == CAPTIONS
    one = pipe(ims[1], text=QUESTION, return_full_text=False, **GEN)
    assert one[0]["generated_text"].strip() == vl.ask(ims[1], QUESTION) == ANSWERS[1]
    full = pipe(ims[1], text=QUESTION, **GEN)  # transformers' default: the prompt, then the continuation
    assert full[0]["generated_text"] == f"{QUESTION} {ANSWERS[1]}"
    batched = pipe(ims, text=[QUESTION] * len(ims), return_full_text=False, batch_size=4, **GEN)
    assert [r["generated_text"].strip() for r in batched] == vl.ask(ims, QUESTION) == ANSWERS


def test_pipeline_answers_chat_messages(folder, pipe):
    if not hasattr(MMGPTProcessor, "apply_chat_template"):
        pytest.skip("MMGPTProcessor has no apply_chat_template yet (the conversations work)")
    vl = load(folder, device="cpu")
    ims = world_images()
    for i in range(len(ims)):
        ask = [{"role": "user", "content": [{"type": "image", "image": ims[i]}, {"type": "text", "text": QUESTION}]}]
        out = pipe(text=ask, return_full_text=False, **GEN)
        assert out[0]["generated_text"].strip() == vl.ask(ims[i], QUESTION) == ANSWERS[i]
    look = [{"role": "user", "content": [{"type": "image", "image": ims[2]}]}]
    out = pipe(text=look, **GEN)[0]["generated_text"]
    assert out[-1] == {"role": "assistant", "content": vl.caption(ims[2])}


def test_processor_refuses_mismatched_counts(folder):
    proc = MMGPTHFProcessor.from_pretrained(folder)
    with pytest.raises(ValueError, match="3 texts for 2 images"):
        proc(images=world_images()[:2], text=["a", "b", "c"])


def test_zero_shot_image_classification_pipeline_is_softmax_of_scaled_cosine(folder, tmp_path):
    from transformers import pipeline

    shutil.copytree(folder, tmp_path / "m")
    write_hub_files(tmp_path / "m")  # what the export writes beside the model card (AutoImageProcessor needs it)
    pipe = pipeline("zero-shot-image-classification", model=str(tmp_path / "m"), device="cpu")
    assert isinstance(pipe.model, MMGPTForZeroShotImageClassification)
    vl = load(folder, device="cpu")
    scale = vl.model.logit_scale.exp().clamp(max=vl.model.config.logit_scale_max).item()
    labels = ["circle", "square", "a red circle", "a blue square"]
    for image in world_images():
        for template in ("{}", "a photo of a {}."):
            got = {r["label"]: r["score"] for r in pipe(image, candidate_labels=labels, hypothesis_template=template)}
            texts = [template.format(x) for x in labels]
            want = (scale * vl.similarity([image], texts)[0]).softmax(-1)  # (4,)
            assert torch.allclose(torch.tensor([got[x] for x in labels]), want, atol=1e-5), (got, want)
