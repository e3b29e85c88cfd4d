"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny tensors run as fast, and immune to OpenMP
    thrashing on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def randomize():
    """Give a BN layer random gamma, beta and running statistics (seeded), so a comparison
    with torch.nn does not pass by the identity defaults; returns the layer."""

    def fill(layer, seed=0):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            layer.weight.copy_(torch.rand(layer.num_features, generator=g) + 0.5)
            layer.bias.copy_(torch.randn(layer.num_features, generator=g))
            layer.running_mean.copy_(torch.randn(layer.num_features, generator=g))
            layer.running_var.copy_(torch.rand(layer.num_features, generator=g) + 0.5)
        return layer

    return fill
