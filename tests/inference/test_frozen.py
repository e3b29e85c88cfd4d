"""FrozenBatchNorm, freeze and unfreeze (Algorithm 2, step 3 as a layer) against the original
layer in eval mode, torch's state_dict layout, and a round trip that keeps every setting."""

from __future__ import annotations

import copy

import pytest
import torch
from bn_models import randomize_bn
from torch import nn

import batchnorm
from batchnorm import FrozenBatchNorm, freeze, unfreeze

# (BN layer, input shape): torch's and ours, every rank, a channels-last axis, no affine.
FREEZE_CASES = {
    "torch1d": (lambda: nn.BatchNorm1d(4), (6, 4)),
    "torch3d": (lambda: nn.BatchNorm3d(3), (2, 3, 2, 3, 2)),
    "ours2d": (lambda: batchnorm.BatchNorm2d(3, momentum=None), (2, 3, 4, 5)),
    "ours_axis-1": (lambda: batchnorm.BatchNorm(5, axis=-1), (2, 3, 5)),
    "no_affine": (lambda: batchnorm.BatchNorm1d(4, affine=False, eps=1e-3), (6, 4, 3)),
}


@pytest.mark.parametrize("case", sorted(FREEZE_CASES))
def test_frozen_bn_is_the_eval_map_in_both_modes(case):
    make, shape = FREEZE_CASES[case]
    bn = randomize_bn(make()).eval()
    x = torch.randn(shape)
    expected = bn(x)  # the original layer in eval mode is the oracle
    frozen = freeze(copy.deepcopy(bn))
    assert isinstance(frozen, FrozenBatchNorm)
    stats = (frozen.running_mean.clone(), frozen.running_var.clone())
    for mode in (True, False):
        torch.testing.assert_close(frozen.train(mode)(x), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(frozen.running_mean, stats[0]) and torch.equal(frozen.running_var, stats[1])
    # unfreeze returns the original class and flags, with a train-mode forward like the original
    back = unfreeze(frozen.train())
    assert type(back) is type(bn) and back.momentum == bn.momentum and back.eps == bn.eps
    assert _bn_axis_of(back) == _bn_axis_of(bn)
    ref = copy.deepcopy(bn).train()
    torch.testing.assert_close(back(x), ref(x))
    torch.testing.assert_close(back.running_var, ref.running_var)


def _bn_axis_of(m):
    return getattr(m, "_axis", 1)


@pytest.mark.parametrize("trainable", [False, True])
def test_frozen_bn_gradients_reach_gamma_beta_only_when_trainable(trainable):
    net = nn.Sequential(nn.Linear(3, 4), randomize_bn(nn.BatchNorm1d(4)))
    gamma = net[1].weight
    freeze(net, trainable_affine=trainable).train()
    x = torch.randn(5, 3, requires_grad=True)
    net(x).square().sum().backward()
    assert x.grad is not None and net[0].weight.grad is not None
    names = {n for n, _ in net.named_parameters()}
    assert ({"1.weight", "1.bias"} <= names) == trainable
    if trainable:
        assert net[1].weight is gamma  # an optimizer holding gamma keeps training it
        assert net[1].weight.grad is not None and net[1].bias.grad is not None
    else:
        assert net[1].weight.grad is None and not net[1].weight.requires_grad


@pytest.mark.parametrize("trainable", [False, True])
def test_frozen_state_dict_keys_match_batchnorm_and_load_both_ways(trainable):
    bn = randomize_bn(nn.BatchNorm2d(3))
    bn.num_batches_tracked.fill_(7)
    frozen = FrozenBatchNorm(3, trainable_affine=trainable)
    assert list(frozen.state_dict()) == list(bn.state_dict())
    frozen.load_state_dict(bn.state_dict())  # torch BN checkpoint -> frozen
    for k, v in bn.state_dict().items():
        assert torch.equal(frozen.state_dict()[k], v)
    other = batchnorm.BatchNorm2d(3)
    other.load_state_dict(frozen.state_dict())  # frozen checkpoint -> our BN
    for k, v in bn.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)
    # A torchvision FrozenBatchNorm2d checkpoint has no num_batches_tracked.
    tv = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    FrozenBatchNorm(3).load_state_dict(tv)


def test_freeze_covers_a_whole_model_and_unfreeze_restores_it():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=0.01),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),
        batchnorm.BatchNorm2d(4, backward="paper"),
        nn.BatchNorm2d(4, track_running_stats=False),  # nothing to freeze: left alone
    )
    randomize_bn(model).eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    frozen = freeze(copy.deepcopy(model)).train()
    assert [type(m).__name__ for m in frozen][1::3] == ["FrozenBatchNorm", "FrozenBatchNorm"]
    assert type(frozen[5]) is nn.BatchNorm2d
    frozen[5].eval()
    torch.testing.assert_close(frozen(x), expected)
    back = unfreeze(frozen)
    assert [type(m) for m in back] == [type(m) for m in model]
    assert back[1].momentum == 0.01 and back[4].backward == "paper"
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


