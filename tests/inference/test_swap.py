"""The one swap utility (batchnorm.swap): every layer class rebuilds itself from the
settings it reports, tensors are shared, shared modules stay shared, refusals name the
setting and change nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from bn_models import randomize_bn
from torch import nn

import batchnorm
from batchnorm import FrozenBatchNorm
from batchnorm.swap import layer_settings, rebuild, restore, swap_modules

# Every BN class, with settings away from the defaults wherever the class takes them.
LAYERS = {
    "torch1d": lambda: nn.BatchNorm1d(4, eps=1e-3, momentum=None, bias=False),
    "torch_sync": lambda: nn.SyncBatchNorm(4, momentum=0.2, track_running_stats=False),
    "ours2d": lambda: batchnorm.BatchNorm2d(4, momentum=0.3, backward="paper"),
    "ours_ghost": lambda: batchnorm.BatchNorm3d(4, virtual_batch_size=2, affine=False),
    "ours_axis": lambda: batchnorm.BatchNorm(4, axis=-1, bias=False),
    "renorm": lambda: batchnorm.BatchRenorm1d(4, r_max=1.5, d_max=0.5, momentum=0.05),
    "sync": lambda: batchnorm.SyncBatchNorm(4, eps=1e-4, timeout=7.0, backward="paper"),
    "frozen": lambda: FrozenBatchNorm(4, eps=1e-3, bias=False, axis=-1, trainable_affine=True),
}


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_every_class_rebuilds_itself_from_the_settings_it_reports(case):
    layer = randomize_bn(LAYERS[case]())
    settings = layer_settings(layer)
    copy_ = rebuild(layer, type(layer))
    assert layer_settings(copy_) == settings
    assert repr(copy_) == repr(layer)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(copy_, name) is getattr(layer, name), name  # the same objects


def test_torch_settings_are_read_from_its_constructor_attributes():
    bn = nn.SyncBatchNorm(5, eps=1e-2, momentum=0.7, affine=False, process_group=None)
    assert layer_settings(bn) == {
        "eps": 1e-2,
        "momentum": 0.7,
        "affine": False,
        "track_running_stats": True,
        "bias": True,
        "process_group": None,
    }
    with pytest.raises(TypeError, match="expected a BN layer, got Linear"):
        layer_settings(nn.Linear(2, 2))


def test_rebuild_keeps_mode_dtype_requires_grad_and_the_optimizer():
    bn = nn.BatchNorm2d(3, dtype=torch.float64).eval()
    bn.bias.requires_grad_(False)
    opt = torch.optim.SGD(bn.parameters(), lr=0.5)
    new = rebuild(bn, batchnorm.BatchNorm2d)
    assert not new.training and new.running_var.dtype == torch.float64
    assert new.weight.requires_grad and not new.bias.requires_grad
    assert new.num_batches_skipped.device == new.weight.device
    before = new.weight.detach().clone()
    new.train()(torch.randn(4, 3, 2, 2, dtype=torch.float64)).sum().backward()
    new.weight.grad = torch.ones_like(new.weight)
    opt.step()  # the optimizer built on the old layer updates the new one
    assert torch.equal(new.weight.detach(), before - 0.5)


@pytest.mark.parametrize(
    "layer, target, match",
    [
        (batchnorm.BatchNorm2d(4, virtual_batch_size=2), nn.BatchNorm2d, "Ghost BN"),
        (batchnorm.BatchRenorm2d(4), nn.BatchNorm2d, r"Batch Renormalization \(r_max=3.0"),
        (batchnorm.BatchNorm(4, axis=-1), nn.BatchNorm1d, "channel axis other than 1"),
        (batchnorm.BatchNorm1d(4, backward="paper"), nn.BatchNorm1d, "paper's backward"),
        (nn.BatchNorm2d(4, bias=False), batchnorm.SyncBatchNorm, "gamma without beta"),
        (nn.BatchNorm2d(4), batchnorm.BatchRenorm2d, None),  # accepted: becomes Renorm
    ],
)
def test_rebuild_refuses_what_the_target_cannot_express(layer, target, match):
    if match is None:
        assert type(rebuild(layer, target)) is target
        return
    with pytest.raises(ValueError, match=f"cannot rebuild .* as {target.__name__}: .*{match}"):
        rebuild(layer, target)


def test_rebuild_reports_a_constructor_refusal_and_missing_state():
    with pytest.raises(ValueError, match="momentum"):  # Batch Renorm needs a momentum
        rebuild(nn.BatchNorm2d(4, momentum=None), batchnorm.BatchRenorm2d)
    # Without running statistics there is nothing for FrozenBatchNorm's buffers to share.
    with pytest.raises(ValueError, match="running_mean is absent"):
        rebuild(
            nn.BatchNorm2d(4, track_running_stats=False),
            FrozenBatchNorm,
            drop={"momentum", "track_running_stats"},
        )


def test_swap_modules_replaces_every_place_of_a_shared_module_or_none():
    bn, other = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    inner = nn.Sequential(bn, bn)
    model = nn.Sequential(inner, nn.ModuleDict({"a": bn, "b": other}), inner)
    model.add_module("alias", bn)
    swap_modules(model, lambda m: nn.Identity() if m is bn else None)
    new = inner[0]
    assert isinstance(new, nn.Identity)
    assert inner[1] is new and model[1]["a"] is new and model.alias is new
    assert model[1]["b"] is other

    def refuse_other(m):
        if m is other:
            raise ValueError("no")
        return nn.Identity() if isinstance(m, nn.ReLU) else None

    net = nn.Sequential(nn.ReLU(), other)
    relu = net[0]
    with pytest.raises(ValueError):
        swap_modules(net, refuse_other)
    assert net[0] is relu  # computed before any replacement: nothing changed
    assert isinstance(swap_modules(other, lambda m: nn.Identity()), nn.Identity)  # the root


def test_restore_undoes_a_remembered_rebuild_only():
    bn = randomize_bn(batchnorm.BatchRenorm2d(3, r_max=2.0, d_max=1.0))
    frozen = rebuild(
        bn,
        FrozenBatchNorm,
        remember=True,
        drop={
            "momentum",
            "track_running_stats",
            "r_max",
            "d_max",
            "backward",
            "virtual_batch_size",
        },
    )
    assert frozen.weight is not bn.weight and frozen.weight.data_ptr() == bn.weight.data_ptr()
    back = restore(frozen)
    assert type(back) is batchnorm.BatchRenorm2d and (back.r_max, back.d_max) == (2.0, 1.0)
    assert back.weight is bn.weight and not hasattr(back, "_origin")
    assert restore(back) is None
    state = copy.deepcopy(bn.state_dict())
    for key, value in back.state_dict().items():
        assert torch.equal(value, state[key])


def test_every_setting_of_every_layer_has_a_row_in_the_one_settings_table():
    """Issue 18, step 4: swap.SETTINGS is the one table of settings (plain value, meaning,
    training-only, dropped for torch). Every constructor keyword our layers report either has
    a row there or carries over as it is (eps, affine, the activation, trainable_affine), and
    a frozen layer can take every setting of a trainable one that is not training-only."""
    from batchnorm.fused import BatchNormAct2d, FrozenBatchNormAct, SyncBatchNormAct
    from batchnorm.swap import SETTINGS, TORCH_DROPS, TRAINING_ONLY

    carried = {"eps", "affine", "activation", "negative_slope", "trainable_affine"}
    trainable = [
        batchnorm.BatchNorm1d, batchnorm.BatchNorm2d, batchnorm.BatchNorm3d, batchnorm.BatchNorm,
        batchnorm.BatchRenorm2d, batchnorm.SyncBatchNorm, BatchNormAct2d, SyncBatchNormAct,
    ]  # fmt: skip
    frozen = {FrozenBatchNorm: None, FrozenBatchNormAct: None}
    for cls in [*trainable, *frozen]:
        keys = set(layer_settings(cls(2, device="meta")))
        assert keys - set(SETTINGS) <= carried, cls.__name__
        if cls in frozen:
            frozen[cls] = keys
    for cls in trainable:
        keys = set(layer_settings(cls(2, device="meta")))
        target = FrozenBatchNormAct if "activation" in keys else FrozenBatchNorm
        lost = keys - frozen[target] - TRAINING_ONLY
        assert lost == set(), (cls.__name__, lost)
    # The views the passes read are the table's: the three lists the library kept before.
    assert TORCH_DROPS == {"backward", "timeout", "backend"}
    assert {"momentum", "r_max", "virtual_batch_size", "memory_saving"} <= TRAINING_ONLY
    assert not TRAINING_ONLY & ({"axis", "bias"} | carried)
