"""Real torchvision/timm models through convert, recalibrate, freeze, fold, fuse, diagnose, export.

The models of `realmodels.MODELS` (random init, random gamma/beta and training-like running
statistics, see `realmodels.build`), float32, inputs of (2, 3, 32, 32), one torch thread.
Every check runs over every model; the oracles are torch's own BN layers, a float64 copy of
the model, and torch's cumulative running average (``momentum=None``, what
``torch.optim.swa_utils.update_bn`` computes). Cases that fail because of a defect of issue 15
still open are marked ``xfail(strict=True)`` with the item, so they turn red when it is fixed.
"""

import copy
import functools

import pytest
import torch
from realmodels import MODELS, bn_layers, build

import batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")

TIMM_BN_ACT = ("timm_efficientnet_b0", "timm_mobilenetv3_small_100", "timm_regnetx_002")
PLAIN_BN = [n for n in MODELS if n not in TIMM_BN_ACT and n != "timm_convnext_atto"]

ITEM3_CONVERT = "issue 15 item 3: convert leaves timm's BatchNormAct2d alone, without a word"
ITEM3_FREEZE = (
    "issue 15 item 3: freeze drops timm BatchNormAct2d's activation, unfreeze rebuilds it with ReLU"
)
ITEM3_FOLD_FX = (
    "issue 15 item 3: fold without example_inputs replaces timm's BatchNormAct2d by Identity "
    "(its activation deleted) and reports it folded"
)
ITEM3_REPORT = (
    "issue 15 item 3: with example_inputs, fold and fuse_activations leave timm's "
    "BatchNormAct2d out of the report"
)
ITEM4 = "issue 15 item 4: fuse_activations fuses ReLU/LeakyReLU only, not SiLU/Hardswish"
ITEM5 = "issue 15 item 5: residual fusion refused when the shortcut comes from a fused block"

# (model, check) -> the open defect it runs into.
KNOWN = {(n, "convert"): ITEM3_CONVERT for n in TIMM_BN_ACT}
KNOWN |= {(n, "freeze"): ITEM3_FREEZE for n in TIMM_BN_ACT}
KNOWN |= {(n, "fold_fx"): ITEM3_FOLD_FX for n in TIMM_BN_ACT}
KNOWN |= {(n, "fold"): ITEM3_REPORT for n in TIMM_BN_ACT}
KNOWN |= {(n, "fuse"): ITEM3_REPORT for n in TIMM_BN_ACT}
KNOWN |= {("tv_efficientnet_b0", "fuse"): ITEM4, ("tv_mobilenet_v3_small", "fuse"): ITEM4}
KNOWN |= {(n, "fuse"): ITEM5 for n in ("timm_resnet18", "timm_resnet26d", "tv_regnet_y_400mf")}

# BN layers `fold` merges into a neighbour. All but DenseNet's: its norm1 reads the
# concatenated features and feeds a ReLU (no linear layer on either side).
FOLDED = {n: None for n in MODELS} | {"tv_densenet121": 59}
# (plain BN -> activation, BN + add -> activation) pairs `fuse_activations` fuses, counted from
# the architectures: a BN followed by its own activation module (ReLU, SiLU, Hardswish), and
# a residual block's last BN whose sum feeds an activation module called only there.
# torchvision's ResNets call one ReLU module three times per block, so only the stem's fuses;
# EfficientNet's and MobileNetV3's projection BNs and ShuffleNet's branch ends have none.
FUSED = {
    "tv_resnet18": (1, 0),
    "tv_resnet50": (1, 0),
    "tv_mobilenet_v3_small": (23, 0),
    "tv_efficientnet_b0": (33, 0),
    "tv_densenet121": (120, 0),
    "tv_regnet_y_400mf": (33, 16),
    "tv_shufflenet_v2_x0_5": (37, 0),
    "timm_resnet18": (9, 8),
    "timm_resnet26d": (19, 8),
    "timm_convnext_atto": (0, 0),
}


def cases(check, names=MODELS):
    """pytest parameters for ``check`` over ``names``, the known-defect ones marked xfail."""
    params = []
    for name in names:
        reason = KNOWN.get((name, check))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@functools.cache
def _built(name):
    return build(name)


def model(name):
    """A fresh copy of the prepared model (building it once per session)."""
    return copy.deepcopy(_built(name))


