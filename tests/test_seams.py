"""Features combined: each test crosses features whose seam failed (a wrong number, a crash)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import batchnorm
from batchnorm import recalibrate


def unbiased_stats(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance) per column of a (m, C) float64 tensor."""
    return values.mean(0), values.var(0, unbiased=True)


class Padded(nn.Module):
    """A sequence model that keeps zero-padded steps out of its BN with a mask."""

    def __init__(self, layer: nn.Module, by_keyword: bool) -> None:
        super().__init__()
        self.bn = layer
        self.by_keyword = by_keyword

    def forward(self, x):  # x: (N, L, C), padded steps all zero
        mask = x.abs().sum(-1) != 0
        if isinstance(self.bn, batchnorm.BatchNormAct):
            return self.bn(x, None, mask) if not self.by_keyword else self.bn(x, mask=mask)
        return self.bn(x, mask=mask) if self.by_keyword else self.bn(x, mask)


@pytest.mark.parametrize("by_keyword", [True, False], ids=["keyword", "positional"])
@pytest.mark.parametrize(
    "layer",
    [
        lambda: batchnorm.BatchNorm(3, axis=-1),
        lambda: batchnorm.BatchNormAct(3, axis=-1, activation="identity"),
    ],
    ids=["bn", "fused"],
)
def test_recalibrate_keeps_masked_positions_out(layer, by_keyword):
    """recalibrate's hook read args[0] only: padding entered the population statistics
    (mean 3.4 instead of 5.1 with a third of the steps padded)."""
    torch.manual_seed(0)
    batches = []
    for lengths in ([6, 4, 2, 5], [3, 6, 6, 1]):
        x = torch.randn(4, 6, 3, dtype=torch.float64) * 2 + 5
        for i, n in enumerate(lengths):
            x[i, n:] = 0
        batches.append(x)
    model = Padded(layer().double(), by_keyword)
    recalibrate(model, batches, progress=False)
    per_batch = [unbiased_stats(x[x.abs().sum(-1) != 0]) for x in batches]
    mean = torch.stack([m for m, _ in per_batch]).mean(0)
    var = torch.stack([v for _, v in per_batch]).mean(0)
    torch.testing.assert_close(model.bn.running_mean, mean)
    torch.testing.assert_close(model.bn.running_var, var)


