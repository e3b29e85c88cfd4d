"""Fused BN + activation layers on the torch path, and fuse_activations; oracles: torch.nn.

The kernel path of the same layers is tested in tests/kernels/test_dispatch.py.
"""

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import batchnorm
from batchnorm import FrozenBatchNormAct, fuse_activations
from batchnorm.activations import ACTIVATIONS, of_module
from batchnorm.fused import BatchNormAct2d


@pytest.mark.parametrize(
    ("cls", "ref_cls", "shape"),
    [
        (batchnorm.BatchNormAct1d, nn.BatchNorm1d, (6, 4)),
        (batchnorm.BatchNormAct2d, nn.BatchNorm2d, (3, 4, 5, 5)),
        (batchnorm.BatchNormAct3d, nn.BatchNorm3d, (2, 4, 3, 2, 3)),
    ],
)
@pytest.mark.parametrize(("activation", "residual"), [("relu", True), ("leaky_relu", False)])
def test_torch_path_matches_torch_nn_bn_add_act(
    cls, ref_cls, shape, activation, residual, randomize
):
    layer = randomize(cls(4, activation=activation, negative_slope=0.3))
    ref = ref_cls(4)
    ref.load_state_dict(layer.state_dict())
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    r = torch.randn(shape, requires_grad=True) if residual else None

    def expected(module):
        u = module(x) if r is None else module(x) + r
        return torch.relu(u) if activation == "relu" else TF.leaky_relu(u, 0.3)

    y, y_ref = layer(x, r), expected(ref)
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn(shape)
    extra = [r] if r is not None else []
    got = torch.autograd.grad(y, [x, layer.weight, layer.bias, *extra], grad)
    want = torch.autograd.grad(y_ref, [x, ref.weight, ref.bias, *extra], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer, name), getattr(ref, name))
    layer.eval()
    ref.eval()
    torch.testing.assert_close(layer(x, r), expected(ref))


# Each activation of the registry and the torch.nn module it stands for: the oracle.
_MODULES = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
    "relu6": nn.ReLU6,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}


def test_the_registry_lists_every_activation_tested_here():
    assert set(ACTIVATIONS) == set(_MODULES)
    for name, make in _MODULES.items():
        module = make()
        expected = None if name == "identity" else (name, 0.2 if name == "leaky_relu" else 0.01)
        assert of_module(module) == expected
        assert type(ACTIVATIONS[name].make_module(0.2)) is type(module)
    assert of_module(nn.GELU(approximate="tanh")) == ("gelu_tanh", 0.01)


@pytest.mark.parametrize("activation", list(_MODULES))
@pytest.mark.parametrize("residual", [False, True])
def test_every_activation_matches_torch_nn_act_of_bn_in_float64(activation, residual, randomize):
    layer = randomize(BatchNormAct2d(4, activation=activation, negative_slope=0.2)).double()
    ref = nn.BatchNorm2d(4).double()
    ref.load_state_dict(layer.state_dict())
    act = _MODULES[activation]()
    torch.manual_seed(0)
    x = (3 * torch.randn(3, 4, 5, 5, dtype=torch.float64)).requires_grad_(True)
    r = torch.randn_like(x, requires_grad=True) if residual else None
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        ref.train(mode == "train")
        y = layer(x, r)
        y_ref = act(ref(x) if r is None else ref(x) + r)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        grad = torch.randn_like(y)
        inputs = [x, layer.weight, layer.bias] + ([r] if residual else [])
        inputs_ref = [x, ref.weight, ref.bias] + ([r] if residual else [])
        got = torch.autograd.grad(y, inputs, grad)
        want = torch.autograd.grad(y_ref, inputs_ref, grad)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-12, atol=0)
    frozen = batchnorm.freeze(layer)
    assert frozen.activation == activation
    torch.testing.assert_close(frozen(x, r), layer(x, r), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["silu", "hardswish", "relu6", "gelu", "gelu_tanh"])
def test_the_kernels_refuse_an_activation_they_do_not_implement(activation):
    with pytest.raises(ValueError, match=f"not '{activation}'"):
        BatchNormAct2d(3, activation=activation, backend="triton")
    layer = BatchNormAct2d(3, activation=activation)  # auto: the torch path takes it
    why = batchnorm.dispatch.kernel_refusal(layer, torch.randn(2, 3, 4, 4))
    assert f"not '{activation}'" in why and "backend='torch'" in why
    other = batchnorm.dispatch.kernel_refusal(BatchNormAct2d(3), torch.randn(2, 3, 4, 4))
    assert "activations" not in (other or "")  # relu: refused for the device, if at all


