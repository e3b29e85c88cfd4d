"""BN subclasses of other libraries through every pass: timm's BatchNormAct2d is handled exactly
(fold keeps its activation, freeze/unfreeze, convert and sync round trips keep it), any other
subclass with its own forward is left alone with a warning or a report line.

Oracle: the layer's own forward (``act(drop(batch_norm(x)))``) before the pass. The tests run
against a class that mirrors timm's ``timm.layers.norm_act.BatchNormAct2d`` (same structure and
forward, read from timm 1.0's source) and against timm's class itself when ``import timm`` works.
"""

import copy
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as TF
from realmodels import import_timm, import_torchvision
from torch import nn

import batchnorm
from batchnorm import fold, freeze, fuse_activations, swap, unfreeze
from batchnorm.fused import BatchNormAct2d, FrozenBatchNormAct, SyncBatchNormAct


class MirrorBatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d (timm/layers/norm_act.py): torch's BN2d with ``drop`` and ``act``
    children, built from act_layer/apply_act/drop_layer; forward: F.batch_norm, drop, act."""

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        apply_act=True,
        act_layer=nn.ReLU,
        act_kwargs=None,
        inplace=True,
        drop_layer=None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        act = None
        if apply_act:
            try:
                act = act_layer(inplace=inplace, **(act_kwargs or {}))
            except TypeError:  # an activation without an inplace argument
                act = act_layer(**(act_kwargs or {}))
        self.act = nn.Identity() if act is None else act

    def forward(self, x):
        assert x.ndim == 4, f"expected 4D input (got {x.ndim}D input)"
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        x = TF.batch_norm(
            x,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
        )
        return self.act(self.drop(x))


def _timm():
    # timm is a dev dependency: tests/realmodels.py imports it (and torchvision) on CPU torch.
    return import_timm()


@pytest.fixture(params=["mirror", "timm"])
def norm_act(request, monkeypatch):
    """The BN + act class under test: the mirror (registered as timm's is) or timm's own."""
    if request.param == "timm":
        return _timm().layers.norm_act.BatchNormAct2d
    name = f"{MirrorBatchNormAct2d.__module__}.{MirrorBatchNormAct2d.__qualname__}"
    monkeypatch.setattr(swap, "NORM_ACT_CLASSES", swap.NORM_ACT_CLASSES | {name})
    return MirrorBatchNormAct2d


ACTS = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
    "relu6": nn.ReLU6,
    "identity": None,  # apply_act=False
}


def _layer(cls, activation, seed=0):
    if activation == "identity":
        layer = cls(6, apply_act=False)
    else:
        layer = cls(6, act_layer=ACTS[activation])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(6, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(6, generator=g))
        layer.running_mean.copy_(torch.randn(6, generator=g))
        layer.running_var.copy_(torch.rand(6, generator=g) + 0.5)
    return layer


def _net(cls, activation):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        _layer(cls, activation),
        nn.Conv2d(6, 4, 1),
    ).eval()


X = torch.randn(2, 3, 5, 5)


def test_bn_kind_is_the_one_predicate(norm_act):
    class OwnForward(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    class SameForward(nn.BatchNorm2d):
        pass

    assert swap.bn_kind(norm_act(4)) == "norm_act"
    assert swap.bn_kind(nn.BatchNorm2d(4)) == swap.bn_kind(batchnorm.BatchNorm2d(4)) == "exact"
    assert swap.bn_kind(SameForward(4)) == "exact"
    assert swap.bn_kind(batchnorm.FrozenBatchNorm(4)) == "exact"
    assert swap.bn_kind(BatchNormAct2d(4)) == "exact"
    assert swap.bn_kind(OwnForward(4)) == "foreign"
    assert "own forward" in swap.foreign_reason(OwnForward(4))
    with pytest.raises(swap.ForeignLayer, match="OwnForward subclasses _BatchNorm"):
        swap.rebuild(OwnForward(4), batchnorm.BatchNorm2d)
    assert swap.bn_kind(nn.ReLU()) is None
    assert swap.bn_kind(import_torchvision().ops.FrozenBatchNorm2d(4)) == "frozen"
    assert swap.foreign_reason(norm_act(4, act_layer=nn.SiLU)) is None
    assert "act child is ELU" in swap.foreign_reason(norm_act(4, act_layer=nn.ELU))
    assert "drop child is Dropout" in swap.foreign_reason(norm_act(4, drop_layer=nn.Dropout))


class NamedLikeFrozen(nn.Module):
    """maskrcnn-benchmark's FrozenBatchNorm2d: a frozen BN by its name, but no eps (its forward
    divides by sqrt(running_var)), so not Algorithm 2's map: no pass may read it as a BN."""

    def __init__(self, n):
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0)):
            self.register_buffer(name, torch.full((n,), value))
        self.register_buffer("running_var", torch.full((n,), 2.0))

    def forward(self, x):
        scale = self.weight * self.running_var.rsqrt()
        return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]


