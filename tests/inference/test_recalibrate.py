"""recalibrate (Algorithm 2, step 2) against float64 statistics of the concatenated data."""

from __future__ import annotations

import copy

import pytest
import torch
from bn_models import bn_layers
from torch import nn

import batchnorm
from batchnorm import recalibrate

SPLITS = [(12, 12, 12), (7, 13, 5, 11), (36,)]  # the same 36 samples, even and uneven


def bn_float64(x: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 without gamma/beta, float64, channel axis 1: (x - mu_B) / sqrt(s2_B + eps)."""
    dims = [d for d in range(x.dim()) if d != 1]
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5)


def affine(bn, y):
    shape = [1] * y.dim()
    shape[1] = -1
    return y * bn.weight.double().reshape(shape) + bn.bias.double().reshape(shape)


def mlp_case():
    """Linear -> torch BN1d -> ReLU -> Dropout -> Linear -> our BN1d (channels on axis 1)."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(5, 6, bias=False),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(6, 4),
        batchnorm.BatchNorm1d(4, momentum=None),
    )

    def bn_inputs(x):  # the input of each BN layer, (N, C, *) in float64, dropout off
        x = x.double()
        h1 = x @ model[0].weight.double().T
        h2 = affine(model[1], bn_float64(h1)).clamp_min(0)
        h2 = h2 @ model[4].weight.double().T + model[4].bias.double()
        return [h1, h2]

    return model, (5,), bn_inputs


def conv_case():
    """Conv2d -> torch BN2d -> ReLU -> Conv2d -> channels-last BatchNorm(axis=-1) via permute."""
    torch.manual_seed(2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 5, 1)
            self.bn2 = batchnorm.BatchNorm(5, axis=-1)

        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            return self.bn2(self.conv2(h).permute(0, 2, 3, 1))

    model = Net()

    def bn_inputs(x):
        x = x.double()
        h1 = nn.functional.conv2d(x, model.conv1.weight.double())
        h2 = affine(model.bn1, bn_float64(h1)).clamp_min(0)
        h2 = nn.functional.conv2d(h2, model.conv2.weight.double(), model.conv2.bias.double())
        return [h1, h2]

    return model, (3, 5, 4), bn_inputs


RECAL_CASES = {"mlp": mlp_case, "conv": conv_case}


def oracle(bn_inputs, batches, estimator):
    """Per-layer (E[x], Var[x]) computed directly from each batch's BN inputs, in float64."""
    per_batch = [bn_inputs(x) for x in batches]
    out = []
    for layer in range(len(per_batch[0])):
        flat = [h[layer].transpose(0, 1).reshape(h[layer].shape[1], -1) for h in per_batch]
        if estimator == "pooled":
            allx = torch.cat(flat, dim=1)
            out.append((allx.mean(1), allx.var(1, correction=1)))
        else:  # mean over batches of mu_B and of the unbiased m/(m-1) * sigma2_B
            out.append(
                (
                    torch.stack([f.mean(1) for f in flat]).mean(0),
                    torch.stack([f.var(1, correction=1) for f in flat]).mean(0),
                )
            )
    return out


def make_batches(shape, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(sum(sizes), *shape, generator=g) * 2 + 3
    return list(torch.split(data, list(sizes)))


@pytest.mark.parametrize("estimator", ["algorithm2", "pooled"])
@pytest.mark.parametrize("case", sorted(RECAL_CASES))
@pytest.mark.parametrize("sizes", SPLITS[:2])
def test_recalibrate_matches_float64_statistics(case, estimator, sizes):
    model, shape, bn_inputs = RECAL_CASES[case]()
    batches = make_batches(shape, sizes)
    # Tuples (input, target) as a DataLoader yields them.
    used = recalibrate(model, [(x, 0) for x in batches], estimator=estimator, progress=False)
    assert used == len(sizes)
    expected = oracle(bn_inputs, batches, estimator)
    for bn, (mean, var) in zip(bn_layers(model), expected):
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-5)