def test_state_dict_is_interchangeable_with_nn_batchnorm2d(randomize):
    fused = randomize(BatchNormAct2d(5, activation="leaky_relu", memory_saving=True))
    plain = nn.BatchNorm2d(5)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(fused.state_dict())
    back = BatchNormAct2d(5)
    back.load_state_dict(plain.state_dict())
    for key, value in fused.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value)


def test_bad_settings_and_calls_are_refused():
    with pytest.raises(ValueError, match="invertible"):
        BatchNormAct2d(3, activation="relu", memory_saving=True)
    with pytest.raises(ValueError, match="activation must be"):
        BatchNormAct2d(3, activation="mish")
    with pytest.raises(ValueError, match="invertible"):
        BatchNormAct2d(3, activation="silu", memory_saving=True)
    with pytest.raises(ValueError, match="negative_slope"):
        BatchNormAct2d(3, activation="leaky_relu", negative_slope=-0.1)
    with pytest.raises(ValueError, match="backend"):
        BatchNormAct2d(3, backend="cuda")
    with pytest.raises(ValueError, match="residual"):
        BatchNormAct2d(3)(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4))
    saving = BatchNormAct2d(3, activation="identity", memory_saving=True)
    with pytest.raises(ValueError, match="residual"):
        saving(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))


def test_backend_is_a_setting_swaps_keep():
    layer = batchnorm.BatchNorm2d(3, backend="torch")
    assert "backend='torch'" in repr(layer)
    sync = batchnorm.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(layer))[0]
    assert sync.backend == "torch"
    assert batchnorm.SyncBatchNorm.revert_sync_batchnorm(nn.Sequential(sync))[0].backend == "torch"
    # torch.nn has no backend: converting drops it, as it drops backward="paper".
    assert type(batchnorm.convert(layer, to="torch")) is nn.BatchNorm2d
    frozen = batchnorm.freeze(nn.Sequential(batchnorm.BatchNorm2d(3, backend="torch").eval()))
    assert batchnorm.unfreeze(frozen)[0].backend == "torch"


def _block():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False),
        BatchNormAct2d(6, activation="leaky_relu", negative_slope=0.1, memory_saving=True),
        nn.Conv2d(6, 4, 1),
        batchnorm.BatchNorm2d(4),
        nn.ReLU(),
    )


def test_freeze_unfreeze_convert_fold_on_a_fused_model():
    model = _block()
    x = torch.randn(4, 3, 7, 7)
    model(x)  # move the running statistics
    model.eval()
    expected = model(x)
    frozen = batchnorm.freeze(copy.deepcopy(model))
    assert type(frozen[1]) is FrozenBatchNormAct and frozen[1].activation == "leaky_relu"
    torch.testing.assert_close(frozen.train()(x), expected)
    back = batchnorm.unfreeze(frozen)[1]
    assert type(back) is BatchNormAct2d
    assert (back.activation, back.negative_slope, back.memory_saving) == ("leaky_relu", 0.1, True)
    with pytest.warns(UserWarning, match="left 1 BN layer.*1: torch.nn has no layer for Batch"):
        converted = batchnorm.convert(copy.deepcopy(model), to="torch")
    assert type(converted[1]) is BatchNormAct2d and type(converted[3]) is nn.BatchNorm2d
    folded, report = batchnorm.fold(model)
    assert [(bn, where) for bn, _, where in report.folded] == [("1", "after"), ("3", "after")]
    assert type(folded[1]) is nn.LeakyReLU and folded[1].negative_slope == 0.1
    torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)


def test_fold_never_folds_a_fused_layer_into_the_next_layer(randomize):
    model = nn.Sequential(nn.Flatten(), randomize(batchnorm.BatchNormAct1d(4)), nn.Linear(4, 2))
    model.eval()
    x = torch.randn(5, 4)
    folded, report = batchnorm.fold(model, x)
    assert report.folded == []
    assert "activation ReLU lies between" in report.skipped[0][1]
    torch.testing.assert_close(folded(x), model(x))