NamedLikeFrozen.__qualname__ = "FrozenBatchNorm2d"


def test_every_pass_sees_the_bn_layers_of_the_one_predicate():
    """One predicate (swap.bn_kind, is_bn_like, is_frozen) for fold, fuse_activations,
    diagnose and monitor, over a table of layer types. Before, diagnose had its own (any
    module named like FrozenBatchNorm, which then failed on NamedLikeFrozen's missing eps),
    and fold and fuse_activations did not see torchvision's FrozenBatchNorm2d at all."""

    class OwnForward(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    table = {  # name: (layer, bn_kind, is_frozen, folded by fold in eval mode)
        "torch": (nn.BatchNorm2d(4), "exact", False, True),
        "ours": (batchnorm.BatchNorm2d(4), "exact", False, True),
        "fused": (BatchNormAct2d(4), "exact", False, True),
        "frozen": (batchnorm.FrozenBatchNorm(4), "exact", True, True),
        "torchvision": (import_torchvision().ops.FrozenBatchNorm2d(4), "frozen", True, True),
        "timm": (_timm().layers.norm_act.BatchNormAct2d(4), "norm_act", False, True),
        "foreign": (OwnForward(4), "foreign", False, False),
        "named_like_frozen": (NamedLikeFrozen(4), None, False, False),
    }
    torch.manual_seed(0)
    blocks = []
    for name, (layer, _, _, _) in table.items():
        with torch.no_grad():
            for t, low in (("weight", 0.5), ("running_var", 0.5)):
                getattr(layer, t).copy_(torch.rand(4) + low)
            for t in ("bias", "running_mean"):
                getattr(layer, t).copy_(torch.randn(4))
        blocks += [(f"conv_{name}", nn.Conv2d(4, 4, 1)), (name, layer)]
    model = nn.Sequential(OrderedDict([("conv", nn.Conv2d(3, 4, 1)), *blocks]))
    for name, (layer, kind, frozen, _) in table.items():
        assert (swap.bn_kind(layer), swap.is_frozen(layer)) == (kind, frozen), name
        assert swap.is_bn_like(layer) == (kind is not None)
    expected = {name for name, row in table.items() if row[1] is not None}

    data = [torch.randn(8, 3, 5, 5) for _ in range(3)]
    report = batchnorm.diagnose(model, data, progress=False)
    assert set(report.layers) == expected
    modes = {name: d.mode for name, d in report.layers.items()}
    assert modes["frozen"] == modes["torchvision"] == "frozen" and modes["torch"] == "batch"
    with batchnorm.monitor(model) as mon:
        model.train()(data[0])
    assert set(mon.history) == expected

    model.eval()
    x = data[0]
    out = model(x)
    folded, report = fold(model, (x,))
    assert {bn for bn, _, _ in report.folded} | {bn for bn, _ in report.skipped} == expected
    assert {bn for bn, _, _ in report.folded} == {n for n, row in table.items() if row[3]}
    torch.testing.assert_close(folded(x), out, atol=1e-5, rtol=1e-5)
    fused, report = fuse_activations(copy.deepcopy(model), (x,))
    assert {bn for bn, _, _ in report.fused} | {bn for bn, _ in report.skipped} == expected
    assert "no fused form" in dict(report.skipped)["torchvision"]


def test_fold_folds_torchvision_frozen_layers_in_training_mode_too():
    """torchvision's FrozenBatchNorm2d is Algorithm 2's map in both modes, as ours: fold merges
    it into the conv (float64 oracle: the unfolded model in float64)."""
    frozen = import_torchvision().ops.FrozenBatchNorm2d(6)
    torch.manual_seed(1)
    with torch.no_grad():
        frozen.weight.uniform_(0.5, 1.5)
        frozen.bias.normal_()
        frozen.running_mean.normal_()
        frozen.running_var.uniform_(0.5, 1.5)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), frozen, nn.ReLU()).train()
    folded, report = fold(model)
    assert report.folded == [("1", "0", "after")] and type(folded[1]) is nn.Identity
    expected = copy.deepcopy(model).double()(X.double())
    torch.testing.assert_close(folded(X).double(), expected, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="another library's frozen BN layer"):
        batchnorm.convert(copy.deepcopy(model), to="batchnorm")
    assert type(freeze(copy.deepcopy(model))[1]) is type(frozen)  # already frozen: unchanged
    assert type(unfreeze(copy.deepcopy(model))[1]) is type(frozen)  # not made by freeze


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("example", [False, True])
def test_fold_keeps_the_activation(norm_act, activation, example):
    model = _net(norm_act, activation)
    expected = model(X)
    folded, report = fold(model, (X,) if example else None)
    assert report.folded == [("1", "0", "after")] and report.skipped == []
    residue = folded[1]  # the layer's own drop and act, under their names
    if activation == "identity":
        assert type(residue) is nn.Identity
    else:
        assert [name for name, _ in residue.named_children()] == ["drop", "act"]
        assert type(residue.act) is type(model[1].act)
    torch.testing.assert_close(folded(X), expected, atol=1e-5, rtol=1e-5)


