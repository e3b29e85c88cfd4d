"""The statistics pass and estimators that recalibrate and diagnose share (inference/population.py),
against float64 statistics computed directly from each batch's layer inputs."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from realmodels import import_torchvision
from torch import nn

import batchnorm
from batchnorm.inference.population import PopulationStats, StatisticsPass
from batchnorm.swap import channel_axis

pytestmark = pytest.mark.usefixtures("one_thread")


def renorm_net(momentum: float) -> nn.Sequential:
    """Linear -> Batch Renorm (limits never reached) -> ReLU -> Linear -> BN1d."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 6),
        batchnorm.BatchRenorm1d(6, momentum=momentum, r_max=1e6, d_max=1e6),
        nn.ReLU(),
        nn.Linear(6, 3),
        batchnorm.BatchNorm1d(3),
    )
    with torch.no_grad():
        net[1].running_mean.fill_(0.5)
        net[1].running_var.fill_(2.0)
    return net


@pytest.mark.parametrize("momentum", [0.01, 0.9])
@pytest.mark.parametrize("reverse", [False, True])
def test_batch_renorm_recalibration_depends_neither_on_momentum_nor_on_order(momentum, reverse):
    """Defect: recalibrate put the buffers back only at the end, so a Batch Renorm layer's
    running statistics drifted during the pass and, since its training output is
    (x - running_mean) / sqrt(running_var + eps) when the limits are not reached, the next
    layer's statistics depended on momentum and batch order (0.13 apart for momentum 0.01 vs
    0.9). Every batch now sees the model as it was."""
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 4, generator=g) * 2 + 1 for _ in range(6)]
    net = renorm_net(momentum)
    with torch.no_grad():  # oracle: the renorm layer on its original running statistics
        before = copy.deepcopy(net).double().eval()
        inputs = [before[:4](x.double()) for x in data]
    mean = torch.stack([h.mean(0) for h in inputs]).mean(0)
    var = torch.stack([h.var(0, correction=1) for h in inputs]).mean(0)
    batchnorm.recalibrate(net, data[::-1] if reverse else data, progress=False)
    torch.testing.assert_close(net[4].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[4].running_var.double(), var, rtol=1e-5, atol=1e-6)
    # diagnose measures through the same pass, so it finds what recalibrate wrote.
    d = batchnorm.diagnose(renorm_net(momentum), data, progress=False).layers["4"]
    torch.testing.assert_close(d.population_mean, mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", [nn.BatchNorm1d, batchnorm.BatchNorm1d])
def test_diagnose_skips_a_one_sample_batch_as_recalibrate_does(layer):
    """Defect: diagnose raised the BN layer's "Expected more than 1 value per channel" on the
    last batch of one sample (a DataLoader without drop_last); recalibrate skipped it. Both
    now skip it as a whole, with a warning, and agree on the population statistics."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), layer(4))
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g), torch.randn(1, 3)]
    with pytest.warns(UserWarning, match="diagnose skipped 1 batch"):
        report = batchnorm.diagnose(net, data, progress=False)
    assert report.batches == 2 and report.layers["1"].batches == 2
    with torch.no_grad():
        h = torch.cat([net[0](x) for x in data[:2]]).double()
    torch.testing.assert_close(report.layers["1"].population_mean, h.mean(0), rtol=1e-6, atol=1e-7)
    with pytest.warns(UserWarning, match="recalibrate skipped 1 batch"):
        assert batchnorm.recalibrate(net, data, progress=False) == 2
    assert torch.equal(net[1].running_mean, report.layers["1"].population_mean.float())
    assert torch.equal(net[1].running_var, report.layers["1"].population_var.float())


def torchvision_frozen(c: int) -> nn.Module:
    """torchvision.ops.FrozenBatchNorm2d: buffers only, no settings but eps (a layer of
    batchnorm.swap.FROZEN_CLASSES)."""
    return import_torchvision().ops.FrozenBatchNorm2d(c)


def test_each_layer_measured_on_its_own_channel_axis():
    """One channel-axis lookup (swap.channel_axis) for every module: ours report theirs,
    torch's BN, torchvision-style frozen layers and any other module use axis 1."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.frozen = torchvision_frozen(4)
            self.last = batchnorm.BatchNorm(4, axis=-1)

        def forward(self, x):
            return self.last(self.frozen(self.conv(x)).permute(0, 2, 3, 1))

    assert [channel_axis(m) for m in (nn.ReLU(), nn.BatchNorm2d(2), Net().frozen)] == [1, 1, 1]
    assert channel_axis(batchnorm.BatchNorm(3, axis=-1)) == -1
    assert channel_axis(batchnorm.FrozenBatchNorm(3, axis=-1)) == -1
    torch.manual_seed(0)
    net = Net()
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(5, 3, 2, 3, generator=g) + 2 for _ in range(3)]
    report = batchnorm.diagnose(net, data, progress=False, estimator="pooled")
    with torch.no_grad():  # the frozen layer's input, then the channels-last layer's
        inputs = {"frozen": [net.conv(x) for x in data]}
        inputs["last"] = [net.frozen(h) for h in inputs["frozen"]]
    for name, hs in inputs.items():
        h = torch.cat(hs).double().transpose(0, 1).reshape(4, -1)
        torch.testing.assert_close(
            report.layers[name].population_mean, h.mean(1), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            report.layers[name].population_var, h.var(1), rtol=1e-5, atol=1e-6
        )


def test_population_stats_leave_out_non_finite_batches():
    acc = PopulationStats("pooled")
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 7.0]], dtype=torch.float64)
    assert acc.add(x.mean(0), x.var(0, correction=0), 3)
    assert not acc.add(torch.tensor([0.0, float("nan")], dtype=torch.float64), torch.ones(2), 3)
    assert acc.batches == 1 and acc.nonfinite == 1 and acc.n == 3
    mean, var = acc.result()
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(var, x.var(0, correction=1))
    with pytest.raises(ValueError, match="estimator must be one of"):
        PopulationStats("ema")


def test_statistics_pass_restores_the_model_after_an_exception():
    net = renorm_net(0.1)
    net[2].train()
    net[3].eval()
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    modes = [m.training for m in net.modules()]
    stats = PopulationStats()
    with pytest.raises(RuntimeError):
        with StatisticsPass(net, {"4": (net[4], stats)}, "test") as run:
            run.record(torch.randn(8, 4))
            run.record(torch.randn(8, 5))  # wrong width: fails inside the forward
    assert sum(len(m._forward_pre_hooks) for m in net.modules()) == 0
    assert [m.training for m in net.modules()] == modes
    for k, v in net.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert run.used == 1 and stats.batches == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run.finish() == 1
