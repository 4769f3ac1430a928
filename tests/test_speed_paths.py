"""Speed paths against plain references: the fused LM-head cross-entropy against F.cross_entropy on
materialised logits, the training forward (target rows only) against the eval forward's full logits,
the fused tanh GELU against transformers' gelu_new, fast greedy decoding (split one-row linears,
one thread, the mid-call switch between them) against GenerationMixin, and the fused ViT inference
forward against Hugging Face's ViTModel."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTConfig, ViTModel
from transformers.activations import NewGELUActivation

import mmgpt.speed.decode
from encoders import build_encoder
from mmgpt import MMGPTConfig, MMGPTModel
from mmgpt.losses import linear_cross_entropy
from mmgpt.speed import vit
from mmgpt.speed.decode import greedy_generate
from mmgpt.speed.threads import cores_free, one_thread

VIT = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=96, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
GPT = dict(n_embd=64, n_layer=3, n_head=4, n_positions=48, vocab_size=9000, resid_pdrop=0.0, embd_pdrop=0.0,
           attn_pdrop=0.0, bos_token_id=0, eos_token_id=1, pad_token_id=1)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def make_model(seed=0, **over) -> MMGPTModel:
    torch.manual_seed(seed)
    kw = dict(vision={"backend": "vit", "config": VIT}, text=GPT, adapter={"type": "linear"}, projection_dim=32,
              bos_token_id=0, eos_token_id=1, pad_token_id=1, unimodal_layers=1)
    model = MMGPTModel(MMGPTConfig(**{**kw, **over}))
    model.generation_config.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return model


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_linear_cross_entropy_matches_materialised_logits(smoothing):
    torch.manual_seed(0)
    # V = 9000 -> 233 rows per chunk: 700 rows take 4 chunks, the last one short.
    h = torch.randn(700, 32, requires_grad=True)
    w = (0.3 * torch.randn(9000, 32)).requires_grad_()
    y = torch.randint(0, 9000, (700,))
    ours = linear_cross_entropy(h, w, y, smoothing)
    g_ours = torch.autograd.grad(2.5 * ours, (h, w))
    ref = F.cross_entropy(h @ w.t(), y, label_smoothing=smoothing)
    g_ref = torch.autograd.grad(2.5 * ref, (h, w))
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5), (ours, ref)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), (a - b).abs().max()
    # A frozen head gets no gradient and the hidden rows still get theirs.
    frozen = linear_cross_entropy(h, w.detach(), y, smoothing)
    (gh,) = torch.autograd.grad(2.5 * frozen, (h,))
    assert torch.allclose(gh, g_ref[0], rtol=1e-4, atol=1e-7)


def test_training_forward_gives_the_loss_and_gradients_of_full_logits():
    model = make_model(seed=1)
    torch.manual_seed(2)
    pixels = torch.randn(4, 3, 32, 32)
    ids = torch.randint(2, 9000, (4, 10))
    ids[:, 0] = 0
    mask = torch.ones_like(ids)
    mask[2:, 7:] = 0  # right padding
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt
    labels[mask == 0] = -100
    model.train()

    def run(return_logits):
        model.zero_grad(set_to_none=True)
        out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels,
                    return_logits=return_logits)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast, g_fast = run(None)
    full, g_full = run(True)
    assert fast.logits is None and full.logits.shape == (4, 10, 9000)
    # Reference loss by hand from the full logits: mean over the positions that have a target.
    keep = labels[:, 1:] != -100
    logp = full.logits[:, :-1].log_softmax(-1)
    by_hand = -logp.gather(2, labels[:, 1:].clamp(min=0)[..., None])[..., 0][keep].mean()
    assert torch.allclose(fast.lm_loss, by_hand, atol=1e-5)
    assert torch.allclose(fast.loss, full.loss, atol=1e-5)
    assert g_fast.keys() == g_full.keys()
    for name in g_full:
        assert torch.allclose(g_fast[name], g_full[name], rtol=1e-3, atol=1e-6), name
    model.eval()
    with torch.no_grad():
        assert model(pixel_values=pixels, input_ids=ids, labels=labels).logits is not None


def test_fused_gelu_is_gpt2_gelu_new():
    model = make_model()
    acts = [blk.mlp.act for blk in model.decoder.transformer.h]
    assert all(isinstance(a, nn.GELU) and a.approximate == "tanh" for a in acts)
    x = torch.linspace(-8, 8, 10001)
    assert torch.allclose(acts[0](x), NewGELUActivation()(x), rtol=1e-6, atol=1e-6)


def _prompts(b: int, vocab: int):
    """Left-padded prompts of 5 tokens, the second row with 2 pads (when there is one)."""
    ids = torch.randint(2, vocab, (b, 5))
    ids[:, 0] = 0
    mask = torch.ones_like(ids)
    if b > 1:
        ids[1, :2], mask[1, :2] = 1, 0
    return ids, mask


@pytest.mark.parametrize("threads", ["parallel", "serial", None])
@pytest.mark.parametrize("vocab", [9000, 9001])  # an odd LM head gets a zero column when split in halves
def test_fast_greedy_matches_generation_mixin(threads, vocab):
    model = make_model(seed=3, text={**GPT, "vocab_size": vocab}).eval()
    torch.manual_seed(4)
    pixels = torch.randn(3, 3, 32, 32)
    with one_thread(False):
        torch.set_num_threads(2)  # the split one-row linears need 2+ threads; the fixture restores 1
        for b in (1, 3):
            for prompt in (None, _prompts(b, vocab)):
                kw = dict(max_new_tokens=12, min_new_tokens=12)
                if prompt is not None:
                    kw.update(input_ids=prompt[0], attention_mask=prompt[1])
                slow = model.generate(pixel_values=pixels[:b], fast=False, **kw)
                memory = model.encode_image(pixels[:b]).tokens
                ids = kw.get("input_ids", torch.zeros(b, 1, dtype=torch.long))
                mask = kw.get("attention_mask", torch.ones_like(ids))
                fast = greedy_generate(model, memory, ids, mask, 12, 1, 1, 12, threads=threads)
                assert torch.equal(fast, slow), (b, prompt is not None, fast, slow)
                assert torch.get_num_threads() == 2
        # The plan made for these weights is rebuilt when they change.
        with torch.no_grad():
            model.decoder.transformer.h[-1].mlp.c_fc.weight.mul_(3.0)
            model.decoder.transformer.wte.weight[5:50].add_(0.2)
        kw = dict(max_new_tokens=10, min_new_tokens=10)
        assert torch.equal(model.generate(pixel_values=pixels[:1], **kw),
                           model.generate(pixel_values=pixels[:1], fast=False, **kw))


def test_fast_greedy_moves_to_one_thread_when_a_step_slows_down(monkeypatch):
    """A step 3x slower than the call's fastest, or 1.5x the fastest one-thread step seen before
    (another process took a core), moves the rest of the call to one thread and plain linears; the
    tokens stay GenerationMixin's."""
    model = make_model(seed=5).eval()
    torch.manual_seed(6)
    pixels = torch.randn(1, 3, 32, 32)

    class Clock:  # a one-token step "takes" the next of `steps` seconds; records the thread count
        t, calls, steps, seen = 0.0, 0, [], []

        @classmethod
        def perf_counter(cls):
            cls.calls += 1
            if cls.calls % 2 == 0:  # end of a step
                cls.seen.append(torch.get_num_threads())
                cls.t += cls.steps.pop(0)
            return cls.t

    monkeypatch.setattr(mmgpt.speed.decode, "time", Clock)
    monkeypatch.setattr(mmgpt.speed.decode, "cores_free", lambda: True)
    slow = model.generate(pixel_values=pixels, fast=False, max_new_tokens=8, min_new_tokens=8)
    with one_thread(False):
        torch.set_num_threads(2)
        memory = model.encode_image(pixels).tokens
        ids = torch.zeros(1, 1, dtype=torch.long)
        Clock.steps = [1.0, 1.0, 5.0, 0.5, 0.4, 0.5, 0.6]  # 7 one-token steps for 8 new tokens
        fast = greedy_generate(model, memory, ids, torch.ones_like(ids), 8, 1, 1, 8)
        assert torch.get_num_threads() == 2
        assert Clock.seen == [2, 2, 2, 1, 1, 1, 1] and torch.equal(fast, slow)
        # The fastest one-thread step (0.4 s) is now known: a 2-thread step of 0.7 s gives up at once.
        Clock.calls, Clock.seen, Clock.steps = 0, [], [0.7, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
        fast = greedy_generate(model, memory, ids, torch.ones_like(ids), 8, 1, 1, 8)
        assert Clock.seen == [2, 1, 1, 1, 1, 1, 1] and torch.equal(fast, slow)
        assert torch.get_num_threads() == 2


def test_generate_takes_the_fast_paths_and_matches_generation_mixin():
    model = make_model(seed=3).eval()
    torch.manual_seed(4)
    pixels = torch.randn(3, 3, 32, 32)
    for b in (1, 3):
        kw = dict(max_new_tokens=12, min_new_tokens=12)
        fast = model.generate(pixel_values=pixels[:b], **kw)
        slow = model.generate(pixel_values=pixels[:b], fast=False, **kw)
        assert fast.shape == (b, 13)
        assert torch.equal(fast, slow), (b, fast, slow)


def test_one_thread_restores_the_count_and_cores_free_answers():
    with one_thread(False):
        torch.set_num_threads(2)
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        assert cores_free(max_age=0.0) in (True, False)
    assert torch.get_num_threads() == 1
    assert cores_free() is True  # one thread: nothing to wait for


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or not Path("/proc/stat").exists()
                    or len(os.sched_getaffinity(0)) != os.cpu_count(), reason="Linux /proc, all CPUs ours")
