"""Conversations: the label mask, the template, several images per row, generation with the past kept."""

import random

import pytest
import torch
from PIL import Image

from mmgpt import build_model
from mmgpt.api import VisionLanguagePipeline
from mmgpt.config import MMGPTConfig
from mmgpt.conversation import ConversationError, normalize, record_to_messages
from train.collate import MODEL_KEYS, Collator
from train.data import ShapesDataset
from train.data.shapes import COUNT_WORDS, conversation, sample_scene, two_image_question

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TEXTS = [
    "a large red circle", "a small blue square and a large green triangle",
    "question: what color is the circle? answer: red", "question: what size is it? answer: small",
    "question: which image has a triangle? answer: the first", "question: what shape is it? answer: circle",
    "question: how many objects are there in total? answer: three",
]


def _model(fusion: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = MMGPTConfig.from_preset("tiny", max_images=4) if fusion == "cross" else MMGPTConfig.from_preset("tiny-prefix")
    model, proc = build_model(cfg, texts=TEXTS)
    return model.eval(), proc


def _image(seed: int) -> Image.Image:
    rng = random.Random(seed)
    return Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))


def _three_turns():
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                     {"type": "text", "text": "which image has a triangle?"}]},
        {"role": "assistant", "content": "the first"},
        {"role": "user", "content": "what color is it?"},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "what size is it?"}]},
        {"role": "assistant", "content": "small"},
    ]


@pytest.mark.parametrize("fusion", ["cross", "prefix"])
def test_assistant_only_labels_equal_a_hand_built_mask_on_three_turns_and_two_images(fusion):
    _, proc = _model(fusion)
    tok = proc.tokenizer

    def enc(text):
        return tok.encode(text, add_special_tokens=False)

    bos, eos = proc.bos_id, proc.eos_id
    images = []
    if fusion == "prefix":  # two images: K placeholder tokens each, in front of the first turn
        images = [proc.image_token_id] * (2 * proc.num_image_tokens)
    ids, labels = list(images), [-100] * len(images)
    for q, a in (("which image has a triangle?", "the first"), ("what color is it?", "red"),
                 ("what size is it?", "small")):
        prompt = [bos] + enc(f"question: {q} answer:")
        answer = enc(f" {a}") + [eos]
        ids += prompt + answer
        labels += [-100] * len(prompt) + answer
    msgs, _ = normalize(_three_turns(), [_image(0), _image(1)])
    got_ids, got_labels = proc.encode_conversation(msgs)
    assert got_ids == ids
    assert got_labels == labels
    assert sum(x != -100 for x in got_labels) == len(enc(" the first")) + len(enc(" red")) + len(enc(" small")) + 3


def test_a_caption_or_vqa_record_is_its_one_turn_conversation_token_for_token():
    _, proc = _model("cross")
    for task, prompt, target in (("caption", "", "a large red circle"), ("vqa", "what color is the circle?", "red")):
        msgs, _ = normalize(record_to_messages(task, prompt, target), [_image(0)])
        assert proc.encode_conversation(msgs) == proc.encode_example(task, prompt, target)
        gen_msgs, _ = normalize(record_to_messages(task, prompt), [_image(0)])
        assert proc.encode_conversation(gen_msgs, add_generation_prompt=True)[0] == proc.encode_prompt(task, prompt)


def test_apply_chat_template_renders_tokenizes_and_batches_like_transformers_processors():
    _, proc = _model("cross")
    conv = _three_turns()[:3]
    text = proc.apply_chat_template(conv, images=[_image(0), _image(1)], add_generation_prompt=True)
    assert text == ("<|endoftext|>question: which image has a triangle? answer: the first<|endoftext|>"
                    "<|endoftext|>question: what color is it? answer:")
    one = [{"role": "user", "content": [{"type": "image", "image": _image(2)}, {"type": "text", "text": "what?"}]}]
    out = proc.apply_chat_template([conv, one], images=[[_image(0), _image(1)], None], tokenize=True,
                                   return_dict=True, return_tensors="pt", add_generation_prompt=True)
    assert out["pixel_values"].shape == (3, 3, 64, 64)
    assert out["image_slots"].tolist() == [[0, 1], [2, -1]]
    assert out["input_ids"].shape == out["attention_mask"].shape
    assert out["attention_mask"][1, 0] == 0  # left padding for generation
    with pytest.raises(ConversationError, match="more image parts than the 1"):
        proc.apply_chat_template(conv, images=[_image(0)])


