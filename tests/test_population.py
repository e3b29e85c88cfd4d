"""Algorithm 2's inference side (batchnorm.population) against independent computations:
float64 statistics of the concatenated data, an unfolded forward pass, torch's own layers,
onnxruntime."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import FrozenBatchNorm, convert, fold, freeze, recalibrate, unfreeze

SPLITS = [(12, 12, 12), (7, 13, 5, 11), (36,)]  # the same 36 samples, even and uneven


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and gamma/beta, so no check passes by identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm)):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g))
                    m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(c, generator=g))
                    m.bias.copy_(torch.randn(c, generator=g))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# --------------------------------------------------------------------------------------------
# recalibrate
# --------------------------------------------------------------------------------------------


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


def bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


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


# --------------------------------------------------------------------------------------------
# freeze / unfreeze
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# fold
# --------------------------------------------------------------------------------------------


def figure1_mlp():
    """Sec. 4.1's network: 3 x (Linear -> BN -> sigmoid), Linear; no bias before BN."""
    layers, width = [], 784
    for _ in range(3):
        layers += [nn.Linear(width, 100, bias=False), batchnorm.BatchNorm1d(100), nn.Sigmoid()]
        width = 100
    return nn.Sequential(*layers, nn.Linear(100, 10))


class Block(nn.Module):
    """ResNet basic block: conv-bn-relu, conv-bn, + identity or a 1x1 conv-bn downsample."""

    def __init__(self, cin, cout, stride, bn=batchnorm.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


def small_resnet(bn=batchnorm.BatchNorm2d):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        bn(8),
        nn.ReLU(),
        Block(8, 8, 1, bn),
        Block(8, 16, 2, bn),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


class SharedUse(nn.Module):
    """Layouts that cannot be folded: a conv output used twice, a BN called twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn_a = nn.BatchNorm2d(3)
        self.bn_b = batchnorm.BatchNorm2d(3)

    def forward(self, x):
        h = self.conv(x)
        return self.bn_a(h) + h + self.bn_b(self.bn_b(x))


class Aliased(nn.Module):
    """One BN registered under two names and called after two convs: folding it is wrong."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.other = self.bn

    def forward(self, x):
        return self.bn(self.conv1(x)) + self.other(self.conv2(x))


class Tokens(nn.Module):
    """Linear on (N, L, C) tokens followed by a channels-last BN: needs the rank to fold."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.bn = batchnorm.BatchNorm(4, axis=-1)

    def forward(self, x):
        return self.bn(self.fc(x))


def bn_inception():
    """Sec. 4.2's BN-Inception (Figure 5), narrowed to 1/8 width with the 32x32 stem."""
    inception = pytest.importorskip("batchnorm.reproduce.models.inception")
    return inception.build_inception("bn_inception", width=0.125, small_stem_stride=2)


# name: (builder, input shape, number folded, number skipped)
FOLD_CASES = {
    "bn_inception": (bn_inception, (1, 3, 16, 16), 69, 0),
    "figure1_mlp": (figure1_mlp, (8, 784), 3, 0),
    "resnet_ours": (small_resnet, (2, 3, 8, 8), 6, 0),
    "resnet_torch": (lambda: small_resnet(nn.BatchNorm2d), (2, 3, 8, 8), 6, 0),
    "grouped_depthwise": (
        lambda: nn.Sequential(
            nn.Conv2d(4, 6, 3, groups=2),
            batchnorm.BatchNorm2d(6),
            nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False),
            nn.BatchNorm2d(6),
        ),
        (2, 4, 7, 7),
        2,
        0,
    ),
    "conv1d_conv3d": (
        lambda: (
            nn.Sequential(
                nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.Flatten(1), nn.Unflatten(1, (4, 1, 1, 5))
            )
            .append(nn.Conv3d(4, 2, 1, bias=False))
            .append(batchnorm.BatchNorm3d(2))
        ),
        (2, 3, 7),
        2,
        0,
    ),
    "conv_transpose": (
        lambda: nn.Sequential(
            nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=False),
            batchnorm.BatchNorm2d(6),
            nn.ReLU(),
            nn.ConvTranspose2d(6, 3, 2, padding=1),
            nn.BatchNorm2d(3),
        ),
        (2, 4, 5, 5),
        2,
        0,
    ),
    "bn_before_linear_and_convs": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 1),
            nn.ReLU(),
            batchnorm.BatchNorm2d(4),  # -> grouped conv without padding: folds before
            nn.Conv2d(4, 6, 3, groups=2),
            nn.ReLU(),
            nn.BatchNorm2d(6),  # -> reflect padding: every padded value is a BN output
            nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect"),
            nn.Tanh(),
            nn.BatchNorm2d(6),  # -> zero padding: not exact, reported
            nn.Conv2d(6, 2, 3, padding=1),
            nn.Flatten(),
            nn.ReLU(),
            batchnorm.BatchNorm1d(2 * 3 * 3),  # -> Linear: folds before
            nn.Linear(18, 3),
        ),
        (4, 3, 5, 5),
        3,
        1,
    ),
    "unfoldable": (SharedUse, (2, 3, 4, 4), 0, 2),
    "aliased_bn": (Aliased, (2, 3, 4, 4), 0, 1),
    "frozen_and_train_mode": (
        lambda: nn.Sequential(
            nn.Linear(5, 4),
            FrozenBatchNorm(4),  # frozen: folds whatever the mode
            nn.ReLU(),
            nn.Linear(4, 4),
            nn.BatchNorm1d(4, track_running_stats=False),  # batch statistics: reported
        ),
        (6, 5),
        1,
        1,
    ),
}