class _Net(nn.Module):
    """A small conv net with every case fuse_activations meets."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = batchnorm.BatchNorm2d(8)
        self.act2 = nn.LeakyReLU(0.2)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.bn3 = nn.BatchNorm2d(8)  # + residual, then the shared relu
        self.relu = nn.ReLU()
        self.bn4 = nn.BatchNorm2d(8)  # followed by a function
        self.bn5 = nn.BatchNorm2d(8)  # followed by the shared relu again
        self.head = nn.Conv2d(8, 2, 1)
        self.bn6 = nn.BatchNorm2d(2)  # the model's output

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.bn2(self.conv2(x)))
        y = self.relu(self.bn3(self.conv3(y)) + x)
        y = TF.relu(self.bn4(y))
        y = self.relu(self.bn5(y))
        return self.bn6(self.head(y))


@pytest.mark.parametrize("example", [False, True])
def test_fuse_activations_on_a_small_conv_net(example):
    model = _Net()
    x = torch.randn(2, 3, 6, 6)
    reference = copy.deepcopy(model)
    fused, report = fuse_activations(model, (x,) if example else None, memory_saving=True)
    assert fused is model
    assert report.fused == [("bn1", "act1", "relu"), ("bn2", "act2", "leaky_relu")]
    assert type(model.bn1) is BatchNormAct2d and type(model.act1) is nn.Identity
    assert model.bn2.memory_saving and not model.bn1.memory_saving  # relu is not invertible
    skipped = dict(report.skipped)
    assert set(skipped) == {"bn3", "bn4", "bn5", "bn6"}
    assert "add" in skipped["bn3"] and "residual" in skipped["bn3"]
    assert "relu" in skipped["bn4"]
    assert "more than once" in skipped["bn5"]
    assert "output" in skipped["bn6"]
    assert "relu" in str(report) and "kept bn5" in str(report)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(reference, mode)()
        torch.testing.assert_close(model(x), reference(x))
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, msg=name)


def test_fuse_activations_keeps_parameters_for_the_optimizer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    weight = model[1].weight
    model, report = fuse_activations(model)
    assert model[1].weight is weight and report.fused == [("1", "2", "relu")]
    again, report = fuse_activations(model)
    assert report.fused == [] and report.skipped == [("1", "already fused")]


def test_recalibrate_treats_a_fused_layer_as_its_bn():
    fused = _block()
    plain = copy.deepcopy(fused)
    plain[1] = batchnorm.BatchNorm2d(6)
    plain[1].load_state_dict(fused[1].state_dict())
    plain.insert(2, nn.LeakyReLU(0.1))
    batches = [torch.randn(4, 3, 7, 7) for _ in range(3)]
    assert batchnorm.recalibrate(fused, batches, progress=False) == 3
    batchnorm.recalibrate(plain, batches, progress=False)
    for a, b in zip(fused[1].buffers(), plain[1].buffers()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(fused.eval()(batches[0]), plain.eval()(batches[0]))


def test_fuse_activations_on_a_frozen_model_unfreezes_to_the_fused_layer(randomize):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomize(nn.BatchNorm2d(4)), nn.ReLU())
    renorm = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchRenorm2d(4), nn.ReLU())
    x = torch.randn(2, 3, 5, 5)
    expected = model.eval()(x)
    model, report = fuse_activations(batchnorm.freeze(model))
    assert type(model[1]) is FrozenBatchNormAct and report.fused == [("1", "2", "relu")]
    torch.testing.assert_close(model.train()(x), expected)
    model = batchnorm.unfreeze(model)
    assert type(model[1]) is BatchNormAct2d and type(model[2]) is nn.Identity
    torch.testing.assert_close(model.eval()(x), expected)
    # A layer frozen from a class without a fused form is left: unfreeze would lose the ReLU.
    _, report = fuse_activations(batchnorm.freeze(renorm))
    assert report.fused == [] and "BatchRenorm2d" in report.skipped[0][1]


class _BasicBlock(nn.Module):
    """ResNet's basic block, conv-bn-relu-conv-bn + identity -> relu, and variants of its
    residual add that must stay unfused."""

    def __init__(self, variant="module"):
        super().__init__()
        self.variant = variant
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = batchnorm.BatchNorm2d(4)
        self.relu2 = nn.ReLU(inplace=True)
        self.scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.variant == "shared_sum":  # the sum is read by the relu and the output
            out = out + x
            return self.relu2(out) + out
        if self.variant == "broadcast":  # the residual has another shape
            return self.relu2(out + self.scale)
        if self.variant == "alpha":
            return self.relu2(torch.add(out, x, alpha=2.0))
        out = out + x
        return TF.relu(out) if self.variant == "functional" else self.relu2(out)


@pytest.mark.parametrize("variant", ["module", "functional"])
def test_fuse_activations_fuses_bn_add_relu_into_a_graph_module(variant, randomize):
    torch.manual_seed(0)
    model = _BasicBlock(variant)
    randomize(model.bn1, 1)
    randomize(model.bn2, 2)
    reference = copy.deepcopy(model)
    x = torch.randn(3, 4, 5, 5)
    fused, report = fuse_activations(model, (x,))
    assert isinstance(fused, torch.fx.GraphModule) and report.graph_module
    activation = "relu2" if variant == "module" else "relu"
    assert report.fused == [("bn1", "relu1", "relu")]
    assert report.residual == [("bn2", activation, "relu")] and report.skipped == []
    assert f"bn2 + add + {activation} -> relu (residual)" in str(report)
    assert "GraphModule" in str(report)
    assert type(fused.bn2) is BatchNormAct2d and fused.bn2.weight is model.bn2.weight
    # One call bn2(conv2, x) in place of bn2, the add and the relu.
    calls = [n for n in fused.graph.nodes if n.op != "placeholder" and n.op != "output"]
    assert [n.target for n in calls][-1] == "bn2" and len(calls[-1].args) == 2
    assert not any(n.target in ("relu2", TF.relu) for n in calls)
    # Train mode: outputs, gradients, then running statistics equal torch's unfused block.
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ya, yb = fused.train()(xa), reference.train()(xb)
    torch.testing.assert_close(ya, yb, atol=1e-6, rtol=0)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-6, rtol=0)
    params = dict(reference.named_parameters())
    named = dict(fused.named_parameters())
    assert set(named) == set(params)
    for name, p in named.items():
        torch.testing.assert_close(p.grad, params[name].grad, atol=1e-6, rtol=0, msg=name)
    state, expected = fused.state_dict(), reference.state_dict()
    assert set(state) == set(expected)  # the same names: the fused layer keeps BN's keys
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), reference.eval()(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        ("shared_sum", "also read elsewhere"),
        ("broadcast", "no broadcast"),
        ("alpha", "not a plain a + b"),
    ],
)
def test_fuse_activations_leaves_bn_add_relu_the_graph_cannot_fuse(variant, reason):
    torch.manual_seed(0)
    model = _BasicBlock(variant)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 4, 5, 5)
    fused, report = fuse_activations(model, (x,))
    assert fused is model and not report.graph_module and report.residual == []
    assert report.fused == [("bn1", "relu1", "relu")]
    ((name, why),) = report.skipped
    assert name == "bn2" and reason in why, why
    torch.testing.assert_close(fused(x), reference(x))


def test_fuse_activations_needs_example_inputs_for_the_residual_shape():
    model = _BasicBlock()
    fused, report = fuse_activations(model)
    assert fused is model and report.residual == [] and not report.graph_module
    assert report.skipped[0][0] == "bn2" and "example_inputs" in report.skipped[0][1]


_FUNCTIONS = {
    "relu": TF.relu,
    "silu": TF.silu,
    "hardswish": TF.hardswish,
    "relu6": TF.relu6,
    "gelu": TF.gelu,
    "gelu_tanh": lambda t: TF.gelu(t, approximate="tanh"),
}


class _ActBlock(nn.Module):
    """conv-bn-act then conv-bn + x -> act, with the activation as modules or as functions."""

    def __init__(self, activation, functional):
        super().__init__()
        self.function = _FUNCTIONS[activation] if functional else None
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.act1, self.act2 = _MODULES[activation](), _MODULES[activation]()

    def forward(self, x):
        if self.function is not None:
            return self.function(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + x)
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + x)


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("activation", list(_FUNCTIONS))
def test_fuse_activations_recognises_each_activation_module_and_function(
    activation, functional, randomize
):
    model = _ActBlock(activation, functional)
    randomize(model.bn1, 1)
    randomize(model.bn2, 2)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 4, 5, 5)
    fused, report = fuse_activations(model, (x,))
    assert report.fused == [("bn1", "act1", activation)] and report.skipped == []
    ((bn, _, kind),) = report.residual
    assert (bn, kind) == ("bn2", activation)
    assert fused.bn1.activation == fused.bn2.activation == activation
    for mode in (True, False):
        torch.testing.assert_close(fused.train(mode)(x), reference.train(mode)(x))


class _ConvBnAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _Branching(nn.Module):
    """fx cannot trace a branch on a shape; torch.export (with example inputs) can."""

    def __init__(self):
        super().__init__()
        self.block = _ConvBnAct()

    def forward(self, x):
        y = self.block(x)
        return y if x.shape[-1] > 1 else -y


def test_a_failed_capture_says_that_example_inputs_would_help():
    x = torch.randn(2, 3, 5, 5)
    _, report = fuse_activations(_Branching())
    assert not report.traced and report.fused == []
    assert "torch.fx" in report.trace_error and "example_inputs" in report.trace_error
    assert "could not capture" in str(report)
    _, report = fuse_activations(_Branching(), example_inputs=(x,))
    assert report.graph == "torch.export" and report.trace_error is None
    assert report.fused == [("block.bn", "block.act", "relu")]


class _Preact(nn.Module):
    """A forward with a flag: ``return_preact=True`` also returns the BN's output."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x, return_preact=False):
        pre = self.bn(self.conv(x))
        out = self.act(pre)
        return (out, pre) if return_preact else out


