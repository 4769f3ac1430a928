"""Sampling on the fast decoding path (mmgpt.speed.decode) against GenerationMixin and its logits processors."""

import pytest
import torch
from test_model import left_padded_prompts, make_model
from transformers import GenerationConfig
from transformers.generation.logits_process import TopPLogitsWarper

from mmgpt.speed import decode as fastgen


@pytest.fixture(scope="module")
def setup():
    model = make_model(seed=7)
    _, ids, mask = left_padded_prompts()
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    return model, px, ids, mask


def _generate(model, px, ids, mask, seed, **kw):
    torch.manual_seed(seed)
    return model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True,
                          **kw)


def test_sampling_takes_the_fast_path(setup, monkeypatch):
    model, px, ids, mask = setup
    calls = []
    real = fastgen.greedy_generate
    monkeypatch.setattr(fastgen, "greedy_generate", lambda *a, **k: calls.append(k["warpers"]) or real(*a, **k))
    _generate(model, px, ids, mask, 0, temperature=0.8, top_p=0.9)
    assert len(calls) == 1 and [type(w).__name__ for w in calls[0]] == [
        "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"]  # top_k: GenerationMixin's default 50
    _generate(model, px, ids, mask, 0, fast=False)
    assert len(calls) == 1  # fast=False still goes to GenerationMixin


@pytest.mark.parametrize("kw", [dict(temperature=0.7, top_p=0.9), dict(top_k=5), dict(temperature=1.5, top_k=0),
                                dict(top_p=0.5, min_new_tokens=4)])
def test_a_seeded_sample_equals_generation_mixins(setup, kw):
    model, px, ids, mask = setup
    for seed in (0, 1, 2):
        fast = _generate(model, px, ids, mask, seed, **kw)
        slow = _generate(model, px, ids, mask, seed, fast=False, **kw)
        assert torch.equal(fast, slow), (kw, seed)
    # different seeds give different samples (the test can fail): 3 rows x 10 tokens drawn at temperature >= 0.7
    assert not torch.equal(_generate(model, px, ids, mask, 0, **kw), _generate(model, px, ids, mask, 5, **kw))


def test_temperature_towards_zero_is_greedy(setup):
    model, px, ids, mask = setup
    greedy = model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    for seed in (0, 3):
        cold = _generate(model, px, ids, mask, seed, temperature=1e-4, top_k=0)
        assert torch.equal(cold, greedy)


def test_the_top_p_mask_equals_a_hand_computed_one():
    # probabilities 0.5, 0.25, 0.15, 0.1 (and a token at ~0): top_p 0.7 keeps the smallest set whose mass
    # reaches 0.7, {0.5, 0.25}; top_p 0.8 adds 0.15 (0.75 < 0.8)
    probs = torch.tensor([[0.25, 0.1, 0.5, 1e-9, 0.15]])
    logits = probs.log()
    for top_p, keep in ((0.7, [True, False, True, False, False]), (0.8, [True, False, True, False, True])):
        warpers = fastgen.sampling_warpers({"top_p": top_p, "top_k": 0}, GenerationConfig())
        out = warpers(torch.zeros(1, 1, dtype=torch.long), logits.clone())
        assert (out > -float("inf")).tolist() == [keep]
        ref = TopPLogitsWarper(top_p)(None, logits.clone())  # transformers' own warper, directly
        assert torch.equal(out, ref)


def test_settings_resolve_as_generation_mixin_does():
    gc = GenerationConfig(temperature=0.5)
    names = lambda ws: [(type(w).__name__, getattr(w, "temperature", getattr(w, "top_k", getattr(w, "top_p", None))))
                        for w in ws]
    # the call's value, else the model's generation_config's, else transformers' default (top_k 50)
    assert names(fastgen.sampling_warpers({}, gc)) == [("TemperatureLogitsWarper", 0.5), ("TopKLogitsWarper", 50)]
    assert names(fastgen.sampling_warpers({"temperature": 1.0, "top_k": 3}, gc)) == [("TopKLogitsWarper", 3)]
    assert fastgen.can_sample(gc) and not fastgen.can_sample(GenerationConfig(min_p=0.1))


def test_sampling_options_the_fast_path_lacks_go_to_generation_mixin(setup, monkeypatch):
    model, px, ids, mask = setup
    monkeypatch.setattr(fastgen, "greedy_generate", lambda *a, **k: pytest.fail("fast path taken"))
    _generate(model, px, ids, mask, 0, typical_p=0.9)
    monkeypatch.setattr(model.generation_config, "min_p", 0.1)
    _generate(model, px, ids, mask, 0)