# Layers whose every setting must survive freeze -> unfreeze (defect 3 and 7), with an input.
ROUND_TRIP = {
    "ghost": (lambda: batchnorm.BatchNorm2d(4, virtual_batch_size=2, momentum=0.3), (4, 4, 3, 3)),
    "renorm": (lambda: batchnorm.BatchRenorm2d(4, r_max=1.5, d_max=0.5), (4, 4, 3, 3)),
    "paper_axis": (lambda: batchnorm.BatchNorm(4, axis=-1, backward="paper"), (6, 2, 4)),
    "ours_no_beta": (lambda: batchnorm.BatchNorm1d(4, bias=False, eps=1e-3), (6, 4)),
    "torch_no_beta": (lambda: nn.BatchNorm2d(4, bias=False, momentum=None), (4, 4, 3, 3)),
    "sync": (lambda: batchnorm.SyncBatchNorm(4, momentum=0.2, timeout=5.0), (4, 4, 3)),
}


def _settings(m):
    """Every constructor setting, read from the attributes (not from the swap utility)."""
    names = ("eps", "momentum", "affine", "track_running_stats", "backward", "_axis")
    names += ("virtual_batch_size", "r_max", "d_max", "process_group", "timeout")
    return {n: getattr(m, n, None) for n in names} | {"beta": m.bias is not None}


@pytest.mark.parametrize("case", sorted(ROUND_TRIP))
def test_unfreeze_of_freeze_keeps_every_setting(case):
    """Defect 3: unfreeze(freeze(m)) dropped virtual_batch_size and reset Batch Renorm's
    r_max=1.5, d_max=0.5 to 3.0/5.0; defect 7: freeze crashed on bias=False layers."""
    make, shape = ROUND_TRIP[case]
    bn = randomize_bn(make()).eval()
    x = torch.randn(shape)
    expected = bn(x)
    frozen = freeze(copy.deepcopy(bn))
    assert isinstance(frozen, FrozenBatchNorm)
    torch.testing.assert_close(frozen.train()(x), expected)
    back = unfreeze(frozen)
    assert type(back) is type(bn)
    assert _settings(back) == _settings(bn)
    if isinstance(bn, batchnorm.BatchRenorm2d):
        assert (back.r_max, back.d_max) == (1.5, 0.5)
    # The same training step as the original layer: output and running statistics.
    ref = copy.deepcopy(bn).train()
    torch.testing.assert_close(back(x), ref(x))
    torch.testing.assert_close(back.running_var, ref.running_var)


@pytest.mark.parametrize(
    "make",
    [lambda: nn.BatchNorm2d(3, bias=False), lambda: batchnorm.BatchNorm2d(3, bias=False)],
    ids=["torch", "ours"],
)
def test_freeze_keeps_a_layer_without_beta(make):
    """Defect 7: freeze crashed on bias=False layers (torch's and ours)."""
    net = randomize_bn(nn.Sequential(nn.Conv2d(2, 3, 1), make())).eval()
    x = torch.randn(2, 2, 4, 4)
    expected = net(x)
    freeze(net, trainable_affine=True)
    assert net[1].bias is None and "1.bias" not in net.state_dict()
    torch.testing.assert_close(net.train()(x), expected)
    assert "bias=False" in repr(net[1])


def test_freeze_keeps_a_shared_layer_shared():
    """Defect 10: in nn.Sequential(bn, bn) only the first entry was frozen."""
    bn = nn.BatchNorm1d(3)
    net = nn.Sequential(bn, nn.ReLU(), bn)
    outer = nn.Sequential(net, bn)
    freeze(outer)
    assert isinstance(net[0], FrozenBatchNorm)
    assert net[2] is net[0] and outer[1] is net[0]
    unfreeze(outer)
    assert type(net[0]) is nn.BatchNorm1d and net[2] is net[0] and outer[1] is net[0]


def test_an_optimizer_keeps_training_gamma_after_freeze_and_unfreeze():
    """freeze (gamma and beta as buffers) then unfreeze gives back the same Parameter
    objects, so an optimizer built before freezing trains them again."""
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    gamma, beta = net[1].weight, net[1].bias
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    freeze(net)
    assert "1.weight" not in dict(net.named_parameters())
    unfreeze(net)
    assert net[1].weight is gamma and net[1].bias is beta
    before = gamma.detach().clone()
    net(torch.randn(8, 3)).square().sum().backward()
    opt.step()
    assert not torch.equal(net[1].weight.detach(), before)


def test_frozen_bn_checks_its_input_as_the_layers_do():
    # One input check for every layer (functional.check_input): before issue 18 the frozen
    # layer had its own, which normalized an integer tensor without a word and named no axis
    # range; now the same errors as BatchNorm2d's, naming the layer.
    frozen, bn = FrozenBatchNorm(3), batchnorm.BatchNorm2d(3)
    for x, error, match in [
        (torch.ones(4, 3, dtype=torch.long), TypeError, "expected a floating-point input"),
        (torch.randn(3), ValueError, "at least 2 dimensions"),
        (torch.randn(4, 5), ValueError, r"\(3\) expected 3 channels on axis 1, got 5"),
    ]:
        with pytest.raises(error, match="FrozenBatchNorm.*" + match):
            frozen(x)
    with pytest.raises(ValueError, match="channel axis 3"):
        FrozenBatchNorm(3, axis=3)(torch.randn(4, 3))
    with pytest.raises(TypeError, match="BatchNorm2d expected a floating-point input"):
        bn(torch.ones(2, 3, 2, 2, dtype=torch.long))
