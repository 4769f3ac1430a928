"""Weight-only int8 decoding: mmgpt.speed.quantize, mmgpt.speed.kernels.rows_linear_int8 against float64 products, and
int8 generation against fp32 generation on a tiny trained model."""

import copy

import pytest
import torch
from test_kernels import needs_kernel
from test_model import make_model

from mmgpt.speed import decode as fastgen
from mmgpt.speed import kernels
from mmgpt.speed.quantize import ATTR, check_mode, quantize_model, quantize_weight


def test_quantize_weight_by_hand():
    w = torch.tensor([[0.5, -2.0, 0.0], [-0.25, 1.0, 0.0], [0.1, 0.3, 0.0]])  # (in 3, out 3)
    q, scale = quantize_weight(w, dim=0)
    assert q.dtype == torch.int8 and scale.shape == (3,)
    # per output column: max |w| / 127; a zero column gets scale 1 and zeros
    assert torch.allclose(scale, torch.tensor([0.5 / 127, 2.0 / 127, 1.0]))
    assert q[:, 0].tolist() == [127, -64, 25] and q[:, 1].tolist() == [-127, 64, 19] and q[:, 2].tolist() == [0, 0, 0]
    q_rows, s_rows = quantize_weight(w.t(), dim=1)  # a (V, D) LM head: one scale per row
    assert torch.equal(q_rows, q.t()) and torch.equal(s_rows, scale)
    with pytest.raises(ValueError, match="int8"):
        check_mode("int4")


