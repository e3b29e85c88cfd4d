"""convert (torch.nn <-> ours) and SyncBatchNorm's convert/revert: outputs, state and every
setting carried over, or a refusal that names the setting and leaves the model unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from bn_models import randomize_bn
from torch import nn

import batchnorm
from batchnorm import SyncBatchNorm, convert


def torch_model():
    return nn.Sequential(
        nn.Conv3d(2, 3, 1),
        nn.BatchNorm3d(3),
        nn.Flatten(2),
        nn.BatchNorm1d(3, momentum=None, eps=1e-3),
        nn.Unflatten(2, (2, 4)),
        nn.BatchNorm2d(3, affine=False),
    )


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_round_trip_keeps_outputs_and_state(mode):
    torch.manual_seed(0)
    reference = randomize_bn(torch_model()).train(mode == "train")
    ours = convert(copy.deepcopy(reference), to="batchnorm")
    assert [type(m).__module__ for m in ours][1::2] == ["batchnorm.modules"] * 3
    assert ours[3].momentum is None and ours[3].eps == 1e-3 and not ours[5].affine
    assert [m.training for m in ours.modules()] == [m.training for m in reference.modules()]
    for _ in range(2):  # two steps: the running statistics must evolve identically
        x = torch.randn(4, 2, 2, 2, 2)
        torch.testing.assert_close(ours(x), reference(x))
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)
    back = convert(ours, to="torch")
    assert [type(m) for m in back] == [type(m) for m in reference]
    x = torch.randn(4, 2, 2, 2, 2)
    torch.testing.assert_close(back(x), reference(x))


def test_convert_keeps_parameter_objects_and_dtype():
    bn = nn.BatchNorm1d(3, dtype=torch.float64)
    weight = bn.weight
    ours = convert(bn)
    assert type(ours) is batchnorm.BatchNorm1d and ours.weight is weight
    assert ours.running_mean.dtype == torch.float64
    with pytest.raises(ValueError, match="to must be"):
        convert(bn, to="keras")


def test_convert_sync_batchnorm_when_ours_exists():
    distributed = pytest.importorskip("batchnorm.distributed")
    model = convert(nn.Sequential(nn.SyncBatchNorm(3, momentum=0.2)))
    assert type(model[0]) is distributed.SyncBatchNorm and model[0].momentum == 0.2
    assert type(convert(model, to="torch")[0]) is nn.SyncBatchNorm


@pytest.mark.parametrize(
    "layer, match",
    [
        (batchnorm.BatchNorm2d(4, virtual_batch_size=2), r"Ghost BN \(virtual_batch_size=2\)"),
        (batchnorm.BatchRenorm2d(4, r_max=1.5, d_max=0.5), "Batch Renormalization"),
        (batchnorm.BatchNorm(4, axis=-1), "channel axis"),
    ],
    ids=["ghost", "renorm", "any_axis"],
)
def test_convert_to_torch_refuses_what_torch_cannot_express(layer, match):
    """Defect 3: convert(m, to="torch") silently dropped Ghost BN (and left Renorm alone)."""
    first = nn.BatchNorm2d(4)
    model = nn.Sequential(convert(first), nn.ReLU(), layer)
    with pytest.raises(ValueError, match=match):
        convert(model, to="torch")
    assert model[0] is not first and type(model[0]) is batchnorm.BatchNorm2d  # nothing changed
    assert model[2] is layer


def test_convert_keeps_a_shared_layer_shared():
    """Defect 10: in nn.Sequential(bn, bn) only the first entry was converted."""
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn, bn)
    convert(model)
    assert type(model[0]) is batchnorm.BatchNorm2d and model[1] is model[0]
    assert model[0].weight is bn.weight
    convert(model, to="torch")
    assert type(model[0]) is nn.BatchNorm2d and model[1] is model[0]


def test_convert_drops_only_the_backward_choice_and_the_timeout():
    sync = batchnorm.SyncBatchNorm(3, momentum=0.2, backward="paper", timeout=3.0)
    back = convert(nn.Sequential(sync), to="torch")[0]
    assert type(back) is nn.SyncBatchNorm and back.momentum == 0.2


def test_convert_keeps_bias_false():
    bn = nn.BatchNorm1d(3, bias=False)
    ours = convert(bn)
    assert type(ours) is batchnorm.BatchNorm1d and ours.bias is None and ours.weight is bn.weight


# --- SyncBatchNorm.convert_sync_batchnorm / revert_sync_batchnorm ---------------------------


def test_convert_sync_keeps_a_shared_layer_shared_and_reverts():
    """Defect 10 for convert_sync_batchnorm, which also skipped the repeated entry."""
    bn = batchnorm.BatchNorm2d(3, momentum=0.05, backward="paper")
    model = nn.Sequential(bn, nn.ReLU(), bn)
    SyncBatchNorm.convert_sync_batchnorm(model, timeout=2.0)
    assert type(model[0]) is SyncBatchNorm and model[2] is model[0]
    assert model[0].timeout == 2.0 and model[0].backward == "paper"
    SyncBatchNorm.revert_sync_batchnorm(model)
    assert type(model[0]) is batchnorm.BatchNorm2d and model[2] is model[0]
    assert model[0].momentum == 0.05 and model[0].backward == "paper"
    assert model[0].weight is bn.weight and model[0].running_var is bn.running_var


def test_convert_sync_refuses_a_layer_without_beta_and_changes_nothing():
    keep = nn.BatchNorm2d(3)
    model = nn.Sequential(keep, batchnorm.BatchNorm2d(3, bias=False))
    with pytest.raises(ValueError, match=r"gamma without beta \(bias=False\)"):
        SyncBatchNorm.convert_sync_batchnorm(model)
    assert model[0] is keep


def test_freeze_of_a_converted_layer_unwinds_to_the_original():
    """Each swap remembers the one before: unfreeze gives the SyncBatchNorm back, and
    revert_sync_batchnorm then the torch layer it was converted from."""
    bn = nn.BatchNorm1d(4, momentum=0.3)
    model = SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(bn))
    batchnorm.freeze(model)
    batchnorm.unfreeze(model)
    assert type(model[0]) is SyncBatchNorm
    SyncBatchNorm.revert_sync_batchnorm(model)
    assert type(model[0]) is nn.BatchNorm1d and model[0].momentum == 0.3
    assert model[0].weight is bn.weight
