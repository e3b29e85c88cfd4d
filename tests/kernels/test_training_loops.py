"""The Triton kernels in training loops (batchnorm.training), on the CPU under the interpreter:
the kernels return the batch statistics and the layer's one commit step handles them, so a
deferred commit runs on the kernels and commits the exact merge once, and a recomputed
checkpointed forward runs the kernels and commits nothing.

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
    """Record, per kernel call of a layer, whether autograd was recomputing a checkpoint."""
    calls = []
    real = kernels.transform

    def recording(*args, **kwargs):
        calls.append(torch._C._current_graph_task_id() != -1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch.kernels, "transform", recording)
    return calls


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("layer_class", [batchnorm.BatchNorm2d, batchnorm.BatchNormAct2d])
def test_checkpoint_recompute_runs_the_kernels_and_commits_nothing(spy, layer_class, reentrant):
    torch.manual_seed(0)
    layer = layer_class(3, backend="triton")
    ref = copy.deepcopy(layer)
    x = torch.randn(6, 3, 4, 4) + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    checkpoint(layer, xa, use_reentrant=reentrant).square().sum().backward()
    ref(xb).square().sum().backward()
    assert spy == [False, True, False]  # the real forward, its recomputation, the reference
    torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=0, atol=0)
    assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == 1
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)


def test_accumulate_runs_the_kernels_and_commits_once(spy):
    torch.manual_seed(0)
    layer = batchnorm.BatchNorm2d(3, backend="triton")
    ref = copy.deepcopy(layer)
    xs = [torch.randn(n, 3, 4, 4) for n in (2, 5, 3)]
    with batchnorm.accumulate(layer):
        for x in xs:
            layer(x)
    assert spy == [False, False, False]  # each micro-batch on the kernels
    ref(torch.cat(xs))
    torch.testing.assert_close(layer.running_mean, ref.running_mean)
    torch.testing.assert_close(layer.running_var, ref.running_var)
    assert int(layer.num_batches_tracked) == 1
    before = layer.running_mean.clone()
    layer(xs[0])
    assert len(spy) == 5 and int(layer.num_batches_tracked) == 2  # after the step: commits
    assert not torch.equal(layer.running_mean, before)
