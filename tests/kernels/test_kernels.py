"""The Triton kernels against torch.nn's BN (+ activation, + residual) under the interpreter:
outputs, gradients and running statistics for every layout, dtype and activation, both launch
plans, odd sizes, the non-finite guard, empty batches, momentum=None and memory saving."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as tF

from batchnorm import kernels
from batchnorm.functional import running
from batchnorm.kernels import heuristics

LAYOUTS = {  # name -> (shape, memory format)
    "NCHW": ((4, 3, 5, 7), torch.contiguous_format),
    "channels_last": ((4, 3, 5, 7), torch.channels_last),
    "NCDHW": ((2, 3, 3, 4, 5), torch.contiguous_format),
    "NDHWC": ((2, 3, 3, 4, 5), torch.channels_last_3d),
    "(N, C)": ((37, 5), torch.contiguous_format),
    "(N, C, L)": ((6, 4, 19), torch.contiguous_format),
}
ACTIVATIONS = ["identity", "relu", "leaky_relu"]
SLOPE = 0.2
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # relative to max |ref|


@pytest.fixture(params=["one launch", "two launches"])
def path(request, monkeypatch):
    """Run a test with the one-program plan, or the split plan with many small tiles."""
    if request.param == "two launches":
        monkeypatch.setattr(heuristics, "SINGLE_LAUNCH_MAX", 0)
        monkeypatch.setattr(heuristics, "TILE", 64)
        monkeypatch.setattr(heuristics, "MIN_BLOCK_C", 2)
        monkeypatch.setattr(heuristics, "MAX_BLOCK_C", 32)
    return request.param


def make(shape, fmt=torch.contiguous_format, dtype=torch.float32, seed=0, residual=False):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype).contiguous(memory_format=fmt)
    p = dict(
        weight=torch.randn(c, generator=g) + 1.0,
        bias=torch.randn(c, generator=g),
        running_mean=torch.randn(c, generator=g),
        running_var=torch.rand(c, generator=g) + 0.5,
    )
    r = torch.randn(shape, generator=g).to(dtype) if residual else None
    grad = torch.randn(shape, generator=g).to(dtype)
    return x, p, r, grad


def reference(x, p, r, grad, training, activation, momentum=0.1, eps=1e-5):
    """torch.nn.functional in float64: output, grads (x, weight, bias, residual), new stats."""
    leaves = [t.detach().double().requires_grad_() for t in (x, p["weight"], p["bias"])]
    res = None if r is None else r.detach().double().requires_grad_()
    rm, rv = p["running_mean"].double(), p["running_var"].double()
    y = tF.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training, momentum, eps)
    if res is not None:
        y = y + res
    y = {"identity": y, "relu": tF.relu(y), "leaky_relu": tF.leaky_relu(y, SLOPE)}[activation]
    y.backward(grad.double())
    grads = [t.grad for t in leaves] + [None if res is None else res.grad]
    return y.detach(), grads, rm, rv


def ours(x, p, r, grad, training, activation, memory_saving=False, momentum=0.1, counters=None):
    leaves = [t.detach().clone().requires_grad_() for t in (x, p["weight"], p["bias"])]
    res = None if r is None else r.detach().clone().requires_grad_()
    rm, rv = p["running_mean"].clone(), p["running_var"].clone()
    nbt, nbs = counters if counters is not None else (torch.tensor(0), torch.tensor(0))
    y = kernels.batch_norm_act(
        leaves[0],
        leaves[1],
        leaves[2],
        rm,
        rv,
        nbt,
        nbs,
        training=training,
        momentum=momentum,
        activation=activation,
        negative_slope=SLOPE,
        residual=res,
        memory_saving=memory_saving,
    )
    y.backward(grad)
    grads = [t.grad for t in leaves] + [None if res is None else res.grad]
    return y.detach(), grads, rm, rv, (nbt, nbs)


def close(actual, expected, dtype, what):
    scale = expected.abs().max().item() + 1e-6
    err = (actual.double() - expected).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def check_parity(shape, fmt, dtype, activation, residual, training=True, seed=0):
    x, p, r, grad = make(shape, fmt, dtype, seed, residual)
    y_ref, g_ref, rm_ref, rv_ref = reference(x, p, r, grad, training, activation)
    y, g, rm, rv, (nbt, nbs) = ours(x, p, r, grad, training, activation)
    assert y.dtype == x.dtype and y.stride() == x.stride()
    close(y, y_ref, dtype, "output")
    for name, a, b in zip(("input", "weight", "bias", "residual"), g, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == (x.dtype if name in ("input", "residual") else torch.float32)
            close(a, b, dtype, f"grad {name}")
    close(rm, rm_ref, dtype, "running_mean")
    close(rv, rv_ref, dtype, "running_var")
    assert (nbt.item(), nbs.item()) == ((1, 0) if training else (0, 0))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_parity(layout, activation, path):
    shape, fmt = LAYOUTS[layout]
    check_parity(shape, fmt, torch.float32, activation, residual=activation == "relu")


@pytest.mark.parametrize("layout", ["NCHW", "channels_last", "(N, C)"])
@pytest.mark.parametrize("activation", ["identity", "leaky_relu"])
def test_residual_with_every_activation(layout, activation, path):
    shape, fmt = LAYOUTS[layout]
    check_parity(shape, fmt, torch.float32, activation, residual=True)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_eval_parity(layout, activation):
    shape, fmt = LAYOUTS[layout]
    check_parity(shape, fmt, torch.float32, activation, residual=True, training=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["NCHW", "channels_last", "(N, C)"])
def test_half_precision_input_float32_statistics(layout, dtype, path):
    shape, fmt = LAYOUTS[layout]
    check_parity(shape, fmt, dtype, "relu", residual=True)
    check_parity(shape, fmt, dtype, "leaky_relu", residual=False, training=False)


ODD = {  # sizes that are not multiples of any block
    "C = 1": ((7, 1, 3, 3), torch.contiguous_format),
    "C = 1, channels_last": ((7, 1, 3, 3), torch.channels_last),
    "1x1 spatial": ((9, 4, 1, 1), torch.contiguous_format),
    "1x1 spatial, channels_last": ((9, 4, 1, 1), torch.channels_last),
    "70 channels (several channel blocks)": ((3, 70, 3, 1), torch.channels_last),
    "(N, C) with 70 channels": ((5, 70), torch.contiguous_format),
    "batch of one": ((1, 3, 5, 3), torch.contiguous_format),
}


@pytest.mark.parametrize("case", list(ODD))
def test_odd_sizes(case, path):
    shape, fmt = ODD[case]
    check_parity(shape, fmt, torch.float32, "relu", residual=True)


def test_strided_input_is_read_through_its_strides():
    base, p, r, grad = make((4, 3, 10, 7))
    # A batch slice is read through its strides; a spatial slice and permuted spatial dims
    # do not flatten into one stride and are copied once inside: the same results either way.
    for inp in (base[::2], base[:, :, ::2], base.transpose(2, 3)):
        g = torch.randn(inp.shape)
        y_ref, g_ref, rm_ref, _ = reference(inp, p, None, g, True, "relu")
        y, g_ours, rm, _, _ = ours(inp, p, None, g, True, "relu")
        close(y, y_ref, torch.float32, "output")
        close(g_ours[0], g_ref[0], torch.float32, "grad input")
        close(rm, rm_ref, torch.float32, "running_mean")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the interpreted inf - inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch_is_skipped_and_counted(bad, path):
    x, p, _, _ = make((4, 3, 5, 5))
    x[1, 2, 3, 4] = bad
    rm, rv = p["running_mean"].clone(), p["running_var"].clone()
    nbt, nbs = torch.tensor(5), torch.tensor(0)
    y = kernels.batch_norm_act(x, p["weight"], p["bias"], rm, rv, nbt, nbs, momentum=0.1)
    assert torch.equal(rm, p["running_mean"]) and torch.equal(rv, p["running_var"])
    assert (nbt.item(), nbs.item()) == (5, 1)
    assert not torch.isfinite(y[:, 2]).any()  # the output still shows the bad batch
    # the next finite batch is tracked again
    kernels.batch_norm_act(x.nan_to_num(0.0, 0.0, 0.0), None, None, rm, rv, nbt, nbs)
    assert (nbt.item(), nbs.item()) == (6, 1)
    assert not torch.equal(rm, p["running_mean"])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_overflowing_running_variance_is_skipped():
    # Finite input whose variance overflows float32: the new running_var would be inf.
    x = torch.tensor([[-3e38, 0.0], [3e38, 0.0], [0.0, 1.0]])
    rm, rv, nbt, nbs = torch.zeros(2), torch.ones(2), torch.tensor(0), torch.tensor(0)
    kernels.batch_norm_act(x, None, None, rm, rv, nbt, nbs)
    assert torch.equal(rv, torch.ones(2)) and (nbt.item(), nbs.item()) == (0, 1)


def test_no_host_synchronization_in_training(monkeypatch):
    # Reading a device value back (item, bool, tolist) is what would synchronize on a GPU:
    # the kernels' training forward and backward, and the commit of the running statistics
    # (guard and momentum=None included) in the form it takes for a CUDA tensor, never do.
    x, p, r, grad = make((4, 3, 5, 5), residual=True)
    monkeypatch.setattr(running, "host_readable", lambda t: t.is_cuda)  # as on a GPU

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a device value")

    x.requires_grad_()
    nbt, nbs = torch.tensor(2), torch.tensor(0)
    for name in ("item", "__bool__", "tolist", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    y = kernels.batch_norm_act(
        x,
        p["weight"],
        p["bias"],
        p["running_mean"],
        p["running_var"],
        nbt,
        nbs,
        momentum=None,
        activation="relu",
        residual=r,
    )
    y.backward(grad)
    monkeypatch.undo()
    assert nbt.item() == 3 and nbs.item() == 0 and x.grad is not None


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(training):
    x, p, r, _ = make((0, 3, 4, 4), residual=True)
    x.requires_grad_()
    w = p["weight"].clone().requires_grad_()
    rm, rv = p["running_mean"].clone(), p["running_var"].clone()
    nbt, nbs = torch.tensor(4), torch.tensor(1)
    y = kernels.batch_norm_act(x, w, None, rm, rv, nbt, nbs, training=training, residual=r)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(3))
    assert torch.equal(rm, p["running_mean"]) and torch.equal(rv, p["running_var"])
    assert (nbt.item(), nbs.item()) == (4, 1)


def test_momentum_none_is_the_cumulative_average(path):
    torch_bn = torch.nn.BatchNorm2d(3, momentum=None)
    rm, rv, nbt, nbs = torch.zeros(3), torch.ones(3), torch.tensor(0), torch.tensor(0)
    for seed in range(3):
        x, _, _, _ = make((4, 3, 5, 5), seed=seed)
        torch_bn(x)
        kernels.batch_norm_act(x, None, None, rm, rv, nbt, nbs, momentum=None)
    torch.testing.assert_close(rm, torch_bn.running_mean)
    torch.testing.assert_close(rv, torch_bn.running_var)
    assert nbt.item() == torch_bn.num_batches_tracked.item() == 3


def test_no_running_statistics():
    # track_running_stats=False: batch statistics in both modes, nothing to update.
    x, p, _, grad = make((4, 3, 5, 5))
    y_ref = tF.batch_norm(x, None, None, p["weight"], p["bias"], True)
    for training in (True, False):
        y = kernels.batch_norm_act(x, p["weight"], p["bias"], training=training)
        torch.testing.assert_close(y, y_ref)


@pytest.mark.parametrize("activation", ["identity", "leaky_relu"])
@pytest.mark.parametrize("layout", ["NCHW", "channels_last", "(N, C)"])
def test_memory_saving_gradients_equal_the_standard_ones(layout, activation, path):
    shape, fmt = LAYOUTS[layout]
    x, p, _, grad = make(shape, fmt)
    for training in (True, False):
        _, g_std, *_ = ours(x, p, None, grad, training, activation)
        _, g_mem, *_ = ours(x, p, None, grad, training, activation, memory_saving=True)
        for a, b in zip(g_mem[:3], g_std[:3]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_memory_saving_bfloat16_gradients_within_tolerance():
    x, p, _, grad = make((8, 4, 6, 6), torch.channels_last, torch.bfloat16)
    _, g_ref, *_ = reference(x, p, None, grad, True, "leaky_relu")
    _, g_mem, *_ = ours(x, p, None, grad, True, "leaky_relu", memory_saving=True)
    for a, b, name in zip(g_mem[:3], g_ref[:3], ("input", "weight", "bias")):
        close(a, b, torch.bfloat16, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rebuilt_xhat_within_the_documented_bound(dtype):
    # docs/kernels.md: |xhat' - xhat| <= u_z * (|xhat| + |beta| / |gamma|), u_z the unit
    # roundoff of z's dtype, for xhat' rebuilt from the kernel's output z.
    x, p, _, _ = make((16, 3, 4, 4), dtype=dtype)
    p["weight"] = torch.tensor([0.01, -0.5, 3.0])  # small, negative and large gammas
    p["bias"] = torch.tensor([0.7, -2.0, 0.1])
    z = kernels.batch_norm_act(
        x, p["weight"], p["bias"], activation="leaky_relu", negative_slope=SLOPE
    ).double()
    x64 = x.double()
    mean, var = x64.mean((0, 2, 3), keepdim=True), x64.var((0, 2, 3), False, keepdim=True)
    xhat = (x64 - mean) / torch.sqrt(var + 1e-5)
    gamma, beta = p["weight"].double().view(1, 3, 1, 1), p["bias"].double().view(1, 3, 1, 1)
    u = torch.where(z > 0, z, z / SLOPE)
    rebuilt = (u - beta) / gamma
    # u_z; bfloat16 doubled: the interpreter truncates float32 -> bfloat16, GPUs round
    unit = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7}[dtype]
    bound = unit * (xhat.abs() + beta.abs() / gamma.abs()) + 1e-5 / gamma.abs()  # + float32
    assert ((rebuilt - xhat).abs() <= bound).all()


def _saved_storages(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.untyped_storage().data_ptr()) or t, lambda t: t
    ):
        fn()
    return saved


def test_memory_saving_keeps_the_output_not_the_input():
    x, p, _, _ = make((4, 3, 5, 5))
    x.requires_grad_()
    w, b = p["weight"].requires_grad_(), p["bias"].requires_grad_()
    ptr = x.untyped_storage().data_ptr()
    call = dict(activation="leaky_relu", negative_slope=SLOPE)
    assert ptr in _saved_storages(lambda: kernels.batch_norm_act(x, w, b, **call))
    assert ptr not in _saved_storages(
        lambda: kernels.batch_norm_act(x, w, b, memory_saving=True, **call)
    )
    # gamma near zero: xhat = (u - beta) / gamma is not recoverable, so x is kept instead
    w_small = w.detach().clone()
    w_small[1] = 0.0
    w_small.requires_grad_()
    assert ptr in _saved_storages(
        lambda: kernels.batch_norm_act(x, w_small, b, memory_saving=True, **call)
    )
    assert not kernels.gamma_invertible(w_small) and kernels.gamma_invertible(w)


def test_memory_saving_with_zero_gamma_is_exact():
    # A zero-initialised gamma (ResNet's last BN in a block) must still learn: dl/dgamma
    # needs xhat, which the output of a gamma = 0 channel does not carry.
    x, p, _, grad = make((4, 3, 5, 5))
    p["weight"][0] = 0.0
    y_ref, g_ref, *_ = reference(x, p, None, grad, True, "leaky_relu")
    _, g_mem, *_ = ours(x, p, None, grad, True, "leaky_relu", memory_saving=True)
    assert g_mem[1][0] != 0
    for a, b, name in zip(g_mem[:3], g_ref[:3], ("input", "weight", "bias")):
        close(a, b, torch.float32, name)


def test_gradients_are_deterministic(path):
    x, p, r, grad = make((4, 3, 5, 5), torch.channels_last, residual=True)
    runs = [ours(x, p, r, grad, True, "relu")[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


BAD_CALLS = [
    ("float64", dict(dtype=torch.float64), TypeError, "float32, float16 or bfloat16"),
    ("relu memory saving", dict(activation="relu", memory_saving=True), ValueError, "invertible"),
    (
        "residual memory saving",
        dict(residual=True, memory_saving=True),
        ValueError,
        "takes no residual",
    ),
    (
        "negative slope",
        dict(activation="leaky_relu", negative_slope=-0.1),
        ValueError,
        "negative_slope >= 0",
    ),
    ("unknown activation", dict(activation="gelu"), ValueError, "activation must be one of"),
    ("one value per channel", dict(shape=(1, 3)), ValueError, "more than 1 value per channel"),
    ("weight shape", dict(weight_shape=(4,)), ValueError, r"weight of shape \(3,\)"),
    ("residual shape", dict(residual_shape=(2, 3, 4)), ValueError, "residual of the input"),
]


@pytest.mark.parametrize("name,kw,error,match", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_calls_say_what_was_expected(name, kw, error, match):
    shape = kw.pop("shape", (2, 3, 4, 4))
    x = torch.randn(shape, dtype=kw.pop("dtype", torch.float32))
    weight = torch.ones(kw.pop("weight_shape", (3,)))
    if kw.pop("residual", False):
        kw["residual"] = torch.randn(shape)
    if "residual_shape" in kw:
        kw["residual"] = torch.randn(kw.pop("residual_shape"))
    with pytest.raises(error, match=match):
        kernels.batch_norm_act(x, weight, None, torch.zeros(3), torch.ones(3), **kw)


def test_supports():
    assert kernels.is_available()
    assert kernels.supports(torch.randn(2, 3))  # CPU tensors under TRITON_INTERPRET=1
    assert not kernels.supports(torch.randn(2, 3, dtype=torch.float64))
    assert not kernels.supports(torch.randn(3))


def test_double_backward_through_memory_saving_is_refused():
    # x was not kept, so gradients cannot be differentiated with respect to it.
    x, p, _, _ = make((4, 3, 5, 5))
    x.requires_grad_()
    y = kernels.batch_norm_act(x, p["weight"], p["bias"], memory_saving=True)
    with pytest.raises(RuntimeError, match="double backward .* memory_saving=True"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


# Regressions of an audit of the kernels (issue 16); each failed before its fix.


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's float16 overflow, interpreted
def test_guard_checks_what_half_precision_buffers_store(path):
    # float16 running buffers: a std-1000 batch gives running_var ~ 1e5, finite in float32 but
    # inf once stored in float16 (max 65504): skipped and counted, as the torch path does.
    x = (torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 1000).half()
    rm, rv = torch.zeros(3, dtype=torch.float16), torch.ones(3, dtype=torch.float16)
    nbt, nbs = torch.tensor(0), torch.tensor(0)
    kernels.batch_norm_act(x, None, None, rm, rv, nbt, nbs)
    assert torch.equal(rm, torch.zeros(3, dtype=torch.float16))
    assert torch.equal(rv, torch.ones(3, dtype=torch.float16))
    assert (nbt.item(), nbs.item()) == (0, 1)


def _saved_input(x, **call):
    x = x.detach().requires_grad_()
    ptr = x.untyped_storage().data_ptr()
    return ptr in _saved_storages(lambda: kernels.batch_norm_act(x, **call))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_memory_saving_keeps_x_where_the_rebuild_loses_digits(dtype):
    # gamma 2e-3..1e-2 with beta = 1: z = gamma * xhat + beta keeps few digits of xhat in 16
    # bits (the rebuilt dl/dgamma was off by up to 8x in bfloat16). Such a call keeps x.
    x, p, _, grad = make((8, 3, 6, 6), dtype=dtype)
    p["weight"], p["bias"] = torch.tensor([2e-3, 5e-3, 1e-2]), torch.ones(3)
    _, g_std, *_ = ours(x, p, None, grad, True, "leaky_relu")
    _, g_mem, *_ = ours(x, p, None, grad, True, "leaky_relu", memory_saving=True)
    for a, b in zip(g_mem[:3], g_std[:3]):
        assert torch.equal(a, b)
    assert _saved_input(
        x, weight=p["weight"], bias=p["bias"], activation="identity", memory_saving=True
    )
    assert not kernels.gamma_invertible(p["weight"], bias=p["bias"], dtype=dtype)
    assert kernels.gamma_invertible(p["weight"], bias=p["bias"], dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_memory_saving_dgamma_within_the_documented_bound(dtype):
    # docs/kernels.md: memory saving is taken where |gamma| >= GAMMA_MIN and
    # u_z |beta| <= XHAT_TOL |gamma|; then |xhat' - xhat| <= u_z |xhat| + XHAT_TOL and
    # |dgamma' - dgamma| <= u_z sum |dy' xhat| + XHAT_TOL sum |dy'| (float32 rounding aside).
    from batchnorm.kernels import function

    unit = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    x, p, _, grad = make((8, 4, 6, 6), dtype=dtype)
    gamma = torch.tensor([0.5, -2.0, 1.0, 0.05])
    p["weight"] = gamma
    p["bias"] = gamma.abs() * (function.XHAT_TOL / unit) * torch.tensor([1.0, -1.0, 0.5, 1.0])
    assert not _saved_input(
        x, weight=p["weight"], bias=p["bias"], activation="leaky_relu", memory_saving=True
    )
    _, g_mem, *_ = ours(x, p, None, grad, True, "leaky_relu", memory_saving=True)
    _, g_ref, *_ = reference(x, p, None, grad, True, "leaky_relu")
    x64 = x.double()
    xhat = (x64 - x64.mean((0, 2, 3), True)) / (x64.var((0, 2, 3), False, True) + 1e-5).sqrt()
    u = xhat * gamma.double().view(1, 4, 1, 1) + p["bias"].double().view(1, 4, 1, 1)
    dyp = torch.where(u > 0, grad.double(), SLOPE * grad.double())
    # the interpreter truncates float32 -> bfloat16 (GPUs round): twice the error there
    k = 2.0 if dtype == torch.bfloat16 else 1.0
    bound = k * (unit * (dyp * xhat).abs().sum((0, 2, 3)) + function.XHAT_TOL * dyp.abs().sum(
        (0, 2, 3)
    )) + 1e-5 * (dyp * xhat).abs().sum((0, 2, 3))
    assert ((g_mem[1].double() - g_ref[1]).abs() <= bound).all()


@pytest.mark.parametrize("training", [True, False])
def test_strided_per_channel_tensors_are_honoured(training):
    # weight, bias and running statistics as every other entry of a (2C,) tensor: read and
    # written through their strides; the entries in between are never touched.
    x, p, _, grad = make((4, 3, 5, 5))

    def interleave(t):  # (C,) -> (2C,) whose even entries are t, odd entries 7
        return torch.stack([t, torch.full_like(t, 7.0)], 1).reshape(-1)

    w2, b2 = interleave(p["weight"]).requires_grad_(), interleave(p["bias"]).requires_grad_()
    rm2, rv2 = interleave(p["running_mean"]), interleave(p["running_var"])
    xs = x.clone().requires_grad_()
    nbt, nbs = torch.tensor(0), torch.tensor(0)
    y = kernels.batch_norm_act(
        xs, w2[::2], b2[::2], rm2[::2], rv2[::2], nbt, nbs, training=training,
        activation="relu",
    )  # fmt: skip
    y.backward(grad)
    y_ref, g_ref, rm_ref, rv_ref = reference(x, p, None, grad, training, "relu")
    close(y, y_ref, torch.float32, "output")
    close(xs.grad, g_ref[0], torch.float32, "grad input")
    close(w2.grad[::2], g_ref[1], torch.float32, "grad weight")
    close(b2.grad[::2], g_ref[2], torch.float32, "grad bias")
    close(rm2[::2], rm_ref, torch.float32, "running_mean")
    close(rv2[::2], rv_ref, torch.float32, "running_var")
    assert (rm2[1::2] == 7).all() and (rv2[1::2] == 7).all()
    assert (w2.grad[1::2] == 0).all() and (b2.grad[1::2] == 0).all()


def test_half_input_with_float32_residual_promotes_like_torch(path):
    # torch: BN(x) in float16, + a float32 residual -> float32. The kernels give the same dtype.
    x, p, _, grad = make((4, 3, 5, 5), dtype=torch.float16)
    r = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    y_ref, g_ref, *_ = reference(x, p, r, grad.float(), True, "relu")
    y, g, *_ = ours(x, p, r, grad.float(), True, "relu")
    assert y.dtype == torch.float32 and g[0].dtype == torch.float16 and g[3].dtype == torch.float32
    close(y, y_ref, torch.float16, "output")
    for name, a, b in zip(("input", "weight", "bias", "residual"), g, g_ref):
        close(a, b, torch.float16, f"grad {name}")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 3, 0, 5), (4, 0, 5, 5), (4, 0)])
def test_empty_spatial_size_or_no_channels(shape, training):
    # Nothing to normalize: an empty output, as the torch path gives; buffers untouched.
    c = shape[1]
    x = torch.randn(shape, requires_grad=True)
    w, b = torch.randn(c, requires_grad=True), torch.randn(c, requires_grad=True)
    rm, rv, nbt, nbs = torch.zeros(c), torch.ones(c), torch.tensor(4), torch.tensor(1)
    r = torch.randn(shape, dtype=torch.float64)
    y = kernels.batch_norm_act(
        x, w, b, rm, rv, nbt, nbs, training=training, activation="relu", residual=r.float()
    )
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(c))
    assert torch.equal(rm, torch.zeros(c)) and torch.equal(rv, torch.ones(c))
    assert (nbt.item(), nbs.item()) == (4, 1)


def _torch_act(y, activation):
    return {"identity": y, "relu": tF.relu(y), "leaky_relu": tF.leaky_relu(y, SLOPE)}[activation]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_double_backward_matches_float64(activation, training):
    # create_graph=True: the gradients are themselves differentiable (torch's BN supports it).
    x, p, r, grad = make((4, 3, 3, 3), residual=True)
    g = torch.Generator().manual_seed(5)
    v = [torch.randn(t.shape, generator=g) for t in (x, p["weight"], p["bias"], r)]
    results = []
    for dtype in (torch.float32, torch.float64):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, p["weight"], p["bias"], r)]
        rm, rv = p["running_mean"].to(dtype), p["running_var"].to(dtype)
        if dtype == torch.float32:
            y = kernels.batch_norm_act(
                leaves[0], leaves[1], leaves[2], rm, rv, training=training,
                activation=activation, negative_slope=SLOPE, residual=leaves[3],
            )  # fmt: skip
        else:
            y = tF.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training)
            y = _torch_act(y + leaves[3], activation)
        first = torch.autograd.grad(y, leaves, grad.to(dtype), create_graph=True)
        s = sum(((f * t.to(dtype)).sum() for f, t in zip(first, v)), torch.zeros((), dtype=dtype))
        second = torch.autograd.grad(s, leaves, allow_unused=True, materialize_grads=True)
        results.append([t.detach() for t in (*first, *second)])
    for a, b in zip(*results):
        close(a, b, torch.float32, "second-order")


@pytest.mark.parametrize("memory_saving", [False, True])
def test_batched_grads(memory_saving):
    # torch.autograd.grad(..., is_grads_batched=True) vmaps the backward over grad_outputs.
    x, p, r, grad = make((4, 3, 3, 3), residual=not memory_saving)
    tensors = (x, p["weight"], p["bias"]) + ((r,) if r is not None else ())
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    y = kernels.batch_norm_act(
        leaves[0], leaves[1], leaves[2], activation="leaky_relu", negative_slope=SLOPE,
        residual=None if memory_saving else leaves[3], memory_saving=memory_saving,
    )  # fmt: skip
    grads = torch.randn(3, *y.shape, generator=torch.Generator().manual_seed(1))
    batched = torch.autograd.grad(y, leaves, grads, retain_graph=True, is_grads_batched=True)
    for i in range(3):
        one = torch.autograd.grad(y, leaves, grads[i], retain_graph=True)
        for a, b in zip(batched, one):
            torch.testing.assert_close(a[i], b, atol=1e-5, rtol=1e-5)


def test_forward_mode_ad_is_refused_with_a_reason():
    from torch.autograd import forward_ad

    x, p, _, _ = make((4, 3, 3, 3))
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(ValueError, match="forward-mode AD"):
            kernels.batch_norm_act(dual, p["weight"], p["bias"])


def test_huge_address_span_is_refused_by_supports_and_copied_by_the_launchers(huge_view):
    # 24 values spread over 2^31 + 12 addresses (the kernels index with int32).
    x = huge_view
    assert x.numel() < 2**31 and not kernels.supports(x)
    y = kernels.batch_norm_act(x, None, None)
    close(y, tF.batch_norm(x.double(), None, None, training=True), torch.float16, "output")


@pytest.mark.parametrize(
    "activation,memory_saving", [("identity", False), ("leaky_relu", False)]
)
def test_output_added_to_in_place_keeps_backward(activation, memory_saving):
    # `out = act(bn(x)); out += x`: torch's BN and leaky_relu save their inputs, not this out.
    x, p, _, grad = make((4, 3, 5, 5))
    results = []
    for run in ("kernels", "torch"):
        xs, w, b = (t.detach().clone().requires_grad_() for t in (x, p["weight"], p["bias"]))
        if run == "kernels":
            out = kernels.batch_norm_act(
                xs, w, b, activation=activation, negative_slope=SLOPE,
                memory_saving=memory_saving,
            )  # fmt: skip
        else:
            out = _torch_act(tF.batch_norm(xs, None, None, w, b, True), activation)
        out += xs
        out.backward(grad)
        results.append((out.detach(), xs.grad, w.grad, b.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_memory_saving_output_changed_in_place_is_refused_clearly():
    # memory saving keeps only the output (the contract of torch's in-place activations):
    # changing it in place leaves nothing to rebuild x from; the error says so.
    x, p, _, grad = make((4, 3, 5, 5))
    xs = x.clone().requires_grad_()
    out = kernels.batch_norm_act(xs, p["weight"], p["bias"], memory_saving=True)
    out += xs
    with pytest.raises(RuntimeError, match="memory_saving"):
        out.backward(grad)


@pytest.mark.parametrize("training", [True, False])
def test_large_mean_keeps_float32_digits(training, path):
    # |mean| / std = 1e3: x * scale + shift cancels ~3 digits (1.4e-4 error); (x - mean) *
    # (invstd * gamma) + beta with a mean rounded once keeps them, as torch does (2.5e-5
    # here: half an ulp of 1000 is 3.1e-5).
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + 1000.0
    rm, rv = torch.full((3,), 1000.0), torch.ones(3)
    y = kernels.batch_norm_act(x, None, None, rm.clone(), rv.clone(), training=training)
    x64 = x.double()
    y_ref = tF.batch_norm(x64, rm.double(), rv.double(), None, None, training)
    assert (y.double() - y_ref).abs().max().item() < 3.1e-5