def inputs(seed=1, n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    """max |a - b| / max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def float64_error(net, x, out):
    """(error of ``out`` against a float64 copy of ``net``, error of ``net`` itself in float32).

    Folding and freezing change the arithmetic (x * scale + shift instead of (x - mean) /
    sqrt(var + eps) * gamma + beta), and a deep random-init net amplifies float32 rounding
    (its own float32 output is up to ~4e-5 off float64 here), so a fixed tolerance against
    the float32 output would be either loose or flaky: they are checked against float64.
    """
    with torch.no_grad():
        exact = copy.deepcopy(net).double()(x.double())
        return rel_err(out, exact), rel_err(net(x), exact)


def assert_as_exact_as_float32(net, x, out):
    """``out`` is no further from the float64 model than 4x the float32 model is (measured
    worst 2.1x, tv_efficientnet_b0 folded), plus 1e-6 for models whose float32 error is 0."""
    err, err32 = float64_error(net, x, out)
    assert err <= 4 * err32 + 1e-6, f"error {err:.2e} against float64, float32 model {err32:.2e}"


def ours(m):
    return type(m).__module__.startswith("batchnorm.")


@pytest.mark.parametrize("name", cases("convert"))
def test_convert_round_trip(name):
    """convert(to="batchnorm") turns every BN layer into ours with identical outputs in eval
    and training mode (running statistics included); convert(to="torch") brings back the
    original classes and the very same state_dict."""
    torch_net, net = model(name), model(name)
    before = {k: v.clone() for k, v in torch_net.state_dict().items()}
    classes = {n: type(m) for n, m in torch_net.named_modules()}
    batchnorm.convert(net, to="batchnorm")
    assert [n for n, m in bn_layers(net) if not ours(m)] == []
    assert len(bn_layers(net)) == len(bn_layers(torch_net))

    x = inputs()
    with torch.no_grad():
        assert torch.equal(net(x), torch_net(x))
        torch_net.train(), net.train()
        torch.manual_seed(0)  # stochastic depth and dropout draw the same in both
        expected = torch_net(x)
        torch.manual_seed(0)
        got = net(x)
    assert rel_err(got, expected) < 1e-5
    for (n, a), (_, b) in zip(bn_layers(net), bn_layers(torch_net)):
        torch.testing.assert_close(a.running_mean, b.running_mean, msg=n)
        torch.testing.assert_close(a.running_var, b.running_var, msg=n)
        assert torch.equal(a.num_batches_tracked, b.num_batches_tracked), n

    back = batchnorm.convert(model(name), to="batchnorm")
    batchnorm.convert(back, to="torch")
    assert {n: type(m) for n, m in back.named_modules()} == classes
    state = back.state_dict()
    assert state.keys() == before.keys()
    assert all(torch.equal(state[k], v) for k, v in before.items())


@pytest.mark.parametrize("name", cases("isinstance", PLAIN_BN))
def test_converted_layers_are_instances_of_torch_classes(name):
    """Model code keys on the concrete class (weight init, weight-decay groups, fvcore's
    precise BN, torch's fuse_modules): each converted layer is still an instance of it."""
    net = model(name)
    classes = {n: type(m) for n, m in bn_layers(net)}
    batchnorm.convert(net, to="batchnorm")
    assert all(ours(m) for _, m in bn_layers(net))
    assert [n for n, m in bn_layers(net) if not isinstance(m, classes[n])] == []


@pytest.mark.parametrize("name", cases("fx"))
def test_converted_model_traces_with_torch_fx(name):
    """torch.fx.symbolic_trace, which every model here passes with its own BN layers, also
    traces the converted model (torch.fx keeps torch.nn modules as leaf calls), with the
    same outputs."""
    net = batchnorm.convert(model(name), to="batchnorm")
    traced = torch.fx.symbolic_trace(net)
    x = inputs()
    with torch.no_grad():
        assert torch.equal(traced(x), net(x))


def float64_population(name, batches):
    """Algorithm 2's population statistics from torch's own BN: a float64 copy whose BN
    layers run in training mode with ``momentum=None`` (the cumulative average of the batch
    mean and unbiased variance over the batches, as ``torch.optim.swa_utils.update_bn``
    computes) and every other layer in eval mode (dropout and stochastic depth off, as
    recalibrate runs them)."""
    net = model(name).double().eval()
    for _, m in bn_layers(net):
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for x in batches:
            net(x.double())
    return {n: (m.running_mean, m.running_var) for n, m in bn_layers(net)}


def batches():
    return [inputs(seed, n=4) for seed in (10, 11, 12)]


@pytest.mark.parametrize("name", cases("recalibrate"))
def test_recalibrate_matches_cumulative_average(name):
    """recalibrate on the converted model, run in float64, writes the oracle's population
    statistics to float64 rounding; run in float32, to float32 rounding of the layer inputs.

    The float32 tolerance is wide because in training mode the deepest layers normalize 4
    values per channel (4 images at 1x1), where float32 rounding of nearly equal values is
    amplified from layer to layer: measured worst 3e-3 of a layer's largest variance
    (tv_regnet_y_400mf); a biased variance would be off by 1/3 of it at those layers.
    """
    data = batches()
    net = batchnorm.convert(model(name), to="batchnorm")
    if name == "timm_convnext_atto":
        with pytest.raises(ValueError, match="no BN layer"):
            batchnorm.recalibrate(net, data, progress=False)
        return
    expected = float64_population(name, data)
    net64 = copy.deepcopy(net).double()
    assert batchnorm.recalibrate(net64, [x.double() for x in data], progress=False) == len(data)
    assert batchnorm.recalibrate(net, data, progress=False) == len(data)
    for (n, m64), (_, m) in zip(bn_layers(net64), bn_layers(net)):
        mean, var = expected[n]
        top = var.max().item()
        torch.testing.assert_close(m64.running_mean, mean, rtol=0, atol=1e-10 * top**0.5)
        torch.testing.assert_close(m64.running_var, var, rtol=1e-10, atol=1e-12 * top)
        torch.testing.assert_close(m.running_mean.double(), mean, rtol=0, atol=1e-2 * top**0.5)
        torch.testing.assert_close(m.running_var.double(), var, rtol=0, atol=1e-2 * top)


@pytest.mark.parametrize("name", cases("diagnose"))
def test_diagnose_clean_after_recalibrate_and_names_a_stale_layer(name):
    """After recalibrate on the same data, diagnose finds no statistics problem; shifting
    one layer's running_mean by 2 standard deviations makes it name exactly that layer.
    (eps_dominated, dead_channels and small_batch describe the random weights and the data,
    which recalibration cannot change; they are allowed here.)"""
    net = batchnorm.convert(model(name), to="batchnorm")
    data = batches()
    if name == "timm_convnext_atto":
        with pytest.raises(ValueError, match="no BN layer"):
            batchnorm.diagnose(net, data, progress=False)
        return
    batchnorm.recalibrate(net, data, progress=False)
    statistics = ("stale_statistics", "train_eval_gap", "skipped_batches")
    report = batchnorm.diagnose(net, data, progress=False)
    assert [(p.layer, p.kind) for p in report.problems if p.kind in statistics] == []

    layers = bn_layers(net)
    stale, layer = layers[len(layers) // 2]
    with torch.no_grad():
        layer.running_mean.add_(2 * layer.running_var.sqrt())
    report = batchnorm.diagnose(net, data, progress=False)
    assert [(p.layer, p.kind) for p in report.problems if p.kind in statistics] == [
        (stale, "stale_statistics")
    ]


@pytest.mark.parametrize("name", cases("freeze"))
def test_freeze_keeps_eval_output_and_unfreeze_restores(name):
    """freeze: the eval output stays (to float32 rounding), and training mode gives the same
    output (the frozen map never uses batch statistics); unfreeze: the original classes,
    state_dict and outputs come back."""
    original = model(name)
    net = model(name)
    classes = {n: type(m) for n, m in original.named_modules()}
    x = inputs()
    batchnorm.freeze(net)
    assert bn_layers(net) == []
    with torch.no_grad():
        frozen = net(x)
        assert_as_exact_as_float32(original, x, frozen)
        for m in net.modules():  # the frozen layers alone (dropout stays off)
            if isinstance(m, batchnorm.FrozenBatchNorm):
                m.train()
        assert torch.equal(net(x), frozen)
    net.eval()

    batchnorm.unfreeze(net)
    assert {n: type(m) for n, m in net.named_modules()} == classes
    state, expected = net.state_dict(), original.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    with torch.no_grad():
        assert torch.equal(net(x), original(x))


def check_fold(name, example_inputs):
    original = model(name)
    n_bn = len(bn_layers(original))
    folded, report = batchnorm.fold(original, example_inputs=example_inputs)
    assert report.traced, report.trace_error
    assert all(reason for _, reason in report.skipped)
    # every BN layer is accounted for: folded, or left with a reason
    assert len(report.folded) + len(report.skipped) == n_bn, str(report)
    assert len(report.folded) == (FOLDED[name] if FOLDED[name] is not None else n_bn)
    x = inputs()
    with torch.no_grad():
        assert_as_exact_as_float32(original, x, folded(x))


@pytest.mark.parametrize("name", cases("fold"))
def test_fold_with_example_inputs(name):
    """fold(model, example_inputs) (torch.export finds the neighbours) folds the BN layers
    that follow a convolution and reports the others; the output stays within float32
    rounding (the error against float64 is at most 4x the unfolded model's)."""
    check_fold(name, (inputs(),))


@pytest.mark.parametrize("name", cases("fold_fx"))
def test_fold_without_example_inputs(name):
    """The same through torch.fx (no example inputs)."""
    check_fold(name, None)


@pytest.mark.parametrize("name", cases("fuse"))
def test_fuse_activations(name):
    """fuse_activations fuses each BN with the activation after it (and residual BN + add
    -> activation), accounts for every BN, and leaves the eval output unchanged."""
    original = model(name)
    x = inputs()
    with torch.no_grad():
        expected = original(x)
    fused, report = batchnorm.fuse_activations(original, example_inputs=(x,))
    assert report.traced, report.trace_error
    assert all(reason for _, reason in report.skipped)
    n_fused = len(report.fused) + len(report.residual)
    assert n_fused + len(report.skipped) == len(bn_layers(model(name))), str(report)
    if name in FUSED:
        assert (len(report.fused), len(report.residual)) == FUSED[name], str(report)
    with torch.no_grad():
        assert rel_err(fused(x), expected) < 1e-6


@pytest.mark.parametrize("name", cases("export"))
def test_export_converted_eval_model(name):
    """torch.export.export captures the converted eval-mode model; the program computes the
    eager model's output."""
    net = batchnorm.convert(model(name), to="batchnorm")
    x = inputs()
    program = torch.export.export(net, (x,))
    with torch.no_grad():
        assert rel_err(program.module()(x), net(x)) < 1e-6