def test_pooled_is_invariant_to_the_batch_split():
    """fvcore's test: the same samples in uneven batches give the same statistics."""
    results = []
    for sizes in SPLITS:
        torch.manual_seed(3)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4))
        recalibrate(model, make_batches((3, 6, 6), sizes), estimator="pooled", progress=False)
        results.append((model[1].running_mean.clone(), model[1].running_var.clone()))
    for mean, var in results[1:]:
        torch.testing.assert_close(mean, results[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(var, results[0][1], rtol=1e-6, atol=1e-6)


def test_algorithm2_weighs_batches_equally_and_pooled_by_count():
    """One batch of 2 samples and one of 30: Algorithm 2 averages the two batch statistics."""
    model = nn.Sequential(nn.BatchNorm1d(1))
    a = torch.tensor([[0.0], [2.0]])
    b = torch.full((30, 1), 10.0) + torch.linspace(-1, 1, 30)[:, None]
    recalibrate(model, [a, b], progress=False)
    assert model[0].running_mean.item() == pytest.approx((1.0 + 10.0) / 2, rel=1e-6)
    assert model[0].running_var.item() == pytest.approx((2.0 + b.var().item()) / 2, rel=1e-5)
    recalibrate(model, [a, b], estimator="pooled", progress=False)
    allx = torch.cat([a, b]).double()
    assert model[0].running_mean.item() == pytest.approx(allx.mean().item(), rel=1e-6)
    assert model[0].running_var.item() == pytest.approx(allx.var().item(), rel=1e-5)


def test_recalibrate_restores_modes_momentum_parameters_and_counters():
    model, shape, _ = mlp_case()
    model.train()
    model[3].eval()  # a submodule in its own mode must stay so
    model[1].momentum = 0.3
    params = {k: v.clone() for k, v in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    counters = [bn.num_batches_tracked.clone() for bn in bn_layers(model)]
    seen_modes = []
    model[3].register_forward_pre_hook(lambda m, a: seen_modes.append(m.training))
    recalibrate(model, iter(make_batches(shape, (8, 8, 8))), num_batches=2, progress=False)
    assert seen_modes == [False, False]  # dropout off during the pass; num_batches honoured
    assert [m.training for m in model.modules()] == modes
    assert model[1].momentum == 0.3 and model[5].momentum is None
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]) and v.grad is None
    for bn, n in zip(bn_layers(model), counters):
        assert torch.equal(bn.num_batches_tracked, n)


def test_recalibrate_refuses_empty_input_and_models_without_bn():
    model, _, _ = mlp_case()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="no batch"):
        recalibrate(model, [], progress=False)
    with pytest.raises(ValueError, match="no batch"):
        recalibrate(model, iter(()), progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert model.training
    with pytest.raises(ValueError, match="no BN layer"):
        recalibrate(nn.Linear(2, 2), [torch.randn(4, 2)], progress=False)
    with pytest.raises(ValueError, match="estimator"):
        recalibrate(model, [torch.randn(4, 5)], estimator="ema", progress=False)


def test_recalibrate_writes_nothing_when_statistics_are_not_finite():
    model = nn.Sequential(nn.BatchNorm1d(2))
    bad = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    with pytest.raises(ValueError, match="non-finite"):
        recalibrate(model, [torch.randn(4, 2), bad], progress=False)
    assert torch.equal(model[0].running_mean, torch.zeros(2))
    assert torch.equal(model[0].running_var, torch.ones(2))


def test_recalibrate_covers_sync_batchnorm_like_plain_bn():
    """torch's SyncBatchNorm (and ours, if present) outside a process group: plain BN stats."""
    layers = [nn.SyncBatchNorm]
    try:
        from batchnorm.distributed import SyncBatchNorm
    except ImportError:
        pass
    else:
        layers.append(SyncBatchNorm)
    batches = make_batches((3, 4, 4), (6, 9))
    reference = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    recalibrate(reference, batches, estimator="pooled", progress=False)
    for layer in layers:
        model = copy.deepcopy(reference)
        model[1] = layer(4)
        recalibrate(model, batches, estimator="pooled", progress=False)
        torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
        torch.testing.assert_close(model[1].running_var, reference[1].running_var)


@pytest.mark.parametrize("estimator", ["algorithm2", "pooled"])
def test_a_batch_with_one_value_per_channel_is_skipped_with_a_warning(estimator):
    """Defect 11: a last batch of one sample raised ZeroDivisionError (m/(m-1) with m = 1).

    Now the whole batch is skipped for every layer, with a warning, and the statistics are
    those of the other batches."""
    model, shape, _ = mlp_case()
    reference = copy.deepcopy(model)
    batches = make_batches(shape, (8, 6, 1))
    recalibrate(reference, batches[:2], estimator=estimator, progress=False)
    with pytest.warns(UserWarning, match="skipped 1 batch"):
        used = recalibrate(model, batches, estimator=estimator, progress=False)
    assert used == 2
    for bn, ref in zip(bn_layers(model), bn_layers(reference)):
        assert torch.equal(bn.running_mean, ref.running_mean)
        assert torch.equal(bn.running_var, ref.running_var)


def test_only_one_value_batches_leave_the_model_unchanged():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="fewer than 2 values"):
        with pytest.raises(ValueError, match="every batch was skipped"):
            recalibrate(model, [torch.randn(1, 3), torch.randn(1, 3)], progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