def test_cores_free_tells_an_idle_machine_from_one_with_a_spinning_process():
    """With as many torch threads as cores: idle (between probes 20 ms apart, as between calls), the
    cores are free; a busy loop in another process leaves one short. The probe this replaced timed a
    product on one thread and on all, and read an idle machine "busy" 8 times in 10."""
    cores = len(os.sched_getaffinity(0))
    with one_thread(False):
        torch.set_num_threads(max(2, cores))
        for _ in range(5):  # up to five windows of 10 looks: a burst of the machine's own work may fill one
            seen = []
            for _ in range(10):
                time.sleep(0.02)
                seen.append(cores_free(max_age=0.0))
            if sum(seen) >= 6:
                break
        assert sum(seen) >= 6, seen
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with one_thread(False):
            torch.set_num_threads(max(2, cores))
            deadline = time.time() + 5
            while cores_free(max_age=0.0) and time.time() < deadline:  # the spinner starting up
                time.sleep(0.05)
            seen = []
            for _ in range(10):
                time.sleep(0.02)
                seen.append(cores_free(max_age=0.0))
            assert not any(seen), seen
            # Pinned to some CPUs only, the machine-wide run queue can't say: torch keeps its threads.
            allowed = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {min(allowed)})
            try:
                assert cores_free(max_age=0.0) is True
            finally:
                os.sched_setaffinity(0, allowed)
    finally:
        spinner.kill()
        spinner.wait()


