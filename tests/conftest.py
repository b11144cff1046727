"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one thread is fastest, and immune to other processes' load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["compiled", "torch ops"])
def passes(request):
    """The CPU draw's passes over the logits: the compiled ones (nbp.generator.kernels) and the torch ops that
    replace them where the extension is not built. A test taking this fixture runs with each."""
    from nbp.generator import kernels

    if request.param == "torch ops":
        with kernels.torch_ops():
            yield request.param
        return
    if not kernels.built():
        pytest.skip("the extension nbp.generator._kernels is not built (no C compiler at install)")
    yield request.param