@pytest.mark.parametrize("nested", [False, True])
def test_fuse_activations_never_fuses_in_place_from_one_path_of_the_forward(nested):
    class Outer(nn.Module):  # the flag passed down to the block that branches on it
        def __init__(self):
            super().__init__()
            self.inner = _Preact()

        def forward(self, x, return_preact=False):
            return self.inner(x, return_preact)

    model = Outer() if nested else _Preact()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 5, 5)
    fused, report = fuse_activations(model, (x,))  # export takes return_preact=False
    name = "inner.bn" if nested else "bn"
    assert report.graph == "torch.export" and report.fused == []
    ((skipped, why),) = report.skipped
    assert skipped == name and "one path" in why and "torch.fx cannot trace it" in why
    for flag in (False, True):
        torch.testing.assert_close(fused(x, return_preact=flag), reference(x, return_preact=flag))
    # Without example inputs torch.fx cannot trace the flag at all: nothing is fused either.
    _, report = fuse_activations(copy.deepcopy(reference))
    assert report.fused == [] and not report.traced


def test_fuse_activations_refuses_a_pair_whose_own_forward_branches():
    # _Branching branches above its block, and is fused; here the block itself branches.
    class Tap(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.act = nn.BatchNorm2d(3), nn.ReLU()

        def forward(self, x):
            pre = self.bn(x)
            return self.act(pre) if x.shape[-1] > 1 else (self.act(pre), pre)

    class Root(nn.Module):  # export sees Tap's first path only
        def __init__(self):
            super().__init__()
            self.tap = Tap()

        def forward(self, x):
            return self.tap(x)

    _, report = fuse_activations(Root(), (torch.randn(2, 3, 5, 5),))
    ((name, why),) = report.skipped
    assert report.fused == [] and name == "tap.bn" and "forward of tap (Tap)" in why


def test_fuse_activations_in_place_across_an_identity_module():
    class Block(nn.Module):  # timm's blocks: bn1 -> drop_block (nn.Identity) -> act1
        def __init__(self):
            super().__init__()
            self.bn, self.drop, self.act = nn.BatchNorm2d(3), nn.Identity(), nn.SiLU()

        def forward(self, x):
            return self.act(self.drop(self.bn(x)))

    model = nn.Sequential(nn.Conv2d(3, 3, 1), Block())
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 5, 5)
    fused, report = fuse_activations(model, (x,))
    assert report.fused == [("1.bn", "1.act", "silu")]
    torch.testing.assert_close(fused(x), reference(x))


