"""fold (Algorithm 2, step 3) against the unfolded model, on graphs from torch.export (with
example inputs), torch.fx and nn.Sequential; export of folded and frozen models to
torch.export and onnxruntime."""

from __future__ import annotations

import copy

import pytest
import torch
from bn_models import (
    Aliased,
    HFResNet,
    SharedUse,
    Tokens,
    bn_inception,
    figure1_mlp,
    randomize_bn,
    rel_err,
    small_resnet,
)
from torch import nn

import batchnorm
from batchnorm import FrozenBatchNorm, fold, freeze

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

# Without example inputs the rank is unknown: a BN over axis 1 next to a Linear is left alone
# (it folds for (N, C) input, not for (N, C, L)). (number folded, number skipped) then:
WITHOUT_EXAMPLES = {
    "figure1_mlp": (0, 3),
    "bn_before_linear_and_convs": (2, 2),
    "frozen_and_train_mode": (0, 2),
}


@pytest.mark.parametrize("examples", [True, False], ids=["export", "fx"])
@pytest.mark.parametrize("case", sorted(FOLD_CASES))
def test_fold_matches_the_unfolded_model(case, examples):
    make, shape, n_folded, n_skipped = FOLD_CASES[case]
    if not examples:
        n_folded, n_skipped = WITHOUT_EXAMPLES.get(case, (n_folded, n_skipped))
    torch.manual_seed(0)
    model = randomize_bn(make()).eval()
    x = torch.randn(shape)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = model(x)
        folded, report = fold(model, example_inputs=(x,) if examples else None)
        got = folded(x)
    assert rel_err(got, expected) < 1e-5, report
    assert (len(report.folded), len(report.skipped)) == (n_folded, n_skipped), str(report)
    assert report.graph == ("torch.export" if examples else "torch.fx") and report.traced
    assert report.trace_error is None
    left = [n for n, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    left += [n for n, m in folded.named_modules() if isinstance(m, FrozenBatchNorm)]
    assert sorted(left) == sorted(bn for bn, _ in report.skipped)
    # The input model is untouched.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert type(folded) is type(model)


def test_fold_reports_why():
    model = randomize_bn(FOLD_CASES["bn_before_linear_and_convs"][0]()).eval()
    _, report = fold(model, example_inputs=torch.randn(4, 3, 5, 5))
    assert report.folded == [("2", "3", "before"), ("5", "6", "before"), ("12", "13", "before")]
    assert report.skipped[0][0] == "8" and "pads with zeros" in report.skipped[0][1]
    _, report = fold(SharedUse().eval())
    reasons = dict(report.skipped)
    assert "only user" in reasons["bn_a"] and "more than once" in reasons["bn_b"]
    _, report = fold(figure1_mlp().train())
    assert len(report.skipped) == 3 and "training mode" in report.skipped[0][1]
    _, report = fold(figure1_mlp().eval())
    assert report.folded == [] and all("example_inputs" in why for _, why in report.skipped)


def test_fold_uses_shapes_from_example_inputs():
    model = randomize_bn(Tokens()).eval()
    x = torch.randn(2, 3, 6)
    for examples in ((x,), None):  # a channels-last BN is on a Linear's axis at any rank
        folded, report = fold(model, example_inputs=examples)
        assert report.folded == [("bn", "fc", "after")]
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)
    # Linear on (N, C, L) is over L, while BatchNorm1d normalizes C: not foldable, and the
    # example input is what reveals it.
    wrong = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    _, report = fold(wrong, example_inputs=(torch.randn(2, 4, 4),))
    assert report.folded == [] and "feature axis" in report.skipped[0][1]


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), (3, 4, 4)),  # C == L
        (lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(4)), (3, 4, 5)),  # C != L
        (lambda: nn.Sequential(batchnorm.BatchNorm1d(4), nn.Linear(4, 2)), (3, 4, 4)),
    ],
    ids=["after_c_eq_l", "after_c_ne_l", "before_c_eq_l"],
)
def test_fold_of_linear_and_bn1d_on_3d_input_is_exact_or_skipped(make, shape):
    """Defect 6: without example_inputs, Linear -> BatchNorm1d on (N, C, L) was folded
    wrongly when C == L (max error 0.76) and crashed otherwise."""
    model = randomize_bn(make()).eval()
    x = torch.randn(shape)
    for examples in (None, (x,)):
        folded, report = fold(model, example_inputs=examples)
        assert report.folded == [], str(report)
        assert ("example_inputs" if examples is None else "feature axis") in report.skipped[0][1]
        torch.testing.assert_close(folded(x), model(x))
    if shape[1] != shape[2]:
        return
    # The same layers on 2-D input fold, once the example input shows the rank.
    x2 = torch.randn(3, shape[-1])
    folded, report = fold(model, example_inputs=(x2,))
    assert len(report.folded) == 1 and rel_err(folded(x2), model(x2)) < 1e-5