@pytest.mark.parametrize("case", sorted(FOLD_CASES))
def test_fold_matches_the_unfolded_model(case):
    make, shape, n_folded, n_skipped = FOLD_CASES[case]
    torch.manual_seed(0)
    model = randomize_bn(make()).eval()
    x = torch.randn(shape)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = model(x)
        folded, report = fold(model)
        got = folded(x)
    assert rel_err(got, expected) < 1e-5, report
    assert (len(report.folded), len(report.skipped)) == (n_folded, n_skipped), str(report)
    assert report.traced
    left = [n for n, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    left += [n for n, m in folded.named_modules() if isinstance(m, FrozenBatchNorm)]
    assert sorted(left) == sorted(bn for bn, _ in report.skipped)
    # The input model is untouched.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert type(folded) is type(model)


def test_fold_reports_why():
    model = randomize_bn(FOLD_CASES["bn_before_linear_and_convs"][0]()).eval()
    _, report = fold(model)
    assert [(bn, layer, where) for bn, layer, where in report.folded] == [
        ("2", "3", "before"),
        ("5", "6", "before"),
        ("12", "13", "before"),
    ]
    assert report.skipped[0][0] == "8" and "pads with zeros" in report.skipped[0][1]
    _, report = fold(SharedUse().eval())
    reasons = dict(report.skipped)
    assert "only user" in reasons["bn_a"] and "more than once" in reasons["bn_b"]
    _, report = fold(figure1_mlp().train())
    assert len(report.skipped) == 3 and "training mode" in report.skipped[0][1]


def test_fold_uses_shapes_from_example_inputs():
    model = randomize_bn(Tokens()).eval()
    x = torch.randn(2, 3, 6)
    folded, report = fold(model, example_inputs=(x,))
    assert report.folded == [("bn", "fc", "after")]
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)
    # Linear on (N, C, L) is over L, while BatchNorm1d normalizes C: not foldable, and the
    # example input is what reveals it.
    wrong = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    _, report = fold(wrong, example_inputs=(torch.randn(2, 4, 4),))
    assert report.folded == [] and "feature axis" in report.skipped[0][1]


def test_fold_falls_back_to_sequential_pairs_when_fx_cannot_trace():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow defeats symbolic tracing
                return self.body(x)
            return -self.body(x)

    model = randomize_bn(Branchy()).eval()
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold(model)
    assert not report.traced and report.folded == [("body.1", "body.0", "after")]
    assert rel_err(folded(x), model(x)) < 1e-5


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------

EXPORT_CASES = {"unfolded": lambda m: m, "folded": lambda m: fold(m)[0], "frozen": freeze}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_torch_export_matches_eager(case):
    torch.manual_seed(0)
    model = EXPORT_CASES[case](randomize_bn(small_resnet()).eval())
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["unfolded", "folded"])
def test_onnx_export_runs_in_onnxruntime(case):
    pytest.importorskip("onnxscript", reason="torch.onnx.export (dynamo) needs onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = EXPORT_CASES[case](randomize_bn(small_resnet()).eval())
    x = torch.randn(2, 3, 8, 8)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert rel_err(torch.from_numpy(got), expected) < 1e-5


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
