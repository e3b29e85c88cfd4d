"""Our layers in code written for torch.nn's: isinstance checks, torch.fx traces, torch's fusion
and quantization, fvcore's precise BN; torch.nn's layers (or a one-line formula) are the oracle.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.fused import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, FrozenBatchNormAct

# ---------------------------------------------------------------------------------------------
# isinstance: model code keys on torch's concrete classes

CONCRETE = [  # (our class, the torch.nn class code checks for)
    (batchnorm.BatchNorm1d, nn.BatchNorm1d),
    (batchnorm.BatchNorm2d, nn.BatchNorm2d),
    (batchnorm.BatchNorm3d, nn.BatchNorm3d),
    (batchnorm.BatchRenorm1d, nn.BatchNorm1d),
    (batchnorm.BatchRenorm2d, nn.BatchNorm2d),
    (batchnorm.BatchRenorm3d, nn.BatchNorm3d),
    (BatchNormAct1d, nn.BatchNorm1d),
    (BatchNormAct2d, nn.BatchNorm2d),
    (BatchNormAct3d, nn.BatchNorm3d),
]


@pytest.mark.parametrize("ours,theirs", CONCRETE, ids=lambda c: c.__name__)
def test_layers_are_instances_of_torch_concrete_class(ours, theirs):
    layer = ours(3)
    assert isinstance(layer, theirs)
    others = {nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d} - {theirs}
    assert not any(isinstance(layer, other) for other in others)
    # What the subclassing must not change: torch's state_dict keys, pickles, deep copies.
    assert list(layer.state_dict()) == list(theirs(3).state_dict())
    for copied in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert type(copied) is ours and isinstance(copied, theirs)
        assert copied.state_dict().keys() == layer.state_dict().keys()


def test_any_axis_and_frozen_layers_are_no_concrete_torch_class():
    # BatchNorm(axis=) takes any rank, so no rank-specific class of torch's describes it; a
    # frozen layer has no batch statistics for code written for nn.BatchNorm2d to move.
    for layer in (batchnorm.BatchNorm(3, axis=-1), batchnorm.FrozenBatchNorm(3)):
        assert not isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))


def _resnet_like(bn: type = batchnorm.BatchNorm2d) -> nn.Module:
    class Block(nn.Module):  # torchvision's BasicBlock: relu(bn2(conv2(...)) + x)
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = bn(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = bn(c)
            self.relu = nn.ReLU()

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + x)

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), bn(8), nn.ReLU()),
        nn.Sequential(Block(8), Block(8)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def test_torchvision_style_init_and_weight_decay_exclusion_reach_our_layers():
    model = _resnet_like()
    bns = [m for m in model.modules() if isinstance(m, batchnorm.BatchNorm2d)]
    assert len(bns) == 5
    with torch.no_grad():
        for m in bns:
            m.weight.normal_()
            m.bias.normal_()
    # torchvision's ResNet.__init__ (timm's _init_weights is the same test).
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    for m in bns:
        assert torch.equal(m.weight, torch.ones(8)) and torch.equal(m.bias, torch.zeros(8))
    # The usual optimizer split: no weight decay for BN parameters.
    bn_params = [m.parameters() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    no_decay = {id(p) for params in bn_params for p in params}
    assert no_decay == {id(p) for m in bns for p in m.parameters()}


# ---------------------------------------------------------------------------------------------
# torch.ao.quantization.fuse_modules (eval): the fused conv/linear computes what conv + BN did

FUSIBLE = [  # (modules before the BN, our BN, with ReLU, input shape)
    (lambda: nn.Conv1d(3, 4, 3), batchnorm.BatchNorm1d, False, (2, 3, 9)),
    (lambda: nn.Conv1d(3, 4, 3), batchnorm.BatchNorm1d, True, (2, 3, 9)),
    (lambda: nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d, False, (2, 3, 7, 7)),
    (lambda: nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d, True, (2, 3, 7, 7)),
    (lambda: nn.Conv3d(3, 4, 3), batchnorm.BatchNorm3d, True, (2, 3, 5, 5, 5)),
    (lambda: nn.Linear(3, 4), batchnorm.BatchNorm1d, False, (2, 3)),
]


@pytest.mark.parametrize("bias", [True, False], ids=["beta", "no-beta"])
@pytest.mark.parametrize("make,bn,relu,shape", FUSIBLE, ids=lambda v: getattr(v, "__name__", None))
def test_fuse_modules_fuses_our_layers_in_eval(make, bn, relu, shape, bias, randomize):
    if not bias and len(shape) == 2:
        pytest.skip("torch's fuse_linear_bn_weights fails on a BN without beta (its own too)")
    torch.manual_seed(0)
    layers = [make(), bn(4, bias=bias)] + ([nn.ReLU()] if relu else [])
    if bias:
        randomize(layers[1])
    else:
        with torch.no_grad():
            layers[1].weight.uniform_(0.5, 1.5)
            layers[1].running_mean.normal_()
            layers[1].running_var.uniform_(0.5, 2)
    model = nn.Sequential(*layers).eval()
    x = torch.randn(shape)
    fused = torch.ao.quantization.fuse_modules(model, [[str(i) for i in range(len(layers))]])
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# fvcore's precise BN finds our layers by isinstance and computes torch's statistics


def test_fvcore_precise_bn_finds_our_layers_and_computes_torch_statistics():
    from fvcore.nn import precise_bn as fvcore_precise_bn  # a dev dependency (pyproject)

    # fvcore's own test re-splits the data into uneven batches; the population mean then is
    # the mean of every value the layer saw (a one-line formula).
    ours = _resnet_like(batchnorm.BatchNorm2d)
    theirs = _resnet_like(nn.BatchNorm2d)
    theirs.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(n, 3, 6, 6, generator=g) * 2 + 1 for n in (3, 5, 2, 6)]
    assert len(fvcore_precise_bn.get_bn_modules(ours)) == 5
    seen = []
    hook = ours[0][1].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    for model in (ours, theirs):
        fvcore_precise_bn.update_bn_stats(model, data, num_iters=len(data))
    hook.remove()
    for mine, reference in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert mine[0] == reference[0]
        torch.testing.assert_close(mine[1], reference[1], atol=1e-5, rtol=1e-5)
    stem = torch.cat([h.movedim(1, 0).reshape(8, -1) for h in seen], 1)
    torch.testing.assert_close(ours[0][1].running_mean, stem.mean(1), atol=1e-5, rtol=1e-5)
    assert ours[0][1].momentum == 0.1  # restored by fvcore


# ---------------------------------------------------------------------------------------------
# torch.fx: our layers are leaves of the default tracer, as torch.nn's BN layers are

TRACED = [  # (layer, input shape): every BN-like class here
    (lambda: batchnorm.BatchNorm1d(4), (6, 4)),
    (lambda: batchnorm.BatchNorm1d(4, momentum=None), (6, 4, 5)),
    (lambda: batchnorm.BatchNorm2d(4, backward="paper"), (6, 4, 3, 3)),
    (lambda: batchnorm.BatchNorm2d(4, virtual_batch_size=3), (6, 4, 3, 3)),
    (lambda: batchnorm.BatchNorm3d(4), (6, 4, 2, 3, 2)),
    (lambda: batchnorm.BatchNorm(4, axis=-1), (6, 5, 4)),
    (lambda: batchnorm.BatchRenorm2d(4), (6, 4, 3, 3)),
    (lambda: batchnorm.SyncBatchNorm(4), (6, 4, 3)),
    (lambda: BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.1), (6, 4, 3, 3)),
    (lambda: batchnorm.FrozenBatchNorm(4), (6, 4, 3)),
    (lambda: FrozenBatchNormAct(4), (6, 4, 3, 3)),
]


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.named_buffers()} | {
        k: v.detach().clone() for k, v in model.named_parameters()
    }


@pytest.mark.parametrize("make,shape", TRACED, ids=lambda v: None if callable(v) else str(v))
def test_symbolic_trace_keeps_our_layer_as_one_call(make, shape, randomize):
    torch.manual_seed(0)
    model = nn.Sequential(randomize(make()))
    twin = copy.deepcopy(model)
    gm = torch.fx.symbolic_trace(twin)
    calls = [(n.op, n.target) for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert calls == [("call_module", "0")]
    g = torch.Generator().manual_seed(1)
    for step, training in enumerate([True, True, True, False]):
        model.train(training)
        gm.train(training)
        x = torch.randn(shape, generator=g) * 2 + 1
        if step == 1:
            x[0] = float("nan")  # the guard skips it, through the GraphModule too
        outs = []
        for m in (model, gm):
            xi = x.clone().requires_grad_()
            y = m(xi)
            y.nan_to_num().sum().backward()
            outs.append((y, xi.grad))
        torch.testing.assert_close(outs[0], outs[1], equal_nan=True, atol=0, rtol=0)
        after, traced = _state(model), _state(gm)
        assert after.keys() == traced.keys()
        for k in after:
            torch.testing.assert_close(after[k], traced[k], equal_nan=True, atol=0, rtol=0)
    if hasattr(model[0], "num_batches_skipped"):
        assert model[0].num_batches_skipped.item() == 1


def test_traced_call_keeps_mask_and_residual():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = batchnorm.BatchNorm1d(4)
            self.act = BatchNormAct1d(4)

        def forward(self, x, mask, skip):
            return self.act(self.bn(x, mask=mask), skip)

    model = Net()
    gm = torch.fx.symbolic_trace(copy.deepcopy(model))
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    assert [a.name for a in nodes["bn"].args] == ["x", "mask"]
    assert [a.name for a in nodes["act"].args] == ["bn", "skip"]
    x, skip = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    x[2, :, 3:] = 1e30  # padding: never in the statistics
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, 3:] = False
    torch.testing.assert_close(gm(x, mask, skip), model(x, mask, skip), atol=0, rtol=0)
    for k, v in _state(model).items():
        torch.testing.assert_close(_state(gm)[k], v, atol=0, rtol=0)
    assert model.bn.running_mean.abs().max() < 10


def test_tracing_a_layer_itself_is_refused_with_the_way_out():
    # torch.nn's BN layers cannot be the root of a trace either (their check branches).
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(nn.BatchNorm2d(3))
    with pytest.raises(torch.fx.proxy.TraceError, match=r"nn.Sequential\(layer\)"):
        torch.fx.symbolic_trace(batchnorm.BatchNorm2d(3))


def test_fx_feature_extraction_on_a_resnet_like_model():
    # torchvision's create_feature_extractor: trace with the default leaves, make the graph
    # return intermediate nodes; here the stem's BN output and the logits.
    model = _resnet_like()
    gm = torch.fx.symbolic_trace(copy.deepcopy(model))
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    assert sum(isinstance(gm.get_submodule(t), batchnorm.BatchNorm2d) for t in nodes) == 5
    output = next(n for n in gm.graph.nodes if n.op == "output")
    logits = output.args[0]
    gm.graph.erase_node(output)
    gm.graph.output({"stem": nodes["0.1"], "logits": logits})
    gm.recompile()
    features = []
    model[0][1].register_forward_hook(lambda m, args, out: features.append(out))
    for training in (True, False):
        model.train(training)
        gm.train(training)
        x = torch.randn(4, 3, 6, 6)
        got = gm(x)
        torch.testing.assert_close(got["logits"], model(x), atol=0, rtol=0)
        torch.testing.assert_close(got["stem"], features[-1], atol=0, rtol=0)
        for k, v in _state(model).items():
            torch.testing.assert_close(_state(gm)[k], v, atol=0, rtol=0)


def test_fx_graph_mode_quantization_runs_and_converting_first_matches_torch(randomize):
    # prepare_fx matches its fusion patterns by exact class: it quantizes the conv and keeps
    # our BN as a float call (not folded); `convert(model, to="torch")` first (same tensors)
    # gives exactly torch.nn's quantized model.
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    def net(bn):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), bn(4), nn.ReLU()).eval()

    theirs = net(nn.BatchNorm2d)
    randomize(theirs[1])
    ours = net(batchnorm.BatchNorm2d)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 8, 8)

    def quantize(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
            prepared(x)
            return convert_fx(prepared)

    reference = quantize(theirs)
    direct = quantize(ours)
    assert isinstance(direct.get_submodule("1"), batchnorm.BatchNorm2d)
    scale = reference.get_submodule("0").scale  # one step of the quantized output
    torch.testing.assert_close(direct(x), theirs(x), atol=4 * scale, rtol=0)
    converted = quantize(batchnorm.convert(copy.deepcopy(ours), to="torch"))
    assert torch.equal(converted(x), reference(x))


# ---------------------------------------------------------------------------------------------
# A fully masked training batch is an empty batch: no error, nothing moves


@pytest.mark.parametrize("backward", ["native", "paper"])
@pytest.mark.parametrize(
    "kwargs", [{}, {"momentum": None}, {"affine": False}, {"virtual_batch_size": 4}], ids=str
)
def test_fully_masked_batch_moves_nothing(backward, kwargs, randomize):
    # Ghost BN takes a mask only when the batch is one group (virtual_batch_size == N).
    layer = batchnorm.BatchNorm1d(3, backward=backward, **kwargs)
    if layer.affine:
        randomize(layer)
    layer(torch.randn(4, 3, 5))
    before = _state(layer)
    x = torch.randn(4, 3, 5, requires_grad=True)
    y = layer(x, mask=torch.zeros(4, 5, dtype=torch.bool))
    y.sum().backward()
    for k, v in _state(layer).items():
        assert torch.equal(v, before[k]), k
    # The empty batch's map gamma * x + beta; like all padding, no gradient to gamma, beta.
    gamma = layer.weight[:, None] if layer.affine else 1
    beta = layer.bias[:, None] if layer.affine else 0
    torch.testing.assert_close(y, gamma * x + beta)
    if layer.affine:
        assert torch.equal(layer.weight.grad, torch.zeros(3))
        assert torch.equal(layer.bias.grad, torch.zeros(3))


def test_empty_batch_is_no_batch_for_the_cumulative_average():
    # momentum=None: batches of mean 1 and 3 around an empty one average to 2 (Algorithm 2's
    # E_B over the real batches). torch 2.13 counts the empty batch in num_batches_tracked, so
    # it weighs them 2/3 and 1/3 (docs/library.md states this difference).
    a = torch.tensor([[1.0], [1.0], [2.0], [0.0]])
    ours, theirs = batchnorm.BatchNorm1d(1, momentum=None), nn.BatchNorm1d(1, momentum=None)
    for layer in (ours, theirs):
        for x in (a, torch.empty(0, 1), a + 2):
            layer(x)
    assert ours.num_batches_tracked.item() == 2
    torch.testing.assert_close(ours.running_mean, torch.tensor([2.0]))
    assert theirs.num_batches_tracked.item() == 3
    torch.testing.assert_close(theirs.running_mean, torch.tensor([1.0 * 2 / 3 + 3.0 / 3]))