def test_fold_never_folds_it_into_the_next_layer(norm_act):
    model = nn.Sequential(_layer(norm_act, "silu"), nn.Conv2d(6, 4, 1)).eval()
    folded, report = fold(model, (torch.randn(2, 6, 5, 5),))
    assert report.folded == []
    ((name, why),) = report.skipped
    assert name == "0" and "activation SiLU lies between" in why


def test_fold_and_fuse_report_a_foreign_subclass_with_children():
    class Scaled(nn.BatchNorm2d):  # its own forward and a child: nothing to read
        def __init__(self, n):
            super().__init__(n)
            self.post = nn.Tanh()

        def forward(self, x):
            return self.post(super().forward(x))

    model = nn.Sequential(nn.Conv2d(3, 6, 1), Scaled(6), nn.ReLU()).eval()
    expected = model(X)
    for example in (None, (X,)):
        folded, report = fold(model, example)
        assert report.folded == [] and report.skipped[0][0] == "1"
        assert "own forward or child modules" in report.skipped[0][1]
        torch.testing.assert_close(folded(X), expected)
        fused, report = fuse_activations(copy.deepcopy(model), example)
        assert report.fused == [] and "own forward" in dict(report.skipped)["1"]
    with pytest.warns(UserWarning, match=r"freeze left 1 BN layer.*1: Scaled subclasses"):
        frozen = freeze(copy.deepcopy(model))
    assert type(frozen[1]) is Scaled
    with pytest.warns(UserWarning, match="convert_sync_batchnorm left 1"):
        synced = batchnorm.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert type(synced[1]) is Scaled
    for to in ("batchnorm", "torch"):
        with pytest.warns(UserWarning, match=rf"convert\(to='{to}'\) left 1 .*1: Scaled"):
            converted = batchnorm.convert(copy.deepcopy(model), to=to)
        assert type(converted[1]) is Scaled


@pytest.mark.parametrize("example", [False, True])
def test_fuse_activations_reports_it(norm_act, example):
    model = nn.Sequential(nn.Conv2d(3, 6, 1), _layer(norm_act, "silu"), nn.ReLU())
    fused, report = fuse_activations(model, (X,) if example else None)
    assert report.fused == [] and fused[1].__class__ is norm_act
    ((name, why),) = report.skipped
    assert name == "1" and "BN + activation layer" in why and "SiLU" in why


