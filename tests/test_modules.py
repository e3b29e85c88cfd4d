"""The drop-in layers against torch.nn.BatchNorm*d as the oracle, plus what torch's lack."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import batchnorm

# Declared once, run through every check: (ours, torch's, input shape).
LAYERS = [
    (batchnorm.BatchNorm1d, nn.BatchNorm1d, (16, 6)),
    (batchnorm.BatchNorm1d, nn.BatchNorm1d, (8, 6, 5)),
    (batchnorm.BatchNorm2d, nn.BatchNorm2d, (4, 6, 5, 3)),
    (batchnorm.BatchNorm3d, nn.BatchNorm3d, (2, 6, 3, 2, 4)),
]
FLAGS = [  # constructor keyword arguments beyond num_features
    {},
    {"momentum": None},
    {"momentum": 0.3, "eps": 1e-3},
    {"affine": False},
    {"track_running_stats": False},
]
BACKWARDS = ["native", "paper"]
IDS = [f"{c.__name__}{s}" for c, _, s in LAYERS]


def pair(ours_cls, torch_cls, flags, backward="native"):
    torch.manual_seed(0)
    theirs = torch_cls(6, **flags)
    ours = ours_cls(6, backward=backward, **flags)
    if theirs.affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def run_steps(ours, theirs, shape, steps=3, channels_last=False):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(shape, generator=g) * 2 + 1
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.randn(shape, generator=g)
        outs = []
        for layer in (ours, theirs):
            xi = x.clone().requires_grad_()
            layer.zero_grad()
            y = layer(xi)
            y.backward(grad)
            outs.append((y, xi.grad, [p.grad for p in layer.parameters()]))
        (y1, gx1, gp1), (y2, gx2, gp2) = outs
        torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx1, gx2, atol=1e-5, rtol=1e-5)
        for a, b in zip(gp1, gp2):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    sd1, sd2 = ours.state_dict(), theirs.state_dict()
    assert list(sd1) == list(sd2)
    for k in sd1:
        torch.testing.assert_close(sd1[k], sd2[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("ours_cls,torch_cls,shape", LAYERS, ids=IDS)
def test_training_then_eval_matches_torch(ours_cls, torch_cls, shape, flags, backward):
    ours, theirs = pair(ours_cls, torch_cls, flags, backward)
    run_steps(ours, theirs, shape)
    ours.eval()
    theirs.eval()
    run_steps(ours, theirs, shape, steps=1)


def test_channels_last_matches_torch():
    ours, theirs = pair(batchnorm.BatchNorm2d, nn.BatchNorm2d, {})
    run_steps(ours, theirs, (4, 6, 5, 3), channels_last=True)


@pytest.mark.parametrize("ours_cls,torch_cls,shape", LAYERS, ids=IDS)
def test_state_dicts_load_both_ways_and_through_files(ours_cls, torch_cls, shape):
    ours, theirs = pair(ours_cls, torch_cls, {})
    run_steps(ours, theirs, shape)
    fresh_torch, fresh_ours = torch_cls(6), ours_cls(6)
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    fresh_torch.load_state_dict(torch.load(buf, weights_only=True))
    fresh_ours.load_state_dict(theirs.state_dict())
    for a, b in ((fresh_torch, ours), (fresh_ours, theirs)):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k


def test_old_checkpoint_without_num_batches_tracked_loads():
    theirs = nn.BatchNorm2d(6)
    sd = theirs.state_dict()
    del sd["num_batches_tracked"]
    ours = batchnorm.BatchNorm2d(6)
    ours.num_batches_tracked.fill_(7)
    ours.load_state_dict(sd)  # strict: no missing-key error
    assert ours.num_batches_tracked.item() == 0


def test_cumulative_average_is_algorithm_2_population_estimate():
    # momentum=None over k equal batches of m: E[x] = mean of mu_B, Var[x] = mean of
    # m/(m-1) sigma2_B, exactly Algorithm 2, step 2.
    bn = batchnorm.BatchNorm1d(3, momentum=None)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(20, 3, generator=g) * (i + 1) + i for i in range(5)]
    for x in batches:
        bn(x)
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in batches]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(0) for x in batches]).mean(0))
    assert bn.num_batches_tracked.item() == 5


def test_any_channel_axis_equals_moving_channels_to_axis_1():
    x = torch.randn(4, 7, 5)  # (N, L, C), channels last
    ours = batchnorm.BatchNorm(5, axis=-1)
    ref = batchnorm.BatchNorm1d(5)
    torch.testing.assert_close(ours(x), ref(x.transpose(1, 2)).transpose(1, 2))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert "axis=-1" in repr(ours)
    with pytest.raises(ValueError, match="expected 5 channels on axis -1, got 7"):
        ours(torch.randn(4, 5, 7))


def test_non_finite_batches_are_skipped_and_counted():
    bn = batchnorm.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    for bad in (float("nan"), float("inf")):
        x = torch.randn(4, 3, 2, 2)
        x[0, 1, 0, 0] = bad
        y = bn(x)
        assert not torch.isfinite(y).all()
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert bn.num_batches_skipped.item() == 2 and bn.num_batches_tracked.item() == 1
    assert "num_batches_skipped" not in bn.state_dict()  # torch-compatible checkpoints
    bn(torch.randn(4, 3, 2, 2))
    assert bn.num_batches_tracked.item() == 2


@pytest.mark.parametrize("compiled_form", [False, True])
def test_a_mean_that_16_bit_buffers_cannot_hold_is_skipped(monkeypatch, compiled_form):
    # float32 input, float16 buffers: a batch mean of 7e4 is finite in float32 and its
    # variance small, but float16 stores 7e4 as inf. The guard checks what the buffers would
    # hold (mean included for 16-bit buffers); before issue 18 it looked at the variance
    # alone and stored running_mean = inf. Both forms of the guard: read back on the CPU, and
    # the torch.where form of GPUs and compiled graphs.
    from batchnorm.functional import running

    if compiled_form:
        monkeypatch.setattr(running, "host_readable", lambda t: False)
    bn = batchnorm.BatchNorm1d(3)
    bn.running_mean = bn.running_mean.half()
    bn.running_var = bn.running_var.half()
    bn(torch.randn(8, 3))
    before = bn.running_mean.clone(), bn.running_var.clone()
    bn(7e4 + torch.randn(8, 3))
    assert torch.isfinite(bn.running_mean).all() and torch.equal(bn.running_mean, before[0])
    assert torch.equal(bn.running_var, before[1])
    assert (bn.num_batches_tracked.item(), bn.num_batches_skipped.item()) == (1, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_into_float32_layer(dtype):
    bn = batchnorm.BatchNorm2d(4)
    x = torch.randn(8, 4, 3, 3).to(dtype)
    y = bn(x)
    assert y.dtype == dtype and bn.running_mean.dtype == torch.float32
    ref = nn.BatchNorm2d(4)(x.float())
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize(
    "layer,x,error,match",
    [
        (
            batchnorm.BatchNorm1d(4),
            torch.randn(1, 4),
            ValueError,
            r"more than 1 value per channel.*\(1, 4\)",
        ),
        (batchnorm.BatchNorm2d(4), torch.randn(1, 4, 1, 1), ValueError, "more than 1 value"),
        (batchnorm.BatchNorm2d(4), torch.randn(2, 4, 3), ValueError, "expected 4D input, got 3D"),
        (batchnorm.BatchNorm1d(4), torch.randn(2, 4, 3, 3), ValueError, "expected 2D or 3D"),
        (
            batchnorm.BatchNorm2d(4),
            torch.randn(2, 5, 3, 3),
            ValueError,
            r"BatchNorm2d\(4\) expected 4 channels on axis 1, got 5",
        ),
        (
            batchnorm.BatchNorm1d(4),
            torch.ones(3, 4, dtype=torch.long),
            TypeError,
            "floating-point input, got torch.int64",
        ),
    ],
)
def test_bad_input_gets_a_clear_error_and_leaves_statistics_alone(layer, x, error, match):
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=match):
        layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])


def test_inference_affine_reproduces_eval_output():
    bn = batchnorm.BatchNorm2d(3)
    for _ in range(3):
        bn(torch.randn(8, 3, 4, 4) * 2 + 1)
    bn.eval()
    x = torch.randn(2, 3, 4, 4)
    scale, shift = bn.inference_affine()
    torch.testing.assert_close(bn(x), x * scale[:, None, None] + shift[:, None, None])
    with pytest.raises(RuntimeError, match="track_running_stats=False"):
        batchnorm.BatchNorm2d(3, track_running_stats=False).inference_affine()


@pytest.mark.parametrize("a", [0.1, 7.0])
def test_scale_invariance_section_3_3(a):
    # BN(Wu) = BN((aW)u), and d/d(aW) = (1/a) d/dW: larger weights, smaller gradients.
    torch.manual_seed(0)
    u = torch.randn(32, 10, dtype=torch.float64)
    w = torch.randn(10, 5, dtype=torch.float64)
    target = torch.randn(32, 5, dtype=torch.float64)
    # The identity is exact at eps = 0, which training refuses (as torch): the smallest eps.
    bn = batchnorm.BatchNorm1d(5, eps=torch.finfo(torch.float64).tiny, dtype=torch.float64)

    def loss_and_grad(weight):
        weight = weight.clone().requires_grad_()
        y = bn(u @ weight)
        loss = ((torch.sigmoid(y) - target) ** 2).sum()
        loss.backward()
        return y.detach(), weight.grad

    y1, g1 = loss_and_grad(w)
    ya, ga = loss_and_grad(a * w)
    torch.testing.assert_close(y1, ya, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ga, g1 / a, atol=1e-8, rtol=1e-6)


def test_torch_compile_of_a_model_with_our_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), batchnorm.BatchNorm2d(4), nn.ReLU())
    ref = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    ref.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="aot_eager")  # no C compiler needed
    x = torch.randn(4, 3, 6, 6)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var)
    assert model[1].num_batches_tracked.item() == 2
    model.eval()
    ref.eval()
    torch.testing.assert_close(compiled(x), ref(x), atol=1e-5, rtol=1e-5)


def test_functional_call_leaves_module_state_untouched_by_swapped_buffers():
    bn = batchnorm.BatchNorm1d(3)
    x = torch.randn(10, 3)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    params = dict(bn.named_parameters())
    out = torch.func.functional_call(bn, {**params, **state}, (x,))
    torch.testing.assert_close(out, nn.BatchNorm1d(3)(x))
    assert bn.num_batches_tracked.item() == 0


def test_torch_tooling_sees_our_layers_as_batch_norm():
    # swa_utils.update_bn recognises BN layers by torch's base class, which ours subclass.
    model = nn.Sequential(nn.Linear(4, 3), batchnorm.BatchNorm1d(3))
    data = [torch.randn(10, 4) * 3 + 2 for _ in range(4)]
    torch.optim.swa_utils.update_bn(data, model)
    with torch.no_grad():
        h = model[0](torch.cat(data))
    # update_bn uses momentum=None over equal batches: Algorithm 2's estimate.
    torch.testing.assert_close(model[1].running_mean, h.mean(0), atol=1e-5, rtol=1e-5)


def test_layer_takes_a_padding_mask():
    bn = batchnorm.BatchNorm1d(3)
    x = torch.randn(2, 3, 5)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    bn(x, mask=mask)
    valid = x.transpose(1, 2)[mask]  # (7, 3)
    torch.testing.assert_close(bn.running_mean, 0.1 * valid.mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * valid.var(0))


def test_bias_false_matches_torch_when_torch_has_it():
    import inspect

    if "bias" not in inspect.signature(nn.BatchNorm2d.__init__).parameters:
        pytest.skip(f"torch {torch.__version__} BatchNorm has no bias= flag")
    ours, theirs = batchnorm.BatchNorm2d(6, bias=False), nn.BatchNorm2d(6, bias=False)
    assert ours.bias is None and list(ours.state_dict()) == list(theirs.state_dict())
    run_steps(ours, theirs, (4, 6, 3, 3))


def test_ghost_batch_norm_layer_keeps_torch_state_dict():
    bn = batchnorm.BatchNorm2d(4, virtual_batch_size=2)
    assert "virtual_batch_size=2" in repr(bn)
    x = torch.randn(6, 4, 3, 3)
    y = bn(x)
    ref = torch.cat([nn.BatchNorm2d(4)(p) for p in x.split(2)])
    torch.testing.assert_close(y, ref)
    assert list(bn.state_dict()) == list(nn.BatchNorm2d(4).state_dict())
    assert bn.num_batches_tracked.item() == 1


def test_batch_renorm_layer_is_bn_in_eval_and_loads_bn_checkpoints():
    layer = batchnorm.BatchRenorm2d(3)
    assert layer.momentum == 0.01 and "r_max=3.0" in repr(layer)
    for _ in range(3):
        layer(torch.randn(8, 3, 4, 4) * 2 + 1)
    assert layer.num_batches_tracked.item() == 3
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(layer.state_dict())
    layer.eval()
    plain.eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(layer(x), plain(x))
    with pytest.raises(ValueError, match="track_running_stats must be True"):
        batchnorm.BatchRenorm1d(3, track_running_stats=False)


# ------------------------------------------------------------------------------------------
# Regressions of issue 8 (defects 1, 2, 8, 9, 13, 14) and the one forward.


def test_paper_backward_second_derivative_matches_torch():
    # Defect 1, the reproduction: about 1.2 off before, now as torch.nn and native.
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x.requires_grad_()
    layers = {
        "paper": batchnorm.BatchNorm1d(3, backward="paper").double(),
        "native": batchnorm.BatchNorm1d(3).double(),
        "torch": nn.BatchNorm1d(3).double(),
    }
    second = {}
    for name, bn in layers.items():
        (g,) = torch.autograd.grad((bn(x) ** 3).sum(), x, create_graph=True)
        (second[name],) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(second["paper"], second["torch"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(second["native"], second["torch"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5)])
def test_paper_backward_batches_gradients_and_has_forward_mode_ad(shape):
    # Issue 15 item 6: the paper's backward wrote into an out= buffer, which vmap cannot batch
    # (is_grads_batched, jacobian(vectorize=True) raised), and BatchNormFunction had no jvp.
    # Oracle: torch.nn's BN (its kernel's derivatives), on the same layer state, in float64.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
    cotangents = torch.randn(3, *shape, dtype=torch.float64, generator=gen)
    tangent = torch.randn(*shape, dtype=torch.float64, generator=gen)
    paper = batchnorm.BatchNorm1d(3, backward="paper").double()
    reference = nn.BatchNorm1d(3).double()
    with torch.no_grad():
        for bn in (paper, reference):
            bn.weight.copy_(torch.tensor([0.5, -2.0, 1.5]))
            bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))

    (batched,) = torch.autograd.grad(paper(x), x, cotangents, is_grads_batched=True)
    (expected,) = torch.autograd.grad(reference(x), x, cotangents, is_grads_batched=True)
    torch.testing.assert_close(batched, expected, rtol=1e-10, atol=1e-10)

    jacobian = torch.autograd.functional.jacobian(paper, x, vectorize=True)
    expected = torch.autograd.functional.jacobian(reference, x, vectorize=True)
    torch.testing.assert_close(jacobian, expected, rtol=1e-10, atol=1e-10)

    import torch.autograd.forward_ad as fwAD

    before = paper.running_mean.clone(), paper.num_batches_tracked.clone()
    with fwAD.dual_level():
        out = fwAD.unpack_dual(paper(fwAD.make_dual(x.detach(), tangent)))
        ref = fwAD.unpack_dual(reference(fwAD.make_dual(x.detach(), tangent)))
    torch.testing.assert_close(out.primal, ref.primal, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.tangent, ref.tangent, rtol=1e-10, atol=1e-10)
    # The forward-AD call is a training step like any other: it commits once, and only primals.
    assert paper.num_batches_tracked == before[1] + 1
    torch.testing.assert_close(paper.running_mean, reference.running_mean, rtol=1e-12, atol=0)
    assert fwAD.unpack_dual(paper.running_mean).tangent is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_layer_mask_keeps_any_padding_value_out(bad):
    # Defect 2 at the layer: the running statistics are those of the valid positions.
    bn = batchnorm.BatchNorm1d(3)
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    x.transpose(1, 2)[~mask] = bad
    y = bn(x, mask=mask)
    valid = x.transpose(1, 2)[mask]  # (7, 3)
    assert torch.isfinite(y.transpose(1, 2)[mask]).all()
    torch.testing.assert_close(bn.running_mean, 0.1 * valid.mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * valid.var(0))
    assert bn.num_batches_tracked.item() == 1 and bn.num_batches_skipped.item() == 0


EMPTY = [  # (layer, empty input): every layer kind, N = 0
    (lambda: batchnorm.BatchNorm1d(4), (0, 4)),
    (lambda: batchnorm.BatchNorm1d(4, backward="paper"), (0, 4, 3)),
    (lambda: batchnorm.BatchNorm2d(4), (0, 4, 2, 2)),
    (lambda: batchnorm.BatchNorm3d(4), (0, 4, 2, 2, 2)),
    (lambda: batchnorm.BatchNorm(4, axis=-1), (0, 3, 4)),
    (lambda: batchnorm.BatchNorm2d(4, virtual_batch_size=2), (0, 4, 2, 2)),
    (lambda: batchnorm.BatchRenorm2d(4), (0, 4, 2, 2)),
    (lambda: batchnorm.SyncBatchNorm(4), (0, 4, 2)),
    (lambda: batchnorm.BatchNorm1d(4, momentum=None), (0, 4)),
]


@pytest.mark.parametrize("make,shape", EMPTY)
def test_empty_batch_in_training_leaves_the_state_alone(make, shape):
    # Defect 8: torch returns an empty output and leaves the statistics alone but counts the
    # batch in num_batches_tracked; we leave the counters alone too (an empty batch is no
    # batch for the cumulative average: tests/test_dropin.py measures the difference).
    layer = make()
    layer(torch.randn(8, *shape[1:]))  # some state to keep
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    skipped = layer.num_batches_skipped.clone()
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(layer.num_batches_skipped, skipped)


def test_eps_is_checked_as_torch_does():
    # Defect 9: eps < 0 is refused at construction; eps = 0 only with population statistics.
    with pytest.raises(ValueError, match="eps must be positive"):
        batchnorm.BatchNorm2d(3, eps=-1.0)
    bn, ref = batchnorm.BatchNorm2d(3, eps=0.0), nn.BatchNorm2d(3, eps=0.0)
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="eps must be positive"):
        bn(x)
    assert bn.num_batches_tracked.item() == 0
    bn.eval(), ref.eval()
    torch.testing.assert_close(bn(x), ref(x))
    with pytest.raises(ValueError, match="eps must be positive"):
        batchnorm.BatchNorm1d(3, eps=0.0, track_running_stats=False).eval()(torch.randn(4, 3))


def test_sync_batch_norm_takes_a_mask():
    # Defect 13: SyncBatchNorm's forward has mask= (here without a process group: BN's).
    x = torch.randn(2, 3, 5)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    x.transpose(1, 2)[~mask] = float("nan")
    sync, plain = batchnorm.SyncBatchNorm(3), batchnorm.BatchNorm1d(3)
    torch.testing.assert_close(sync(x, mask=mask), plain(x, mask=mask), equal_nan=True)
    torch.testing.assert_close(sync.running_var, plain.running_var)
    assert torch.isfinite(sync.running_var).all()


def test_eval_mode_ignores_a_valid_mask_and_rejects_a_wrong_one():
    # Defect 13: Batch Renorm ignores a mask in eval mode as BN does; in eval mode a mask of
    # the wrong shape or dtype is an error, as in training.
    x = torch.randn(4, 3, 5)
    good = torch.rand(4, 5) > 0.3
    for layer in (batchnorm.BatchNorm1d(3), batchnorm.BatchRenorm1d(3)):
        layer(torch.randn(8, 3, 5))
        layer.eval()
        torch.testing.assert_close(layer(x, mask=good), layer(x))
        with pytest.raises(ValueError, match=r"shape without the channel axis, \(4, 5\)"):
            layer(x, mask=torch.ones(4, 3, dtype=torch.bool))
        with pytest.raises(TypeError, match="bool tensor"):
            layer(x, mask=torch.ones(4, 5))
    with pytest.raises(ValueError, match="takes no mask in training"):
        batchnorm.BatchRenorm1d(3)(x, mask=good)


def test_batch_renorm_honours_the_paper_backward():
    # Defect 14: backward="paper" is used (the paper's Function is in the graph) and gives
    # the gradients of the float64 formula with r and d constant, as the native path does.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64, generator=g) * 2 + 1
    dy = torch.randn(8, 3, 2, 2, dtype=torch.float64, generator=g)
    grads = {}
    for backward in ("paper", "native"):
        layer = batchnorm.BatchRenorm2d(3, r_max=1.5, d_max=0.5, backward=backward).double()
        with torch.no_grad():
            layer.running_mean.fill_(0.8)
            layer.running_var.fill_(2.5)
            layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        xi = x.clone().requires_grad_()
        y = layer(xi)
        if backward == "paper":
            assert "BatchNormFunction" in type(y.grad_fn).__name__
            assert "backward='paper'" in repr(layer)
        (y * dy).sum().backward()
        grads[backward] = (y.detach(), xi.grad, layer.weight.grad, layer.bias.grad)
    xb = x.clone().requires_grad_()
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    mu, var = xb.mean((0, 2, 3)), xb.var((0, 2, 3), correction=0)
    sb, s = torch.sqrt(var + 1e-5), torch.sqrt(torch.tensor(2.5, dtype=torch.float64) + 1e-5)
    r = (sb / s).detach().clamp(1 / 1.5, 1.5)
    d = ((mu - 0.8) / s).detach().clamp(-0.5, 0.5)
    c = (slice(None), None, None)
    ref = w[c] * ((xb - mu[c]) / sb[c] * r[c] + d[c]) + b[c]
    (ref * dy).sum().backward()
    for backward in ("paper", "native"):
        for ours, exact in zip(grads[backward], (ref.detach(), xb.grad, w.grad, b.grad)):
            torch.testing.assert_close(ours, exact)


@pytest.mark.parametrize("v", [0, 1, -2, 2.5, True, "4"])
def test_virtual_batch_size_is_checked_at_construction(v):
    # Defect 14: not at the first training batch.
    with pytest.raises(ValueError, match="virtual_batch_size must be an int >= 2"):
        batchnorm.BatchNorm2d(3, virtual_batch_size=v)
    with pytest.raises(ValueError, match="does not implement Ghost BN"):
        batchnorm.BatchRenorm2d(3, virtual_batch_size=4)


def test_reset_running_stats_resets_every_counter():
    # Defect 14: num_batches_skipped too.
    bn = batchnorm.BatchNorm1d(3)
    bn(torch.randn(8, 3))
    bn(torch.full((8, 3), float("nan")))
    assert bn.num_batches_tracked.item() == 1 and bn.num_batches_skipped.item() == 1
    bn.reset_running_stats()
    assert bn.num_batches_tracked.item() == 0 and bn.num_batches_skipped.item() == 0
    assert torch.equal(bn.running_var, torch.ones(3))


def test_cumulative_momentum_compiles_once():
    # Defect 14: momentum=None under torch.compile kept 1/k as a Python float read from the
    # buffer, so every step was a new graph. Now 1/k is a tensor in the graph.
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    bn, ref = batchnorm.BatchNorm1d(3, momentum=None), nn.BatchNorm1d(3, momentum=None)
    compiled = torch.compile(bn, backend=counter)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(8, 3, generator=g) * 2 + 1
        torch.testing.assert_close(compiled(x), ref(x))
    assert counter.frame_count == 1
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert bn.num_batches_tracked.item() == 5


def test_compiled_layer_skips_and_counts_a_non_finite_batch():
    # The commit's tensor form (no read-back under compile): rollback and counters.
    torch._dynamo.reset()
    bn = batchnorm.BatchNorm2d(3)
    compiled = torch.compile(bn, backend="eager")
    compiled(torch.randn(4, 3, 2, 2))
    before = bn.running_mean.clone(), bn.running_var.clone()
    bad = torch.randn(4, 3, 2, 2)
    bad[1, 2, 0, 0] = float("inf")
    compiled(bad)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert bn.num_batches_tracked.item() == 1 and bn.num_batches_skipped.item() == 1


@pytest.mark.parametrize("bad", [None, float("nan"), 3e38])
@pytest.mark.parametrize("momentum", [0.3, None])
def test_fused_kernel_and_commit_step_leave_the_same_state(bad, momentum):
    # torch's kernel doing transform + commit in one call (the fast path) is the transform
    # step followed by the commit step, to the bit on the guard and within rounding else.
    fused = batchnorm.BatchNorm2d(3, momentum=momentum)
    stepwise = batchnorm.BatchNorm2d(3, momentum=momentum)
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        x = torch.randn(4, 3, 2, 2, generator=g) * 2 + 1
        if bad is not None and i == 1:
            x[0, 1, 0, 0], x[1, 1, 0, 0] = bad, -bad
        y = fused(x)
        out, stats = stepwise._transform(x, None)
        stepwise._commit(stats)
        torch.testing.assert_close(y, out, equal_nan=True)
    for name in ("running_mean", "running_var", "num_batches_tracked", "num_batches_skipped"):
        torch.testing.assert_close(getattr(fused, name), getattr(stepwise, name))
    assert fused.num_batches_skipped.item() == (bad is not None)


@pytest.mark.parametrize("kwargs", [{}, {"backward": "paper"}, {"momentum": None}])
def test_vmap_over_an_ensemble_of_layers_commits_each_member(kwargs):
    # The commit's tensor form under torch.func: each member's buffers move (or, for the
    # member with a NaN, stay and count the skip) as the layer alone would.
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    members = [batchnorm.BatchNorm1d(3, **kwargs) for _ in range(3)]
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    x = torch.randn(3, 8, 3, generator=torch.Generator().manual_seed(0))
    x[1, 0, 1] = float("nan")
    vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))(params, buffers, x)
    assert buffers["num_batches_tracked"].tolist() == [1, 0, 1]
    assert buffers["num_batches_skipped"].tolist() == [0, 1, 0]
    assert torch.equal(buffers["running_var"][1], torch.ones(3))
    for i in (0, 2):
        alone = batchnorm.BatchNorm1d(3, **kwargs)
        alone(x[i])
        torch.testing.assert_close(buffers["running_mean"][i], alone.running_mean)
        torch.testing.assert_close(buffers["running_var"][i], alone.running_var)


def test_backward_after_a_skipped_batch_and_after_a_second_call():
    # The rollback of a non-finite batch and a later commit write the buffers as torch's
    # kernel does, without an autograd version bump: torch's kernel saved them for its
    # backward, and a graph that was recorded before must still run.
    bn = batchnorm.BatchNorm1d(3)
    x = torch.randn(8, 3)
    x[0, 0] = float("nan")
    x.requires_grad_()
    bn(x).sum().backward()
    assert bn.num_batches_skipped.item() == 1 and x.grad.shape == x.shape
    z = torch.randn(8, 3, requires_grad=True)
    y1 = bn(z)  # the fused kernel, saving the buffers
    y2 = bn(z.unsqueeze(-1) * 2, mask=torch.ones(8, 1, dtype=torch.bool))  # then the commit
    (y1.sum() + y2.sum()).backward()
    assert bn.num_batches_tracked.item() == 2 and z.grad.shape == z.shape


@pytest.mark.parametrize("training", [True, False])
def test_a_parameter_replaced_by_a_plain_tensor_is_used(training):
    # `del bn.weight; bn.weight = w` (how functional and double-backward code sets
    # parameters per call): every engine reads the tensor the attribute holds.
    torch.manual_seed(0)
    bn = batchnorm.BatchNorm2d(3).train(training)
    ref = nn.BatchNorm2d(3).train(training)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    del bn.weight, bn.bias
    bn.weight, bn.bias = w, b
    with torch.no_grad():
        ref.weight.copy_(w), ref.bias.copy_(b)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_var, ref.running_var)
