"""mmgpt.speed.kernels.rows_linear against float64 products, and greedy decoding with it against torch's kernels."""

import logging
import os
import platform
import shutil

import pytest
import torch

from mmgpt.speed import kernels

CAN_BUILD = (platform.system() == "Linux" and platform.machine() == "x86_64"
             and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
             and any(shutil.which(c) for c in ("cc", "gcc")))
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="x86-64 Linux with AVX2 and a C compiler")



@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A clean kernel state and build cache for the test, the process's state back afterwards."""
    saved = dict(kernels._state)
    kernels._state.clear()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    yield tmp_path / "cache" / "mmgpt" / "kernels"
    kernels._state.clear()
    kernels._state.update(saved)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_rows_linear_matches_a_float64_product(threads, isa):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert kernels.available()
        g = torch.Generator().manual_seed(0)
        for k, n in [(384, 1152), (1536, 384), (384, 8000), (37, 5), (100, 33), (64, 80), (8, 16)]:
            w, b = torch.randn(k, n, generator=g), torch.randn(n, generator=g)
            for bias in (b, None):
                f = kernels.rows_linear(w, bias)
                for rows in (1, 2, 3, 4, 5, 7, 9, 16, 17, 32, 40):  # 40: past MAX_ROWS, torch's addmm
                    x = torch.randn(rows, k, generator=g)
                    ref = x.double() @ w.double() + (0 if bias is None else bias.double())
                    y = f(x)
                    assert y.shape == (rows, n) and y.dtype == torch.float32
                    assert torch.allclose(y.double(), ref, atol=1e-4, rtol=1e-5), (k, n, rows)
        x = torch.randn(6, 2 * 384, generator=g)[:, ::2]  # a non-contiguous input
        w = torch.randn(384, 64, generator=g)
        assert torch.allclose(kernels.rows_linear(w, None)(x), x @ w, atol=1e-4)
    finally:
        torch.set_num_threads(old)


@needs_kernel
def test_greedy_decoding_gives_the_same_tokens_with_and_without_the_kernel(monkeypatch):
    from test_model import left_padded_prompts, make_model

    model = make_model(seed=4)
    _, ids, mask = left_padded_prompts()
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    assert kernels.available()
    kw = dict(max_new_tokens=10, do_sample=False)
    with_kernel = [model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, **kw),
                   model.generate(pixel_values=px[:1], **kw)]
    monkeypatch.setenv("MMGPT_KERNELS", "0")
    assert not kernels.available()
    without = [model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, **kw),
               model.generate(pixel_values=px[:1], **kw)]
    reference = [model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, fast=False, **kw),
                 model.generate(pixel_values=px[:1], fast=False, **kw)]
    for a, b, r in zip(with_kernel, without, reference):
        assert torch.equal(a, b) and torch.equal(a, r)


