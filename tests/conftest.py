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