def test_chat_follow_ups_take_the_fast_loop_with_the_kept_past(monkeypatch):
    """A conversation's turns through `vl.chat` run the fast loop, the later ones fed only their new tokens
    (the kept keys and values of the earlier ones); greedy and seeded sampling give GenerationMixin's tokens
    for the whole conversation without any cache, and streaming gives the same text."""
    from test_chat import _image, _model

    from mmgpt.api import VisionLanguagePipeline
    from mmgpt.conversation import normalize
    from mmgpt.processor import image_slots

    model, proc = _model("cross", seed=3)
    vl = VisionLanguagePipeline(model, proc, device="cpu")
    pasts = []
    real = fastgen.greedy_generate
    monkeypatch.setattr(fastgen, "greedy_generate", lambda *a, **k: pasts.append(k.get("past")) or real(*a, **k))
    conv = [{"role": "user", "content": [{"type": "image", "image": _image(1)}, {"type": "image", "image": _image(2)},
                                         {"type": "text", "text": "which image has a triangle?"}]}]
    for turn, (follow, sample) in enumerate([("what color is it?", {}), ("and its size?", {"do_sample": True,
                                             "temperature": 0.8, "top_p": 0.9}), (None, {})]):
        torch.manual_seed(turn)
        answer = vl.chat(conv, max_new_tokens=5, **sample)
        msgs, imgs = normalize(conv)
        ids = torch.tensor([proc.encode_conversation(msgs, add_generation_prompt=True, max_length=1 << 30)[0]])
        torch.manual_seed(turn)
        ref = model.generate(pixel_values=proc.pixel_values(imgs), image_slots=image_slots([len(imgs)]), input_ids=ids,
                             attention_mask=torch.ones_like(ids), max_new_tokens=5, fast=False, use_cache=False,
                             **sample)
        assert answer == proc.decode(ref[0, ids.shape[1]:]), turn
        if turn:  # fed only its new tokens, on the kept past
            assert pasts[-1] is not None and vl.chats.last.reused_tokens > 0
        else:
            assert pasts[-1] is None
        if follow:
            conv = conv + [{"role": "assistant", "content": answer}, {"role": "user", "content": follow}]
    assert len(pasts) == 3
    assert "".join(vl.stream_chat(conv, max_new_tokens=5)) == vl.chat(conv, max_new_tokens=5)


def test_stopping_criteria_end_rows_as_generation_mixin_does(setup, monkeypatch):
    """A stopping criterion (the CLI's Ctrl-C is one) runs on the fast loop: each row it marks ends there and
    is padded after, the tokens equal GenerationMixin's, and the call ends once every row has ended."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    model, px, ids, mask = setup
    width = ids.shape[1]

    class AfterK(StoppingCriteria):  # row i ends after i + 2 new tokens
        def __call__(self, input_ids, scores, **kwargs):
            new = input_ids.shape[1] - width
            return torch.tensor([new >= i + 2 for i in range(input_ids.shape[0])])

    calls = []
    real = fastgen.greedy_generate
    monkeypatch.setattr(fastgen, "greedy_generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    fast = model.generate(stopping_criteria=StoppingCriteriaList([AfterK()]), **kw)
    assert calls == [1]
    slow = model.generate(stopping_criteria=StoppingCriteriaList([AfterK()]), fast=False, **kw)
    assert torch.equal(fast, slow) and fast.shape[1] <= width + 4  # the last row ends after 4 tokens (or EOS)
    assert (fast[0, width + 2:] == 1).all() and (fast[1, width + 3:] == 1).all()  # padded (pad = EOS = 1)
    assert slow.shape[1] < model.generate(fast=False, **kw).shape[1]  # the criterion did end the call early


def test_a_streamer_takes_the_fast_loop_and_gets_generation_mixins_pieces(setup, monkeypatch):
    """generate(streamer=...) (vl.stream_caption / stream_answer) runs the fast loop; the streamer sees the
    prompt, then every new token, as GenerationMixin feeds it."""
    model, px, ids, mask = setup

    class Record:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    calls = []
    real = fastgen.greedy_generate
    monkeypatch.setattr(fastgen, "greedy_generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast, slow = Record(), Record()
    out = model.generate(pixel_values=px[:1], input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=6,
                         do_sample=False, streamer=fast)
    assert calls == [1]
    ref = model.generate(pixel_values=px[:1], input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=6,
                         do_sample=False, streamer=slow, fast=False)
    assert torch.equal(out, ref) and fast.ended and slow.ended
    assert [torch.tensor(x).flatten().tolist() for x in fast.puts] == \
        [torch.tensor(x).flatten().tolist() for x in slow.puts]