def test_saved_folder_keeps_the_template_and_an_older_folder_gets_the_default(tmp_path):
    from mmgpt.processor import CHAT_TEMPLATE_FILE, MMGPTProcessor

    _, proc = _model("cross")
    proc.chat_template = "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}|{% endfor %}"
    proc.save_pretrained(tmp_path / "a")
    again = MMGPTProcessor.from_pretrained(tmp_path / "a")
    assert again.chat_template == proc.chat_template
    (tmp_path / "a" / CHAT_TEMPLATE_FILE).unlink()  # a folder exported before conversations
    old = MMGPTProcessor.from_pretrained(tmp_path / "a")
    msgs, _ = normalize(record_to_messages("vqa", "what color is the circle?", "red"), [_image(0)])
    assert old.chat_template is None and old.encode_conversation(msgs) == old.encode_example(
        "vqa", "what color is the circle?", "red")


def test_shared_image_slots_path_equals_each_rows_own_memory_with_a_mask():
    model, _ = _model("cross")
    model.train()  # dropout is 0 in tiny: the training path (shared keys / values) stays deterministic
    n_img, rows = 3, 4
    pixels = torch.randn(n_img, 3, 64, 64)
    slots = torch.tensor([[0, 1], [2, -1], [1, 0], [2, 2]])  # two images, one, the other order, one twice
    ids = torch.randint(1, 50, (rows, 9))
    mask = torch.ones_like(ids)
    tokens = model.encode_image(pixels).tokens
    shared, _, _ = model.run_decoder(ids, mask, tokens, memory_slots=slots)
    memory, mmask = model.compose_memory(tokens, slots)  # (B, 2K, D), the padded slot masked
    assert mmask is not None and mmask[1].sum() == tokens.shape[1]
    own, _, _ = model.run_decoder(ids, mask, memory, memory_mask=mmask)
    torch.testing.assert_close(shared, own, atol=1e-5, rtol=1e-5)
    # the slot code tells the images apart: swapping the two images changes the row
    assert not torch.allclose(shared[0], shared[2], atol=1e-4)


@pytest.mark.parametrize("fusion", ["cross", "prefix"])
def test_three_turns_with_the_past_kept_give_the_tokens_of_rerunning_without_any_cache(fusion):
    model, proc = _model(fusion, seed=1)
    vl = VisionLanguagePipeline(model, proc, device="cpu")
    images = [_image(3), _image(4)]
    conv = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "image", "image": images[1]},
                                         {"type": "text", "text": "which image has a triangle?"}]}]
    before = 0
    for turn, follow in enumerate(("what color is it?", "what size is it?", None)):
        answer = vl.chat(conv, max_new_tokens=4)
        last = vl.chats.last
        # reference: the whole conversation again, GenerationMixin without a cache
        msgs, imgs = normalize(conv)
        ids = torch.tensor([proc.encode_conversation(msgs, add_generation_prompt=True, max_length=1 << 30)[0]])
        ref = model.generate(pixel_values=proc.pixel_values(imgs), image_slots=torch.tensor([[0, 1]]),
                             input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, use_cache=False)
        assert answer == proc.decode(ref[0, ids.shape[1]:])
        if turn:  # every token before the last answer is reused (the answer's own, as far as a random
            # model's tokens read back the same), and no image is encoded again
            assert last.images_encoded == 0 and last.reused_tokens >= before
        else:
            assert last.images_encoded == 2 and last.reused_tokens == 0
        before = last.prompt_tokens
        if follow:
            conv = conv + [{"role": "assistant", "content": answer}, {"role": "user", "content": follow}]
    streamed = "".join(vl.stream_chat(conv, max_new_tokens=4))
    assert streamed == VisionLanguagePipeline(model, proc, device="cpu").chat(conv, max_new_tokens=4)