@needs_kernel
@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_c_decode_step_gives_the_logits_of_the_models_forward(monkeypatch, int8, threads, isa, wide):
    """Every one-token step of the C path (rows_linear.c `mmgpt_decode_step`), captured, against the
    model's own forward (transformers' GPT-2 blocks) over the generated sequence: left-padded rows of
    different lengths, fp32 and int8 weights (the forward then reads the dequantized ones)."""
    from test_model import GPT, VIT, left_padded_prompts, make_model

    from mmgpt.speed import decode
    from mmgpt.speed.quantize import quantize_model

    # wide: 50 image tokens (the cross-attention scores 32, 8 and 1 keys at a time) and 64-wide heads
    size, over = (56, {"vision": {"backend": "vit", "config": {**VIT, "image_size": 56}},
                       "text": {**GPT, "n_head": 1}}) if wide else (32, {})
    model = make_model(seed=4, **over)
    if wide:  # sharp cross-attention, so that a wrong score shows in the logits
        with torch.no_grad():
            for blk in model.decoder.transformer.h[model.k:]:
                blk.crossattention.q_attn.weight.mul_(8.0)
    model = quantize_model(model, "int8" if int8 else None)
    _, ids, mask = left_padded_prompts()
    px = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(5))
    seen, built = [], decode._c_step

    def capture(*args, **kw):
        step = built(*args, **kw)
        assert step is not None, "the C step did not run"

        def run(h, pos):
            logits = step(h, pos)
            seen.append((pos, logits.clone()))  # generate() then masks the EOS column in place (min_new_tokens)
            return logits

        return run

    monkeypatch.setattr(decode, "_c_step", capture)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    vnni = kernels.vnni()
    kernels.set_vnni(False)  # int8 weights with fp32 activations: what the forward computes (VNNI: the next test)
    try:
        out = model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=8,
                             min_new_tokens=8, do_sample=False)
    finally:
        torch.set_num_threads(old)
        kernels.set_vnni(vnni)
    assert len(seen) == 7  # the first token comes from the prompt
    full_mask = torch.cat([mask, torch.ones(3, out.shape[1] - ids.shape[1], dtype=torch.long)], dim=1)
    with torch.no_grad():
        ref = model(pixel_values=px, input_ids=out, attention_mask=full_mask, compute_itc=False).logits
    for pos, logits in seen:  # the step at position pos predicts the token at pos + 1
        torch.testing.assert_close(logits, ref[:, pos], rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_the_c_decode_step_on_vnni_gives_the_torch_steps_logits(monkeypatch, threads, vnni):
    """With int8 activations (VNNI) the forward is no reference; the torch step is: it runs the same
    products (`rows_linear_int8`, the same kernel) and its own layer norms, attention and GELU. Both
    loops' logits at every step, and their tokens, agree."""
    from test_model import GPT, VIT, left_padded_prompts, make_model

    from mmgpt.speed import decode
    from mmgpt.speed.quantize import quantize_model

    model = quantize_model(make_model(seed=4, vision={"backend": "vit", "config": {**VIT, "image_size": 56}},
                                      text={**GPT, "n_head": 1}), "int8")
    _, ids, mask = left_padded_prompts()
    px = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    runs, built = {}, decode._c_step

    def generate(c_step: bool):
        seen = []

        def capture(*args, **kw):
            step = built(*args, **kw) if c_step else None
            assert (step is not None) == c_step
            return None if step is None else (lambda h, pos: seen.append(step(h, pos).clone()) or seen[-1].clone())

        monkeypatch.setattr(decode, "_c_step", capture)
        if not c_step:  # the torch step: record its logits through the loop's step calls
            real_loop = decode._token_loop

            def loop(logits, step, *a, **kw):
                return real_loop(logits, lambda *s: seen.append(step(*s).clone()) or seen[-1].clone(), *a, **kw)

            monkeypatch.setattr(decode, "_token_loop", loop)
        out = model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=8,
                             min_new_tokens=8, do_sample=False)
        return out, seen

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs["c"] = generate(True)
        monkeypatch.undo()
        runs["torch"] = generate(False)
    finally:
        torch.set_num_threads(old)
    (out_c, seen_c), (out_t, seen_t) = runs["c"], runs["torch"]
    assert torch.equal(out_c, out_t)
    assert len(seen_c) == len(seen_t) == 7
    for a, b in zip(seen_c, seen_t):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_the_library_is_built_once_and_reused(fresh_state):
    assert kernels.available()
    built = list(fresh_state.glob("rows_linear-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    kernels._state.clear()
    assert kernels.available() and built[0].stat().st_mtime_ns == mtime


@needs_kernel
def test_inputs_the_kernel_cannot_read_go_to_torch(fresh_state):
    w, b = torch.randn(64, 40), torch.randn(40)
    f = kernels.rows_linear(w, b)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError):  # torch's error, not a read past the input's end
        f(torch.randn(2, 10))
    with pytest.raises(RuntimeError):
        f(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert f(x).dtype == torch.bfloat16  # torch's addmm under autocast



@needs_kernel
def test_a_corrupt_library_in_the_cache_is_rebuilt(fresh_state):
    lib = kernels.library_path()  # in the test's own cache: nothing has loaded it
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"garbage")
    assert kernels.available() and lib.stat().st_size > 1000


def test_without_a_compiler_decoding_falls_back_with_one_log_line(fresh_state, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("PATH", os.devnull)  # no cc or gcc either
    with caplog.at_level(logging.INFO, logger="mmgpt.speed.kernels"):
        assert not kernels.available()
        assert not kernels.available()
    lines = [r.getMessage() for r in caplog.records if r.name == "mmgpt.speed.kernels"]
    assert len(lines) <= 1 and all("torch's kernels" in line for line in lines)
    with pytest.raises(RuntimeError, match="available"):
        kernels.rows_linear(torch.zeros(4, 4), None)
    from test_model import make_model

    model = make_model(seed=4)
    out = model.generate(pixel_values=torch.randn(1, 3, 32, 32), max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1
