"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny tensors on 2 shared cores: one torch thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def quiet_and_one_thread():
    """One torch thread and no transformers warnings for a test that runs documentation's code blocks;
    restores both, and grad mode, afterwards."""
    from transformers.utils import logging as hf_logging

    threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    grad = torch.is_grad_enabled()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    hf_logging.set_verbosity(verbosity)
    torch.set_grad_enabled(grad)


@pytest.fixture(params=["avx2", "avx512"])
def isa(request):
    """The several-row products on the AVX2 code, then on the AVX-512 code (skipped where the CPU lacks it)."""
    from mmgpt.speed import kernels

    if not kernels.available():
        pytest.skip("the kernels do not build here (x86-64 Linux with AVX2 and a C compiler)")
    if kernels.set_avx512(request.param == "avx512") != (request.param == "avx512"):
        pytest.skip("this CPU has no AVX-512")
    yield request.param
    kernels.set_avx512(bool(kernels._wanted("MMGPT_KERNELS_AVX512")))


@pytest.fixture(params=["fp32 activations", "vnni"])
def vnni(request):
    """int8 products with fp32 activations, then on VNNI with int8 activations (skipped where the CPU
    lacks it). The test's value: True when VNNI runs."""
    from mmgpt.speed import kernels

    if not kernels.available():
        pytest.skip("the kernels do not build here (x86-64 Linux with AVX2 and a C compiler)")
    want = request.param == "vnni"
    if kernels.set_vnni(want) != want:
        pytest.skip("this CPU has no AVX-512 VNNI")
    yield want
    kernels.set_vnni(bool(kernels._wanted("MMGPT_KERNELS_VNNI")))