VIT_FAST = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                intermediate_size=96)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("stem", ["patch", "cnn"])
def test_fast_vit_forward_matches_hugging_face(monkeypatch, onednn, stem):
    if not onednn:  # the F.linear path that GPUs and other dtypes take
        monkeypatch.setattr(vit, "_use_onednn", lambda x: False)
    torch.manual_seed(0)
    enc = build_encoder("vit", VIT_FAST, stem=stem).eval()
    ref = ViTModel(ViTConfig(**VIT_FAST), add_pooling_layer=False).eval()
    ref.embeddings.patch_embeddings.projection = enc.model.embeddings.patch_embeddings.projection
    ref.load_state_dict(enc.model.state_dict())
    with torch.no_grad():
        for p in ref.parameters():  # biases and norms away from their 0 / 1 init, so all of them count
            p.add_(0.1 * torch.randn_like(p))
        enc.model.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state
        got = vit.infer(enc, x)
        assert enc._fast is not None  # the fast forward ran
        torch.testing.assert_close(got.patch_tokens, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.pooled, want[:, 0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(vit.infer(enc, x[:1]).patch_tokens, want[:1], rtol=1e-4, atol=1e-5)
        # New weights are picked up (the fused / reordered copies are rebuilt).
        ref.layers[1].mlp.fc1.weight.mul_(-2.0)
        ref.layers[2].attention.k_proj.bias.add_(0.5)
        enc.model.load_state_dict(ref.state_dict())
        torch.testing.assert_close(vit.infer(enc, x).patch_tokens, ref(pixel_values=x).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)
    # With gradients or in training mode, infer is the plain forward.
    out = vit.infer(enc, x)
    assert out.patch_tokens.requires_grad
    enc.train()
    with torch.no_grad():
        assert torch.equal(vit.infer(enc, x).patch_tokens, enc(x).patch_tokens)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not built into this torch")
def test_fast_vit_attention_kernel_matches_hugging_face(monkeypatch, isa):
    """Heads 32 wide and 50 tokens (blocks of 16 queries and keys, the last ones partial): on AVX-512 the
    attention is mmgpt.speed.kernels.vit_attention (it must run), on AVX2 SDPA; both give HF's forward."""
    from mmgpt.speed import kernels

    cfg = dict(image_size=56, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=128)
    ran = []
    real = kernels.vit_attention
    monkeypatch.setattr(kernels, "vit_attention", lambda *a: ran.append(r := real(*a)) or r)
    torch.manual_seed(1)
    enc = build_encoder("vit", cfg).eval()
    ref = ViTModel(ViTConfig(**cfg), add_pooling_layer=False).eval()
    ref.embeddings.patch_embeddings.projection = enc.model.embeddings.patch_embeddings.projection
    ref.load_state_dict(enc.model.state_dict())
    with torch.no_grad():
        for layer in ref.layers:  # sharp attention, so that a wrong score shows
            layer.attention.q_proj.weight.mul_(4.0)
        enc.model.load_state_dict(ref.state_dict())
        x = torch.randn(3, 3, 56, 56)
        want = ref(pixel_values=x).last_hidden_state
        got = vit.infer(enc, x).patch_tokens
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(ran) == 2 and all((r is not None) == (isa == "avx512") for r in ran)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not built into this torch")
@pytest.mark.parametrize("gelu", [None, "tanh", "none"])
def test_fastgen_onednn_linear_matches_addmm_and_gelu(gelu):
    from mmgpt.speed.plan import packed_linear as _packed_linear

    torch.manual_seed(0)
    w, b, x = torch.randn(64, 200), torch.randn(200), torch.randn(5, 64)  # w (in, out) as Conv1D stores it
    ref = torch.addmm(b, x, w)
    if gelu is not None:
        ref = F.gelu(ref, approximate=gelu)
    torch.testing.assert_close(_packed_linear(w, b, gelu=gelu)(x), ref, rtol=1e-5, atol=1e-5)
