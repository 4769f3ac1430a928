"""Speed paths against plain references: the fused LM-head cross-entropy against F.cross_entropy on
materialised logits, the training forward (target rows only) against the eval forward's full logits,
the fused tanh GELU against transformers' gelu_new, and fast greedy decoding with and without the LM
head copy against GenerationMixin."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import NewGELUActivation

from mmgpt import MMGPTConfig, MMGPTModel
from mmgpt.losses import linear_cross_entropy

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


@pytest.mark.parametrize("new_tokens", [4, 12])  # below and above the LM-head copy threshold (8)
def test_fast_greedy_with_and_without_head_copy_matches_generation_mixin(new_tokens):
    model = make_model(seed=3).eval()
    torch.manual_seed(4)
    pixels = torch.randn(3, 3, 32, 32)
    for b in (1, 3):
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        fast = model.generate(pixel_values=pixels[:b], **kw)
        slow = model.generate(pixel_values=pixels[:b], fast=False, **kw)
        assert fast.shape == (b, new_tokens + 1)
        assert torch.equal(fast, slow), (b, fast, slow)
