"""The Triton kernels in training loops (batchnorm.training), on the CPU under the interpreter:
a deferred commit takes the torch path (the kernels keep the statistics to themselves), and a
recomputed checkpointed forward runs the kernels without their in-kernel update.

Oracles: the same layer without checkpointing (state, gradients), one forward over the
concatenated micro-batches (state).
"""

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import batchnorm
from batchnorm import dispatch, kernels


@pytest.fixture
def spy(monkeypatch):
    """Record, per kernel call, whether it was handed the running statistics to update."""
    calls = []
    real = kernels.batch_norm_act

    def recording(input, weight, bias, running_mean, *args, **kwargs):
        calls.append(running_mean is not None)
        return real(input, weight, bias, running_mean, *args, **kwargs)

    monkeypatch.setattr(dispatch.kernels, "batch_norm_act", recording)
    return calls


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("layer_class", [batchnorm.BatchNorm2d, batchnorm.BatchNormAct2d])
def test_checkpoint_recompute_runs_the_kernels_without_the_update(spy, layer_class, reentrant):
    torch.manual_seed(0)
    layer = layer_class(3, backend="triton")
    ref = copy.deepcopy(layer)
    x = torch.randn(6, 3, 4, 4) + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    checkpoint(layer, xa, use_reentrant=reentrant).square().sum().backward()
    ref(xb).square().sum().backward()
    assert spy == [True, False, True]  # the real forward, its recomputation, the reference
    torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=0, atol=0)
    assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == 1
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)


def test_accumulate_takes_the_torch_path_and_commits_once(spy):
    torch.manual_seed(0)
    layer = batchnorm.BatchNorm2d(3, backend="triton")
    ref = copy.deepcopy(layer)
    xs = [torch.randn(n, 3, 4, 4) for n in (2, 5, 3)]
    with batchnorm.accumulate(layer):
        for x in xs:
            layer(x)
    assert spy == []
    ref(torch.cat(xs))
    torch.testing.assert_close(layer.running_mean, ref.running_mean)
    torch.testing.assert_close(layer.running_var, ref.running_var)
    assert int(layer.num_batches_tracked) == 1
    layer(xs[0])
    assert spy == [True, True]  # after the step the kernels commit again