class _Block(nn.Module):
    """A residual basic block (timm's layout: its own act1 and act2), with a conv + BN
    downsample where the shape changes."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1, self.act1 = nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += shortcut
        return self.act2(out)


def test_fuse_activations_fuses_every_residual_of_a_resnet_like_model(randomize):
    torch.manual_seed(0)
    widths = [(4, 4, 1), (4, 4, 1), (4, 6, 2), (6, 6, 1), (6, 8, 2), (8, 8, 1), (8, 8, 2)]
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        *[_Block(cin, cout, stride) for cin, cout, stride in widths + [(8, 8, 1)]],
    )
    for k, m in enumerate(model.modules()):
        if isinstance(m, nn.BatchNorm2d):
            randomize(m, k)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16)
    fused, report = fuse_activations(model, (x,))
    # 8 blocks: each bn2 + shortcut -> act2 is one call, the shortcut of the next block
    # included; a downsample BN is the residual of its block's fused bn2.
    assert {bn for bn, _, _ in report.residual} == {f"{k}.bn2" for k in range(3, 11)}
    assert len(report.fused) == 9  # the stem and every bn1
    assert {why.split(": ", 1)[1] for _, why in report.skipped} == {
        f"its output is the residual of {k}.bn2, fused with that add" for k in (5, 7, 9)
    }
    for mode in (True, False):
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = fused.train(mode)(xa), reference.train(mode)(xb)
        torch.testing.assert_close(ya, yb)
        ya.sum().backward()
        yb.sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)