def test_fold_on_a_transformers_style_resnet():
    """Defect 15: conv, norm and activation as attributes of a small module and a shape check
    in Python: fx cannot trace it and no nn.Sequential pairs a conv with its BN. With example
    inputs torch.export captures it and all 12 BN layers fold; without, the report says the
    trace failed and that example inputs would help."""
    torch.manual_seed(0)
    model = randomize_bn(HFResNet()).eval()
    x = torch.randn(2, 3, 32, 32)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 12
    folded, report = fold(model, example_inputs=(x,))
    assert report.graph == "torch.export" and len(report.folded) == 12, str(report)
    assert report.skipped == []
    assert ("embeddings.embedder.normalization", "embeddings.embedder.convolution", "after") in (
        report.folded
    )
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-5
    _, report = fold(model)
    assert not report.traced and report.graph == "nn.Sequential" and report.folded == []
    assert "torch.fx" in report.trace_error and "example_inputs" in report.trace_error
    assert "could not capture" in str(report) and "example_inputs" in str(report)
    assert all("trace_error" in why for _, why in report.skipped)


def test_fold_falls_back_to_sequential_pairs_when_nothing_can_trace():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow defeats symbolic tracing and export
                return self.body(x)
            return -self.body(x)

    model = randomize_bn(Branchy()).eval()
    x = torch.randn(2, 3, 6, 6)
    for examples in (None, (x,)):
        folded, report = fold(model, example_inputs=examples)
        assert not report.traced and report.folded == [("body.1", "body.0", "after")]
        assert ("torch.export:" in report.trace_error) == (examples is not None)
        assert rel_err(folded(x), model(x)) < 1e-5


def test_fold_leaves_a_bn_whose_tensors_the_forward_reads():
    class Peek(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) * self.bn.weight.mean()

    model = randomize_bn(Peek()).eval()
    x = torch.randn(2, 3, 4, 4)
    for examples in (None, (x,)):
        folded, report = fold(model, example_inputs=examples)
        assert report.folded == [] and "reads its tensors" in report.skipped[0][1]


def test_find_sites_gives_producer_and_consumer_on_every_graph():
    """The pair finder fold uses, on each capture: conv -> BN -> ReLU."""
    from batchnorm.inference.graph import capture, find_sites

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()

        def forward(self, x):
            return self.act(self.bn(self.conv(x)))

    x = torch.randn(2, 3, 4, 4)
    graphs = [capture(Net().eval(), (x,))[0], capture(Net().eval())[0]]
    graphs.append(capture(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()))[0])
    for graph, names in zip(
        graphs, [("conv", "bn", "act"), ("conv", "bn", "act"), ("0", "1", "2")]
    ):
        (site,) = find_sites(graph, lambda m: isinstance(m, nn.BatchNorm2d))
        assert (site.producer.name, site.call.name, site.consumer.name) == names, graph.source
    assert [g.source for g in graphs] == ["torch.export", "torch.fx", "torch.fx"]
    assert graphs[0].calls[1].rank == 4 and graphs[1].calls[1].rank is None


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