@pytest.mark.parametrize("axis", [1, -1])
def test_recalibrate_ghost_bn_uses_the_groups_statistics(axis):
    """Ghost BN normalizes each group of virtual_batch_size examples with its own statistics
    and its running statistics average the groups'; recalibrate recorded the whole batch's
    variance instead, which adds the spread of the group means (3.4 instead of 0.9 here)."""
    torch.manual_seed(0)
    shift = torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0, 3.0, 3.0, 3.0]).reshape(8, 1, 1)
    batches = [torch.randn(8, 3, 5, dtype=torch.float64) + shift for _ in range(4)]
    if axis == -1:
        batches = [x.transpose(1, 2) for x in batches]  # (N, L, C)
    bn = batchnorm.BatchNorm(3, axis=axis, virtual_batch_size=4, momentum=None).double()
    for x in batches:
        bn(x)  # the cumulative average of the groups' statistics
    cumulative = bn.running_mean.clone(), bn.running_var.clone()
    recalibrate(bn, batches, progress=False)
    groups = [
        unbiased_stats(g.movedim(axis, -1).reshape(-1, 3)) for x in batches for g in x.split(4)
    ]
    torch.testing.assert_close(bn.running_mean, torch.stack([m for m, _ in groups]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([v for _, v in groups]).mean(0))
    torch.testing.assert_close((bn.running_mean, bn.running_var), cumulative)


def test_ghost_bn_without_running_statistics_evaluates_the_whole_batch():
    """Ghost BN is a training-time split: in eval mode a layer without running statistics
    normalized each group of virtual_batch_size examples apart (other numbers than the
    documented whole-batch normalization) and refused a last batch of 7 with groups of 4."""
    torch.manual_seed(0)
    bn = batchnorm.BatchNorm1d(3, virtual_batch_size=4, track_running_stats=False).eval()
    plain = nn.BatchNorm1d(3, track_running_stats=False).eval()
    for n in (8, 7):
        x = torch.randn(n, 3, 5) + torch.arange(n).reshape(n, 1, 1)
        torch.testing.assert_close(bn(x), plain(x))
        out = batchnorm.functional.batch_norm(x, None, None, virtual_batch_size=4)
        torch.testing.assert_close(out.output, plain(x))


def test_diagnose_a_model_with_a_layer_without_running_statistics():
    """diagnose crashed with "AttributeError: 'NoneType' object has no attribute 'numel'" on
    any model holding a track_running_stats=False layer (it read running_mean.numel() even
    where num_features exists); such a layer is measured in mode "batch_always"."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 3),
        batchnorm.BatchNorm1d(3),
    )  # fmt: skip
    data = [torch.randn(16, 4) for _ in range(3)]
    report = batchnorm.diagnose(model, data, progress=False)
    layer = report.layers["1"]
    assert (layer.mode, layer.num_features, layer.batches) == ("batch_always", 8, 3)
    assert layer.running_mean is None and layer.stale_rms is None
    # the population statistics are those of the layer's input, in float64
    inputs = torch.stack([model[0](x).double() for x in data])
    torch.testing.assert_close(layer.population_mean, inputs.mean(1).mean(0).cpu())
    assert report.layers["3"].mode == "batch"


class MaskedThenReLU(nn.Module):
    """BN called with a mask, positionally or by keyword, then a ReLU module."""

    def __init__(self, by_keyword: bool) -> None:
        super().__init__()
        self.bn = batchnorm.BatchNorm(3, axis=-1)
        self.act = nn.ReLU()
        self.by_keyword = by_keyword

    def forward(self, x):
        mask = x[..., 0] != 0
        return self.act(self.bn(x, mask=mask) if self.by_keyword else self.bn(x, mask))


@pytest.mark.parametrize("example", [False, True], ids=["fx", "export"])
@pytest.mark.parametrize("by_keyword", [True, False], ids=["keyword", "positional"])
def test_fuse_activations_leaves_a_bn_called_with_a_mask(by_keyword, example):
    """fuse_activations turned bn(x, mask) -> ReLU into a fused layer whose second argument
    is the residual: the model then failed ("expected a residual of the input's shape")."""
    torch.manual_seed(0)
    model = MaskedThenReLU(by_keyword)
    x = torch.randn(4, 6, 3)
    x[:, 4:] = 0
    model.eval()  # eval mode: the BN does not read its mask, export's graph does not show it
    expected = model(x)
    fused, report = batchnorm.fuse_activations(model, (x,) if example else None)
    assert report.fused == [] and [name for name, _ in report.skipped] == ["bn"]
    assert "more than its input" in report.skipped[0][1]
    torch.testing.assert_close(fused(x), expected)


@pytest.mark.parametrize("by_keyword", [True, False], ids=["keyword", "positional"])
@pytest.mark.parametrize(
    "layer",
    [
        lambda: batchnorm.BatchNorm(3, axis=-1),
        lambda: batchnorm.BatchNormAct(3, axis=-1, activation="leaky_relu"),
    ],
    ids=["bn", "fused"],
)
def test_freeze_keeps_a_model_that_passes_a_mask_working(layer, by_keyword):
    """A BN ignores its mask in eval mode, but FrozenBatchNorm(Act).forward took none: freeze
    turned a working masked model into a TypeError (or read the mask as the residual)."""
    torch.manual_seed(0)
    model = Padded(layer(), by_keyword)
    x = torch.randn(4, 6, 3) * 2 + 1
    x[:, 4:] = 0
    model(x)  # moves the running statistics
    expected = model.eval()(x)
    frozen = batchnorm.freeze(model)
    assert isinstance(frozen.bn, batchnorm.FrozenBatchNorm)
    call = frozen.bn.forward
    mask = x.abs().sum(-1) != 0
    args = (x, None, mask) if isinstance(frozen.bn, batchnorm.FrozenBatchNormAct) else (x, mask)
    got = call(x, mask=mask) if by_keyword else call(*args)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="mask must have the input's shape"):
        call(x, mask=mask[:, :3])


class MaskedBeforeLinear(nn.Module):
    """(N, L, C) sequence: Linear -> BN(axis=-1, mask) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.bn, self.post = (
            nn.Linear(3, 3),
            batchnorm.BatchNorm(3, axis=-1),
            nn.Linear(3, 2),
        )

    def forward(self, x):
        return self.post(self.bn(self.pre(x), mask=x[..., 0] != 0))


@pytest.mark.parametrize("example", [False, True], ids=["fx", "export"])
def test_fold_leaves_a_bn_called_with_a_mask(example):
    """fold replaced bn(x, mask=...) -> Linear by nn.Identity, whose forward takes no mask:
    the folded model raised TypeError on its first call. Under torch.export an eval-mode BN
    never reads its mask, so the graph alone did not show the argument."""
    torch.manual_seed(0)
    model = MaskedBeforeLinear()
    x = torch.randn(4, 6, 3)
    x[:, 4:] = 0
    model(x)
    model.eval()
    folded, report = batchnorm.fold(model, (x,) if example else None)
    assert report.traced
    assert report.folded == [] and "more than its input" in dict(report.skipped)["bn"]
    torch.testing.assert_close(folded(x), model(x))


@pytest.mark.parametrize("by_keyword", [True, False], ids=["keyword", "positional"])
@pytest.mark.parametrize("length", [6, 400], ids=["all_values", "sampled"])
def test_monitor_keeps_masked_positions_out(by_keyword, length):
    """monitor summarized every position of a masked BN's input: with half the steps padded
    by zeros, the recorded median of inputs around 10 was 0 instead of about 10."""
    torch.manual_seed(0)
    model = Padded(batchnorm.BatchNorm(3, axis=-1), by_keyword)
    x = torch.randn(4, length, 3) + 10
    x[:, length // 2 :] = 0
    with batchnorm.monitor(model, percentiles=(0, 50, 100), max_values=64) as mon:
        model(x)
    record = mon.history["bn"][0]
    valid = x[:, : length // 2].reshape(-1, 3)
    q = torch.tensor([0.0, 0.5, 1.0])
    if length == 6:  # every valid value enters: the exact percentiles
        torch.testing.assert_close(record["per_channel"], torch.quantile(valid, q, dim=0))
    per_channel = record["per_channel"]
    assert (per_channel[0] >= valid.min(0).values).all()  # no padding among the values
    assert (per_channel[1] - valid.median(0).values).abs().max() < 0.5


@pytest.mark.parametrize("cls", [batchnorm.BatchNorm1d, batchnorm.BatchNormAct1d])
def test_track_running_stats_switched_on_without_buffers_is_torchs_batch_norm(cls):
    """torch.nn's BN built with track_running_stats=False and switched to True later keeps
    normalizing with batch statistics (it has no buffers to update); ours raised
    AttributeError ('NoneType' object has no attribute 'is_cpu') in the commit step."""
    torch.manual_seed(0)
    ours, theirs = cls(3, track_running_stats=False), nn.BatchNorm1d(3, track_running_stats=False)
    ours.track_running_stats = theirs.track_running_stats = True
    x = torch.randn(6, 3, 4)
    expected = theirs(x)
    if cls is batchnorm.BatchNormAct1d:
        expected = torch.relu(expected)
    torch.testing.assert_close(ours(x), expected)
    assert ours.running_mean is None and ours.running_var is None


def layer_oracle(x, weight, bias, axis, mask, v, eps=1e-5):
    """float64 BN of a layer: per Ghost group (all of N without one), statistics of the
    positions the mask selects; y for every position, and the groups' mean of mu_B and of
    the unbiased variance (what the running statistics move towards)."""
    ax = axis % x.dim()
    xm = x.double().movedim(ax, -1)  # (..., C)
    keep = torch.ones(xm.shape[:-1], dtype=torch.bool) if mask is None else mask
    ys, means, variances = [], [], []
    for start in range(0, x.shape[0], v or x.shape[0]):
        group = slice(start, start + (v or x.shape[0]))
        values = xm[group][keep[group]]  # (K, C)
        mean, var = values.mean(0), values.var(0, correction=0)
        ys.append((xm[group] - mean) / torch.sqrt(var + eps))
        means.append(mean)
        variances.append(values.var(0, correction=1))
    y = torch.cat(ys) * weight.double() + bias.double()
    return y.movedim(-1, ax), torch.stack(means).mean(0), torch.stack(variances).mean(0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.sampled_from([4, 6, 8]),
    spatial=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    c=st.integers(1, 3),
    channels_last=st.booleans(),
    extra=st.sampled_from(["none", "mask", "ghost"]),
    backward=st.sampled_from(["native", "paper"]),
    momentum=st.sampled_from([0.3, None]),
    seed=st.integers(0, 2**16),
)
def test_property_layer_matches_float64_oracle_across_features(
    n, spatial, c, channels_last, extra, backward, momentum, seed
):
    """BatchNorm(axis) with a mask or Ghost BN, either backward, momentum or the cumulative
    average, channels first or last: output, gradients, running statistics and the eval map
    against a float64 oracle."""
    g = torch.Generator().manual_seed(seed)
    axis = -1 if channels_last and spatial else 1
    shape = [n, *spatial, c] if axis == -1 else [n, c, *spatial]
    x = torch.randn(shape, generator=g) * 3 + 2
    mask_shape = [n, *spatial]
    mask = torch.rand(mask_shape, generator=g) > 0.3 if extra == "mask" else None
    v = 2 if extra == "ghost" else None
    per_group = (v or n) * x[0, ...].numel() // c
    if per_group < 2 or (mask is not None and int(mask.sum()) < 2):
        return  # training needs two values per channel (tested elsewhere)
    bn = batchnorm.BatchNorm(
        c, axis=axis, backward=backward, momentum=momentum, virtual_batch_size=v
    )
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0, generator=g)
        bn.bias.uniform_(-1.0, 1.0, generator=g)
    xr = x.clone().requires_grad_()
    y = bn(xr, mask)
    expected, mean, var = layer_oracle(x, bn.weight.detach(), bn.bias.detach(), axis, mask, v)
    keep = torch.ones_like(x, dtype=torch.bool)
    if mask is not None:
        keep = mask.unsqueeze(axis % x.dim()).expand_as(x)
    torch.testing.assert_close(y.double()[keep], expected[keep], rtol=1e-4, atol=1e-4)
    step = 1.0 if momentum is None else momentum
    torch.testing.assert_close(bn.running_mean.double(), step * mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), 1 - step + step * var, rtol=1e-5, atol=1e-5)
    # gradients of a loss over the positions in the statistics, against autograd in float64
    dy = torch.randn(y.shape, generator=g) * keep
    got = torch.autograd.grad(y, (xr, bn.weight, bn.bias), dy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, bn.weight, bn.bias))
    ref = layer_oracle(x64, w64, b64, axis, mask, v)[0]
    want = torch.autograd.grad(ref, (x64, w64, b64), dy.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=2e-3, atol=2e-3)
    bn.eval()
    shift = (x.double().movedim(axis % x.dim(), -1) - bn.running_mean.double()) / torch.sqrt(
        bn.running_var.double() + bn.eps
    )
    eval_map = (shift * bn.weight.double() + bn.bias.double()).movedim(-1, axis % x.dim())
    torch.testing.assert_close(bn(x, mask).double(), eval_map, rtol=1e-5, atol=1e-5)