@pytest.mark.parametrize("fusion", ["cross", "prefix"])
def test_a_batch_of_conversations_with_different_image_counts_gives_what_one_by_one_gives(fusion):
    model, proc = _model(fusion, seed=2)
    vl = VisionLanguagePipeline(model, proc, device="cpu")
    convs = [
        [{"role": "user", "content": [{"type": "image", "image": _image(5)}, {"type": "text", "text": "what?"}]}],
        [{"role": "user", "content": [{"type": "image", "image": _image(6)}, {"type": "image", "image": _image(7)},
                                      {"type": "text", "text": "which image has a triangle?"}]},
         {"role": "assistant", "content": "the first"}, {"role": "user", "content": "what color is it?"}],
        [{"role": "user", "content": [{"type": "image", "image": _image(8)}]}],
    ]
    batched = vl.chat_batch(convs, max_new_tokens=4)
    alone = [VisionLanguagePipeline(model, proc, device="cpu").chat(c, max_new_tokens=4) for c in convs]
    assert batched == alone


@pytest.mark.parametrize("fusion", ["cross", "prefix"])
def test_a_training_batch_mixing_records_and_conversations_trains(fusion):
    model, proc = _model(fusion)
    model.train()
    ds = ShapesDataset("train", size=4, task_mix={"caption": 1, "vqa": 1, "chat": 1, "two_image": 1}, grouped=True)
    batch = Collator(proc)([ds[i] for i in range(4)])
    # two-image questions pair images 0-1 and 2-3 of the batch: each image is encoded once
    assert batch["pixel_values"].shape[0] == 4
    two = batch["image_slots"][(batch["image_slots"] >= 0).sum(1) == 2]
    assert two.shape[0] == 4 and all(sorted(r.tolist()) in ([0, 1], [2, 3]) for r in two)
    out = model(**{k: batch[k] for k in MODEL_KEYS if k in batch})
    assert torch.isfinite(out.loss) and out.itc_loss is not None
    out.loss.backward()
    if fusion == "cross":
        assert model.image_code.grad is not None and model.image_code.grad[1].abs().sum() > 0


def test_shapes_conversations_follow_the_object_named_last_and_two_image_answers_are_true():
    rng = random.Random(0)
    for i in range(200):
        scene = sample_scene(random.Random(i))
        turns = conversation(scene, rng)
        if turns is None:
            continue
        referent = None
        for qtype, q, a in turns:
            if qtype == "followup":
                attr = q.split()[1]
                assert getattr(referent, attr) == a
            elif q.startswith(("what color is the", "what size is the")):
                referent = next(o for o in scene.objects if o.shape == q.split()[-1].rstrip("?"))
            elif q.startswith("what shape is the"):
                referent = next(o for o in scene.objects if o.color == q.split()[4])
        first, second = sample_scene(random.Random(1000 + i)), sample_scene(random.Random(2000 + i))
        qtype, q, a = two_image_question(first, second, rng)
        if qtype == "total":
            assert a == COUNT_WORDS[len(first.objects) + len(second.objects)]
        elif qtype == "both":
            shape = q.split()[-1].rstrip("?")
            assert a == ("yes" if all(any(o.shape == shape for o in s.objects) for s in (first, second)) else "no")
        else:
            words = q[len("which image has a "):-1].split()
            has = [any(o.shape == words[-1] and (len(words) == 1 or o.color == words[0]) for o in s.objects)
                   for s in (first, second)]
            assert has[0] != has[1] and a == ("the first" if has[0] else "the second")


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_a_decoders_own_template_keeps_its_format_with_image_placeholders_and_assistant_only_labels():
    """SmolLM2 / Qwen2.5 bring a ChatML template (content as one string): their turns stay as the template
    writes them, each image a run of placeholders where it stands, the labels the assistant's text and end."""
    from mmgpt.processor import IMAGE_TOKEN, MMGPTProcessor, train_bpe_tokenizer

    tok = train_bpe_tokenizer(TEXTS + ["user assistant system"], vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]})
    proc = MMGPTProcessor(tok, image_size=64, chat_template=CHATML, image_token=IMAGE_TOKEN, num_image_tokens=3)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle?"}]},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and here?"}]},
            {"role": "assistant", "content": "blue"}]
    msgs, _ = normalize(conv, [_image(0), _image(1)])
    assert proc.render_chat(msgs) == ("<|im_start|>user\n<image>what color is the circle?<|im_end|>\n"
                                      "<|im_start|>assistant\nred<|im_end|>\n"
                                      "<|im_start|>user\n<image>and here?<|im_end|>\n"
                                      "<|im_start|>assistant\nblue<|im_end|>\n")
    ids, labels = proc.encode_conversation(msgs, max_length=1000)
    ph = proc.image_token_id
    assert ids.count(ph) == 6 and all(lab == -100 for i, lab in zip(ids, labels) if i == ph)
    kept = proc.tokenizer.decode([i for i, lab in zip(ids, labels) if lab != -100])
    assert kept == "red<|im_end|>\nblue<|im_end|>\n"