def round_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row of x rounded to int8 steps of its own scale (max |x| / 127, half to even), in fp32 as the
    VNNI kernel rounds it, back as floats: the activations its products compute with."""
    amax = x.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(x * inv).clamp_(-127, 127) * (amax / 127.0)


def test_round_rows_by_hand():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [254.0, 1.0, 2.0, 3.0]])
    # row 0: step 1/127, so 0.5 -> 63.5 -> 64 (even), 0.25 -> 31.75 -> 32; row 2: step 2, 1 -> 0.5 -> 0, 3 -> 1.5 -> 2
    want = torch.tensor([[1.0, -64 / 127, 32 / 127, 0.0], [0.0, 0.0, 0.0, 0.0], [254.0, 0.0, 2.0, 4.0]])
    torch.testing.assert_close(round_rows(x), want)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_rows_linear_int8_matches_a_float64_product(threads, isa, vnni):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert kernels.available()
        g = torch.Generator().manual_seed(0)
        for k, n in [(384, 1152), (1536, 384), (384, 8000), (37, 5), (100, 33), (300, 80), (8, 16)]:
            q, scale = quantize_weight(torch.randn(k, n, generator=g), dim=0)
            b = torch.randn(n, generator=g)
            for bias in (b, None):
                f = kernels.rows_linear_int8(q, scale, bias)
                for rows in (1, 2, 3, 5, 16, 17, 32, 40):  # 40: past MAX_ROWS, torch's addmm on q * scale
                    x = torch.randn(rows, k, generator=g)
                    if vnni and rows <= kernels.MAX_ROWS:
                        x = round_rows(x)  # the activations VNNI computes with
                    ref = (x.double() @ q.double()) * scale.double() + (0 if bias is None else bias.double())
                    y = f(x)
                    assert y.shape == (rows, n) and y.dtype == torch.float32
                    assert torch.allclose(y.double(), ref, atol=1e-4, rtol=1e-5), (k, n, rows)
    finally:
        torch.set_num_threads(old)


@needs_kernel
def test_rows_linear_int8_inputs_it_cannot_read_go_to_torch():
    q, scale = quantize_weight(torch.randn(64, 40), dim=0)
    f = kernels.rows_linear_int8(q, scale, torch.randn(40))
    with pytest.raises(RuntimeError):  # torch's error, not a read past the input's end
        f(torch.randn(2, 10))
    x = torch.randn(2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert f(x).dtype == torch.bfloat16
    assert torch.allclose(f(x[:, :].t().contiguous().t()), f(x), atol=1e-5)
    with pytest.raises(ValueError, match="int8"):
        kernels.rows_linear_int8(q.float(), scale, None)


def _trained_model():
    """The test model trained to caption 24 noise images with their own random 7-token caption (100 AdamW
    steps, ~5 s): confident logits, as a trained captioner has; a random model's flat logits flip under
    any rounding."""
    model = make_model(seed=11).train()
    g = torch.Generator().manual_seed(12)
    px = torch.randn(24, 3, 32, 32, generator=g)
    ids = torch.cat([torch.zeros(24, 1, dtype=torch.long), torch.randint(2, 120, (24, 7), generator=g),
                     torch.ones(24, 1, dtype=torch.long)], 1)  # bos, 7 tokens, eos
    labels = ids.clone()
    labels[:, 0] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        loss = model(pixel_values=px, input_ids=ids, labels=labels, compute_itc=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), px, ids, loss.item()


@pytest.fixture(scope="module")
def trained(single_torch_thread):
    return _trained_model()


@needs_kernel
def test_int8_generation_equals_fp32_on_a_trained_model(trained, monkeypatch, vnni):
    model, px, ids, loss = trained
    assert loss < 0.05  # it has learned its captions
    noisy = px + 0.3 * torch.randn(px.shape, generator=torch.Generator().manual_seed(13))  # images it has not seen
    images = torch.cat([px, noisy])
    fp32 = model.generate(pixel_values=images, max_new_tokens=9)
    assert (fp32[:24] == ids).float().mean() > 0.95
    q = quantize_model(copy.deepcopy(model), "int8")
    calls = []
    real = kernels.rows_linear_int8
    monkeypatch.setattr(kernels, "rows_linear_int8", lambda *a: calls.append(1) or real(*a))
    int8 = q.generate(pixel_values=images, max_new_tokens=9)
    assert len(calls) == 3 * 6 + 1  # the kernel ran every linear of the step: 3 blocks x 6, and the LM head
    same = (int8 == fp32).all(dim=1).float().mean()
    # The threshold: at least 46 of the 48 sequences (>= 95%) token for token the same as fp32.
    assert same >= 46 / 48, same
    # Batch 1 (the one-row kernel) gives the batch's tokens (with VNNI too: each row has its own scale).
    for i in (0, 30):
        assert torch.equal(q.generate(pixel_values=images[i: i + 1], max_new_tokens=9)[0], int8[i])


@needs_kernel
def test_int8_weights_are_what_the_model_computes_with_elsewhere(trained):
    """The model's own weights hold q * scale, so GenerationMixin (beam search, fast=False) and the int8
    kernel give the same tokens, and the weights moved from fp32 by at most half a step."""
    model, px, _, _ = trained
    q = quantize_model(copy.deepcopy(model), "int8")
    assert getattr(q, ATTR) == "int8"
    w0, w1 = model.decoder.transformer.h[0].mlp.c_fc.weight, q.decoder.transformer.h[0].mlp.c_fc.weight
    step = w0.abs().amax(0) / 127
    assert not torch.equal(w0, w1) and bool(((w1 - w0).abs() <= step / 2 + 1e-7).all())
    assert torch.equal(q.decoder.lm_head.weight, q.decoder.transformer.wte.weight)  # still tied
    fast = q.generate(pixel_values=px[:8], max_new_tokens=9)
    slow = q.generate(pixel_values=px[:8], max_new_tokens=9, fast=False)
    assert torch.equal(fast, slow)


def test_without_the_kernel_an_int8_model_decodes_with_fp32_products(trained, monkeypatch):
    model, px, _, _ = trained
    q = quantize_model(copy.deepcopy(model), "int8")
    reference = q.generate(pixel_values=px[:6], max_new_tokens=9, fast=False)
    monkeypatch.setenv("MMGPT_KERNELS", "0")
    assert not kernels.available()
    monkeypatch.setattr(kernels, "rows_linear_int8", lambda *a: pytest.fail("int8 kernel used"))
    assert torch.equal(q.generate(pixel_values=px[:6], max_new_tokens=9), reference)
    plans = q.__dict__["_fastgen_plans"].by_split
    assert all(not int8 for (*_, int8) in plans)


def test_load_quantize_and_the_cli_flag(tmp_path):
    from mmgpt import build_model, load
    from mmgpt.cli import build_parser

    model, proc = build_model("tiny", texts=["a red circle", "a blue square"])
    with pytest.raises(ValueError, match="quantize='int4'"):
        load(model, processor=proc, quantize="int4")
    pipe = load(model, processor=proc, quantize="int8")
    assert getattr(pipe.model, ATTR) == "int8"
    assert isinstance(pipe.caption(torch.rand(3, 64, 64).mul(255).byte().numpy().transpose(1, 2, 0), max_new_tokens=3),
                      str)
    parser = build_parser()
    for cmd in (["caption", "M", "a.png"], ["ask", "M", "a.png", "q?"], ["serve", "M"]):
        assert parser.parse_args([*cmd, "--quantize", "int8"]).quantize == "int8"
        assert parser.parse_args(cmd).quantize is None
    with pytest.raises(SystemExit):
        parser.parse_args(["caption", "M", "a.png", "--quantize", "int4"])


def test_fastgen_options_include_sampling():
    assert {"temperature", "top_p", "top_k"} <= fastgen.FAST_OPTIONS


def test_the_int8_benchmark_roads_compute_the_same_products():
    from benchmarks.int8_decode import product_fns

    fns = product_fns(rows=2)
    ref = fns.pop("addmm fp32 (MKL)")()
    assert len(ref) == 37 and {"_weight_int8pack_mm, bf16 activations", "_weight_int8pack_mm, fp32 activations"} <= set(fns)
    for name, fn in fns.items():
        for y, r in zip(fn(), ref):  # int8 weights (and bf16 activations): within a few percent of fp32
            assert (y.float() - r).norm() <= 0.05 * r.norm(), name