@pytest.mark.parametrize("activation", list(ACTS))
def test_freeze_keeps_the_activation_and_unfreeze_brings_the_layer_back(norm_act, activation):
    model = _net(norm_act, activation)
    layer, act = model[1], model[1].act
    expected = model(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frozen = freeze(model)
    assert type(frozen[1]) is FrozenBatchNormAct and frozen[1].activation == activation
    torch.testing.assert_close(frozen.train()(X), expected)
    back = unfreeze(frozen)[1]
    assert type(back) is norm_act and back is not layer
    assert back.act is act and back.weight is layer.weight
    assert back.running_mean.data_ptr() == layer.running_mean.data_ptr()
    torch.testing.assert_close(frozen.eval()(X), expected)


def test_freeze_leaves_an_activation_it_cannot_apply_with_a_warning(norm_act):
    model = nn.Sequential(_layer(norm_act, "relu"), norm_act(6, act_layer=nn.ELU))
    with pytest.warns(UserWarning, match=r"freeze left 1 BN layer.*1: .*act child is ELU"):
        freeze(model)
    assert type(model[0]) is FrozenBatchNormAct and type(model[1]) is norm_act


@pytest.mark.parametrize("activation", list(ACTS))
def test_convert_makes_our_fused_layer_with_the_same_activation(norm_act, activation):
    model = _net(norm_act, activation)
    expected_eval = model(X)
    reference = copy.deepcopy(model).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = batchnorm.convert(model, to="batchnorm")
    layer = converted[1]
    assert type(layer) is BatchNormAct2d and layer.activation == activation
    torch.testing.assert_close(converted(X), expected_eval)
    x = X.clone().requires_grad_(True)
    xr = X.clone().requires_grad_(True)
    y, yr = converted.train()(x), reference(xr)
    torch.testing.assert_close(y, yr)
    y.sum().backward()
    yr.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.running_var, reference[1].running_var)


@pytest.mark.parametrize("activation", list(ACTS))
def test_convert_sync_then_revert_is_a_round_trip(norm_act, activation):
    model = _net(norm_act, activation)
    layer, act = model[1], model[1].act
    expected = model(X)
    synced = batchnorm.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(synced[1]) is SyncBatchNormAct and synced[1].activation == activation
    torch.testing.assert_close(synced(X), expected)  # no process group: plain BN
    back = batchnorm.SyncBatchNorm.revert_sync_batchnorm(synced)[1]
    assert type(back) is norm_act and back.act is act and back.weight is layer.weight
    torch.testing.assert_close(model(X), expected)


def test_our_fused_layer_syncs_and_reverts_too():
    layer = BatchNormAct2d(6, activation="hardswish", momentum=0.3)
    synced = batchnorm.SyncBatchNorm.convert_sync_batchnorm(layer)
    assert type(synced) is SyncBatchNormAct and synced.activation == "hardswish"
    back = batchnorm.SyncBatchNorm.revert_sync_batchnorm(synced)
    assert type(back) is BatchNormAct2d and (back.activation, back.momentum) == ("hardswish", 0.3)


def test_timm_efficientnet_b0_through_every_pass():
    timm = _timm()
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        for example in (None, (x,)):
            folded, report = fold(model, example)
            assert len(report.folded) == 49 and report.skipped == []
            torch.testing.assert_close(
                folded(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max()
            )
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            frozen = freeze(copy.deepcopy(model))
            torch.testing.assert_close(frozen(x), expected)
            torch.testing.assert_close(unfreeze(frozen)(x), expected)
            converted = batchnorm.convert(copy.deepcopy(model))
            assert sum(type(m) is BatchNormAct2d for m in converted.modules()) == 49
            torch.testing.assert_close(converted(x), expected)
            sync = batchnorm.SyncBatchNorm
            back = sync.revert_sync_batchnorm(sync.convert_sync_batchnorm(copy.deepcopy(model)))
            torch.testing.assert_close(back(x), expected)


def test_timm_resnet18_fuses_all_8_residuals():
    timm = _timm()
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    fused, report = fuse_activations(model, (x,))
    assert len(report.residual) == 8 and len(report.fused) == 9
    for mode in (True, False):
        torch.testing.assert_close(fused.train(mode)(x), reference.train(mode)(x))