def test_length_buckets_give_the_loss_and_gradients_of_one_padded_pass(monkeypatch):
    import mmgpt.cross_attention as mm

    model, proc = _model("cross", seed=3)
    model.train()
    ds = ShapesDataset("train", size=8, task_mix={"caption": 1, "vqa": 2, "chat": 1, "two_image": 1}, grouped=True)
    batch = Collator(proc)([ds[i] for i in range(8)])
    inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
    buckets = mm._length_buckets(inputs["attention_mask"], inputs["image_slots"])
    assert buckets is not None and len(buckets) >= 3  # one- and two-image rows apart, short and long apart

    def run():
        model.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_b, grads_b = run()
    monkeypatch.setattr(mm, "_length_buckets", lambda *a: None)
    loss_1, grads_1 = run()
    torch.testing.assert_close(loss_b, loss_1, atol=1e-6, rtol=1e-6)
    assert grads_b.keys() == grads_1.keys()
    for name in grads_1:
        torch.testing.assert_close(grads_b[name], grads_1[name], atol=1e-5, rtol=1e-4, msg=name)


def test_evaluating_conversations_scores_each_turn_as_chat_answers_it():
    from train.evaluate import evaluate

    model, proc = _model("cross", seed=4)
    ds = ShapesDataset("test", size=4, task_mix={"caption": 0, "vqa": 1, "chat": 1, "two_image": 1}, grouped=True)
    records = [r for i in range(4) for r in ds[i]]
    result = evaluate(model, proc, records, tasks="chat", batch_size=3)
    vl = VisionLanguagePipeline(model, proc, device="cpu")
    hits, n = 0, 0
    for r in (r for r in records if r["task"] == "chat"):
        msgs = r["messages"]
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                got = vl.chat(msgs[:i], images=r["images"], max_new_tokens=8)
                hits += got == m["content"][0]["text"]
                n += 1
    assert result.metrics["chat_questions"] == n
    assert result.metrics["chat_accuracy"] == pytest.approx(hits / n)
    assert "chat_two_image_accuracy" in result.metrics and "vqa_accuracy" not in result.metrics


def test_lone_surrogates_in_a_message_read_as_question_marks():
    """Text with a lone surrogate (undecodable bytes Python kept) is answered as the same text with '?' there;
    the tokenizer raised a TypeError on it before."""
    model, proc = _model("cross", seed=9)
    vl = VisionLanguagePipeline(model, proc, device="cpu")
    img = _image(11)

    def conv(text):
        return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]}]

    assert vl.chat(conv("what \udce9 color?"), max_new_tokens=3) == vl.chat(conv("what ? color?"), max_new_tokens=3)
    assert normalize([{"role": "user", "content": "a\ud800b"}])[0][0]["content"][0]["text"] == "a?b"
