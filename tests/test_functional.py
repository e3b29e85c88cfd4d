"""Algorithm 1's pure core against independent oracles: a float64 one-line formula, gradcheck,
torch's kernel, and torch.func transforms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchnorm import functional as F

BACKWARDS = ["native", "paper"]

# (shape, channel axis): per activation, per feature map (Sec. 3.2), channels-last, 3d.
CASES = [
    ((60, 10), 1),
    ((8, 5, 7), 1),
    ((4, 3, 5, 6), 1),
    ((4, 6, 5, 3), -1),
    ((2, 3, 4, 2, 3), 1),
    ((5, 7, 4), 2),
]


def reference(x, gamma, beta, eps, axis):
    """Algorithm 1 in float64, one formula: gamma * (x - mu_B) / sqrt(sigma2_B + eps) + beta."""
    x = x.double()
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    shape = [1] * x.dim()
    shape[axis] = -1
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    return gamma.double().reshape(shape) * (x - mu) / torch.sqrt(var + eps) + beta.double().reshape(
        shape
    )


def make(shape, axis, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[axis]
    x = (torch.randn(shape, generator=g) * 3 + 2).to(dtype)
    gamma = torch.rand(c, generator=g) + 0.5
    beta = torch.randn(c, generator=g)
    return x, gamma, beta


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("shape,axis", CASES)
def test_training_output_matches_float64_formula(shape, axis, backward):
    x, gamma, beta = make(shape, axis)
    c = shape[axis]
    out = F.batch_norm(
        x, torch.zeros(c), torch.ones(c), gamma, beta, True, 0.1, 1e-5, axis=axis, backward=backward
    )
    torch.testing.assert_close(
        out.output.double(), reference(x, gamma, beta, 1e-5, axis), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("shape,axis", CASES)
def test_running_statistics_follow_the_stated_convention(shape, axis, backward):
    # running = (1 - momentum) * running + momentum * batch, variance stored unbiased.
    x, gamma, beta = make(shape, axis)
    c = shape[axis]
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    out = F.batch_norm(x, rm, rv, gamma, beta, True, 0.3, 1e-5, axis=axis, backward=backward)
    xm = x.double().movedim(axis, -1).reshape(-1, c)
    torch.testing.assert_close(
        out.running_mean.double(), 0.7 * rm0.double() + 0.3 * xm.mean(0), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        out.running_var.double(),
        0.7 * rv0.double() + 0.3 * xm.var(0, correction=1),
        rtol=1e-5,
        atol=1e-6,
    )
    # Pure: the arguments are untouched.
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert bool(out.updated)


@pytest.mark.parametrize("shape,axis", CASES)
def test_backward_paths_agree_with_each_other_and_float64(shape, axis):
    x, gamma, beta = make(shape, axis)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    grads = {}
    for backward in BACKWARDS + ["float64"]:
        dtype = torch.float64 if backward == "float64" else torch.float32
        xi = x.to(dtype).detach().clone().requires_grad_()
        gi = gamma.to(dtype).detach().clone().requires_grad_()
        bi = beta.to(dtype).detach().clone().requires_grad_()
        if backward == "float64":
            y = reference(xi, gi, bi, 1e-5, axis)
        else:
            y = F.batch_norm(xi, None, None, gi, bi, True, axis=axis, backward=backward).output
        y.backward(grad.to(dtype))
        grads[backward] = [t.grad.double() for t in (xi, gi, bi)]
    for backward in BACKWARDS:
        for ours, exact in zip(grads[backward], grads["float64"]):
            torch.testing.assert_close(ours, exact, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("affine", [True, False])
def test_paper_backward_passes_gradcheck(affine):
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True) + 0.5 if affine else None
    b = torch.randn(3, dtype=torch.float64, requires_grad=True) if affine else None

    def f(x, w, b):
        return F.BatchNormFunction.apply(x, w, b, 1e-5)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_eval_is_one_affine_map_per_channel():
    # Algorithm 2, step 3: y = gamma/sqrt(Var+eps) * x + (beta - gamma E[x]/sqrt(Var+eps)).
    x, gamma, beta = make((10, 4, 3), 1)
    rm, rv = torch.randn(4), torch.rand(4) + 0.1
    y = F.batch_norm(x, rm, rv, gamma, beta, False, eps=1e-3).output
    expected = (gamma / torch.sqrt(rv + 1e-3))[:, None] * x + (
        beta - gamma * rm / torch.sqrt(rv + 1e-3)
    )[:, None]
    torch.testing.assert_close(y, expected)
    scale, shift = F.inference_affine(rm, rv, gamma, beta, 1e-3)
    torch.testing.assert_close(y, scale[:, None] * x + shift[:, None])


def test_variance_is_stable_with_large_offsets():
    # 1e4 + N(0, 1) in float32: E[x^2] - E[x]^2 loses every digit; two passes keep them.
    g = torch.Generator().manual_seed(0)
    x = 1e4 + torch.randn(256, 8, 16, generator=g)
    naive_var = (x * x).mean((0, 2)) - x.mean((0, 2)) ** 2
    exact = reference(x, torch.ones(8), torch.zeros(8), 1e-5, 1)
    naive = (x - x.mean((0, 2), keepdim=True)) / torch.sqrt(naive_var.clamp_min(0) + 1e-5)[:, None]
    assert (naive.double() - exact).abs().max() > 1e-2  # the check can fail
    for backward in BACKWARDS:
        y = F.batch_norm(x, None, None, training=True, backward=backward).output
        assert (y.double() - exact).abs().max() < 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backward", BACKWARDS)
def test_half_input_float32_statistics(dtype, backward):
    x, gamma, beta = make((64, 6, 5), 1, dtype=dtype)
    rm, rv = torch.zeros(6), torch.ones(6)
    out = F.batch_norm(x, rm, rv, gamma, beta, True, backward=backward)
    assert out.output.dtype == dtype
    assert out.running_mean.dtype == torch.float32 and out.running_var.dtype == torch.float32
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(
        out.output.double(), reference(x, gamma, beta, 1e-5, 1), atol=tol, rtol=tol
    )
    xs = x.double().transpose(0, 1).reshape(6, -1)
    torch.testing.assert_close(out.running_mean.double(), 0.1 * xs.mean(1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e38])
def test_non_finite_batch_never_poisons_running_statistics(backward, bad):
    x = torch.randn(16, 4)
    x[3, 2] = bad
    if bad == 3e38:
        x[5, 2] = -3e38  # finite values whose variance overflows
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    out = F.batch_norm(x, rm, rv, None, None, True, backward=backward)
    assert not bool(out.updated)
    assert torch.equal(out.running_mean, rm) and torch.equal(out.running_var, rv)
    if bad != 3e38:
        assert not torch.isfinite(out.output[:, 2]).all()  # the output itself is not hidden


@pytest.mark.parametrize("shape", [(1, 5), (1, 3, 1, 1), (1, 4, 1)])
def test_one_value_per_channel_in_training_is_an_error(shape):
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(torch.randn(shape), torch.zeros(shape[1]), torch.ones(shape[1]), training=True)
    # ... but fine in eval mode with population statistics.
    F.batch_norm(torch.randn(shape), torch.zeros(shape[1]), torch.ones(shape[1]), training=False)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        F.batch_norm(torch.randn(5), None, None, training=True)
    with pytest.raises(ValueError, match="out of range"):
        F.batch_norm(torch.randn(5, 3), None, None, training=True, axis=2)
    with pytest.raises(ValueError, match="backward must be"):
        F.batch_norm(torch.randn(5, 3), None, None, training=True, backward="fast")


@pytest.mark.parametrize("backward", BACKWARDS)
def test_vmap_over_an_ensemble_of_layers(backward):
    # Three independent BN layers, each with its own batch and statistics, in one vmap call.
    k, n, c = 3, 12, 4
    x = torch.randn(k, n, c)
    w, b = torch.rand(k, c) + 0.5, torch.randn(k, c)
    rm, rv = torch.zeros(k, c), torch.ones(k, c)

    def one(x, rm, rv, w, b):
        out = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, backward=backward)
        return out.output, out.running_mean, out.running_var

    y, new_rm, new_rv = torch.func.vmap(one)(x, rm, rv, w, b)
    for i in range(k):
        yi, mi, vi = one(x[i], rm[i], rv[i], w[i], b[i])
        torch.testing.assert_close(y[i], yi)
        torch.testing.assert_close(new_rm[i], mi)
        torch.testing.assert_close(new_rv[i], vi)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_torch_func_grad_matches_autograd(backward):
    x = torch.randn(10, 3)
    w = torch.rand(3) + 0.5

    def loss(w):
        return F.batch_norm(x, None, None, w, None, True, backward=backward).output.pow(3).sum()

    wg = w.clone().requires_grad_()
    loss(wg).backward()
    torch.testing.assert_close(torch.func.grad(loss)(w), wg.grad)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 6),
    c=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    axis_choice=st.integers(0, 3),
    backward=st.sampled_from(BACKWARDS),
)
def test_property_normalized_channels_have_zero_mean_unit_variance(
    n, c, spatial, axis_choice, backward
):
    shape = [n, c, *spatial]
    axis = 1 if axis_choice == 0 else (axis_choice % len(shape))
    if axis == 0:
        axis = len(shape) - 1
    shape[1], shape[axis] = shape[axis], shape[1]
    shape[axis] = c
    x = torch.randn(shape, dtype=torch.float64) * 5 + 3
    tiny = torch.finfo(torch.float64).tiny  # eps must be positive in training; this is ~0
    y = F.batch_norm(x, None, None, training=True, eps=tiny, axis=axis, backward=backward).output
    dims = [d for d in range(len(shape)) if d != axis]
    m = x.numel() // c
    # With eps ~ 0 every channel of xhat has mean 0 and biased variance 1 (unless constant).
    spread = x.std(dims) > 1e-6
    torch.testing.assert_close(y.mean(dims), torch.zeros(c, dtype=torch.float64), atol=1e-9, rtol=0)
    var = y.var(dims, correction=0)
    if m > 1:
        torch.testing.assert_close(var[spread], torch.ones_like(var[spread]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("axis", [1, -1])
def test_mask_excludes_padding_from_statistics(axis):
    # Oracle: BN over the valid positions gathered into an (K, C) batch.
    g = torch.Generator().manual_seed(0)
    n, length, c = 4, 6, 3
    lengths = torch.tensor([6, 2, 4, 1])
    mask = torch.arange(length)[None, :] < lengths[:, None]  # (N, L)
    x = torch.randn(n, length, c, generator=g) * 2 + 1  # (N, L, C)
    x[~mask] = 1e3  # padding values that would wreck the statistics
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    xin = (x if axis == -1 else x.transpose(1, 2)).clone().requires_grad_()
    out = F.batch_norm(xin, torch.zeros(c), torch.ones(c), w, b, True, 0.5, axis=axis, mask=mask)
    y = out.output if axis == -1 else out.output.transpose(1, 2)
    xv = x[mask].clone().requires_grad_()
    ref = F.batch_norm(xv, torch.zeros(c), torch.ones(c), w, b, True, 0.5)
    torch.testing.assert_close(y[mask], ref.output)
    torch.testing.assert_close(out.running_mean, ref.running_mean)
    torch.testing.assert_close(out.running_var, ref.running_var)
    gy = torch.randn(ref.output.shape, generator=g)
    (y[mask] * gy).sum().backward()
    (ref.output * gy).sum().backward()
    gx = xin.grad if axis == -1 else xin.grad.transpose(1, 2)
    torch.testing.assert_close(gx[mask], xv.grad)
    assert torch.all(gx[~mask] == 0)


def test_mask_errors_are_named():
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match=r"shape without the channel axis, \(4, 5\), got \(4, 3\)"):
        F.batch_norm(x, None, None, training=True, mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor"):
        F.batch_norm(x, None, None, training=True, mask=torch.ones(4, 5))
    one = torch.zeros(4, 5, dtype=torch.bool)
    one[0, 0] = True
    with pytest.raises(ValueError, match="more than 1 value per channel when training, got 1"):
        F.batch_norm(x, None, None, training=True, mask=one)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("shape,axis", [((12, 5), 1), ((6, 4, 3, 3), 1), ((8, 7, 5), -1)])
def test_ghost_batch_norm_equals_bn_of_each_group(shape, axis, backward):
    # Oracle: Algorithm 1 on each group of v examples on its own; running statistics move
    # towards the mean of the groups' statistics.
    v = shape[0] // 2 if shape[0] % 4 else shape[0] // 4
    x, gamma, beta = make(shape, axis)
    c = shape[axis]
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    xg = x.clone().requires_grad_()
    w1, b1 = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    out = F.batch_norm(
        xg, rm, rv, w1, b1, True, 0.2, axis=axis, backward=backward, virtual_batch_size=v
    )
    xs = x.clone().requires_grad_()
    w2, b2 = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    parts = [F.batch_norm(p, rm, rv, w2, b2, True, 0.2, axis=axis) for p in xs.split(v)]
    torch.testing.assert_close(out.output, torch.cat([p.output for p in parts]))
    torch.testing.assert_close(
        out.running_mean, torch.stack([p.running_mean for p in parts]).mean(0)
    )
    torch.testing.assert_close(out.running_var, torch.stack([p.running_var for p in parts]).mean(0))
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    (out.output * g).sum().backward()
    (torch.cat([p.output for p in parts]) * g).sum().backward()
    for a, b in ((xg, xs), (w1, w2), (b1, b2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_ghost_batch_norm_errors_and_eval():
    x = torch.randn(10, 3)
    with pytest.raises(
        ValueError, match="divide the batch size, got virtual_batch_size=4 for a batch of 10"
    ):
        F.batch_norm(x, None, None, training=True, virtual_batch_size=4)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    # Eval mode uses population statistics: the virtual batch size plays no role.
    torch.testing.assert_close(
        F.batch_norm(x, rm, rv, training=False, virtual_batch_size=5).output,
        F.batch_norm(x, rm, rv, training=False).output,
    )
    x[7, 1] = float("nan")  # one group is non-finite: the whole update is skipped
    out = F.batch_norm(x, rm, rv, training=True, virtual_batch_size=5)
    assert not bool(out.updated) and torch.equal(out.running_mean, rm)


def test_ghost_batch_norm_under_vmap_selects_without_synchronizing():
    # Under torch.func the non-finite check stays a tensor (the where path).
    x = torch.randn(3, 8, 4)
    x[1, 5, 2] = float("nan")  # member 1's second group is non-finite
    rm, rv = torch.zeros(3, 4), torch.ones(3, 4)

    def one(x, rm, rv):
        out = F.batch_norm(x, rm, rv, None, None, True, 0.5, virtual_batch_size=4)
        return out.running_mean, out.running_var, out.updated

    new_rm, new_rv, updated = torch.func.vmap(one)(x, rm, rv)
    assert updated.tolist() == [True, False, True]
    assert torch.equal(new_rm[1], rm[1]) and torch.equal(new_rv[1], rv[1])
    for i in (0, 2):
        expected = torch.stack([0.5 * p.mean(0) for p in x[i].split(4)]).mean(0)
        torch.testing.assert_close(new_rm[i], expected)


def test_batch_renorm_with_rmax_1_dmax_0_is_batch_norm():
    x, gamma, beta = make((16, 4, 3), 1)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    a = F.batch_renorm(x, rm, rv, gamma, beta, True, 0.01, r_max=1.0, d_max=0.0)
    b = F.batch_norm(x, rm, rv, gamma, beta, True, 0.01)
    torch.testing.assert_close(a.output, b.output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.running_mean, b.running_mean)
    torch.testing.assert_close(a.running_var, b.running_var)


def test_batch_renorm_unclipped_training_output_is_the_inference_transform():
    # With r and d inside their limits, y = gamma (x - E[x]) / sqrt(Var[x] + eps) + beta.
    x, gamma, beta = make((32, 5), 1)
    rm, rv = x.mean(0) + 0.1, x.var(0) * 1.2
    out = F.batch_renorm(x, rm, rv, gamma, beta, True, r_max=10.0, d_max=10.0)
    expected = gamma * (x - rm) / torch.sqrt(rv + 1e-5) + beta
    torch.testing.assert_close(out.output, expected, atol=1e-5, rtol=1e-5)


def test_batch_renorm_treats_r_and_d_as_constants_in_backprop():
    # Oracle: the same formula in float64 with r and d computed outside the graph.
    x, gamma, beta = make((12, 3), 1)
    rm, rv = torch.randn(3), torch.rand(3) + 0.3
    xa = x.double().requires_grad_()
    out = F.batch_renorm(
        xa, rm.double(), rv.double(), gamma.double(), beta.double(), True, r_max=1.5, d_max=0.5
    )
    xb = x.double().requires_grad_()
    mu, var = xb.mean(0), xb.var(0, correction=0)
    sb = torch.sqrt(var + 1e-5)
    s = torch.sqrt(rv.double() + 1e-5)
    r = (sb / s).detach().clamp(1 / 1.5, 1.5)
    d = ((mu - rm.double()) / s).detach().clamp(-0.5, 0.5)
    ref = gamma.double() * ((xb - mu) / sb * r + d) + beta.double()
    torch.testing.assert_close(out.output, ref)
    g = torch.randn(12, 3, dtype=torch.float64)
    (out.output * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_renorm_schedule_follows_the_paper():
    assert F.renorm_limits(0) == (1.0, 0.0) and F.renorm_limits(5000) == (1.0, 0.0)
    assert F.renorm_limits(25000) == pytest.approx((1.0 + 2 * 20 / 35, 5.0))
    assert F.renorm_limits(40000) == (3.0, 5.0) and F.renorm_limits(10**6) == (3.0, 5.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e38])
def test_non_finite_guard_as_a_tensor_under_vmap(bad):
    # The tensor form of the guard (GPU, compile, torch.func) agrees with the CPU form.
    x = torch.randn(2, 16, 4)
    x[1, 3, 2] = bad
    if bad == 3e38:
        x[1, 5, 2] = -3e38
    rm, rv = torch.zeros(2, 4), torch.ones(2, 4)

    def one(x, rm, rv):
        out = F.batch_norm(x, rm, rv, None, None, True)
        return out.running_var, out.updated

    new_rv, updated = torch.func.vmap(one)(x, rm, rv)
    assert updated.tolist() == [True, False]
    assert torch.equal(new_rv[1], rv[1]) and not torch.equal(new_rv[0], rv[0])


def test_merge_stats_of_parts_equals_stats_of_the_union():
    # Uneven parts, one empty, offset data where E[x^2] - E[x]^2 would cancel.
    g = torch.Generator().manual_seed(0)
    x = (1e4 + torch.randn(37, 3, generator=g)).double()
    parts = [x[:5], x[5:5], x[5:30], x[30:]]
    counts = torch.tensor([[float(len(p))] for p in parts], dtype=torch.float64)
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(3, dtype=x.dtype) for p in parts])
    m2s = torch.stack(
        [((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(3, dtype=x.dtype) for p in parts]
    )
    total, mean, m2 = F.merge_stats(counts, means, m2s)
    assert total.item() == 37
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(m2 / 37, x.var(0, correction=0))


# ------------------------------------------------------------------------------------------
# Regressions of issue 8 (defects 1, 2, 8, 9) and the one type of ``updated``.


@pytest.mark.parametrize("affine", [True, False])
def test_paper_backward_is_twice_differentiable(affine):
    # Defect 1: the second derivative must include the statistics' dependence on x.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 2, dtype=torch.float64, generator=g).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64, generator=g) + 0.5).requires_grad_() if affine else None
    b = torch.randn(3, dtype=torch.float64, generator=g).requires_grad_() if affine else None

    def f(x, w, b):
        return F.batch_norm(x, None, None, w, b, True, backward="paper").output

    inputs = (x, w, b) if affine else (x,)
    assert torch.autograd.gradgradcheck(lambda *a: f(*a, *([None, None] * (not affine))), inputs)
    # The same second derivative as torch's kernel (the native path).
    grads = {}
    for backward in BACKWARDS:
        y = F.batch_norm(x, None, None, w, b, True, backward=backward).output
        (gx,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
        grads[backward] = torch.autograd.grad(gx.sum(), [t for t in inputs])
    for a, c in zip(grads["paper"], grads["native"]):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 1e30])
@pytest.mark.parametrize("axis", [1, -1])
def test_masked_out_values_never_enter_the_statistics(bad, axis):
    # Defect 2: whatever padding holds (NaN, Inf, 1e30) changes neither the valid outputs,
    # nor the running statistics, nor the gradients of a loss on the valid outputs.
    g = torch.Generator().manual_seed(0)
    n, length, c = 4, 6, 3
    mask = torch.arange(length)[None, :] < torch.tensor([6, 2, 4, 1])[:, None]  # (N, L)
    x = torch.randn(n, length, c, generator=g) * 2 + 1  # (N, L, C)
    x[~mask] = bad
    w = (torch.rand(c, generator=g) + 0.5).requires_grad_()
    b = torch.randn(c, generator=g).requires_grad_()
    xin = (x if axis == -1 else x.transpose(1, 2)).clone().requires_grad_()
    rm, rv = torch.zeros(c), torch.ones(c)
    out = F.batch_norm(xin, rm, rv, w, b, True, 0.5, axis=axis, mask=mask)
    y = out.output if axis == -1 else out.output.transpose(1, 2)
    xv = x[mask].clone().requires_grad_()
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = F.batch_norm(xv, rm, rv, w2, b2, True, 0.5)  # BN of the valid positions alone
    torch.testing.assert_close(y[mask], ref.output)
    assert bool(out.updated)
    torch.testing.assert_close(out.running_mean, ref.running_mean)
    torch.testing.assert_close(out.running_var, ref.running_var)
    gy = torch.randn(ref.output.shape, generator=g)
    (y[mask] * gy).sum().backward()
    (ref.output * gy).sum().backward()
    gx = xin.grad if axis == -1 else xin.grad.transpose(1, 2)
    torch.testing.assert_close(gx[mask], xv.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    assert torch.all(gx[~mask] == 0)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize(
    "kwargs", [{}, {"axis": -1}, {"virtual_batch_size": 2}], ids=["bn", "axis-1", "ghost"]
)
def test_empty_batch_gives_empty_output_and_moves_nothing(backward, kwargs):
    # Defect 8: N = 0 in training is what torch does: an empty output, statistics alone.
    shape = (0, 4, 3) if kwargs.get("axis") == -1 else (0, 3, 4)
    x = torch.randn(shape, requires_grad=True)
    w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    out = F.batch_norm(x, rm, rv, w, b, True, backward=backward, **kwargs)
    assert out.output.shape == x.shape
    assert out.running_mean is rm and out.running_var is rv and not bool(out.updated)
    out.output.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(3))
    axis = kwargs.get("axis", 1)
    ren = F.batch_renorm(x.detach(), rm, rv, w, b, True, axis=axis, backward=backward)
    assert ren.output.shape == x.shape and ren.running_mean is rm and not bool(ren.updated)


def test_eps_must_be_positive_with_batch_statistics():
    # Defect 9, as torch: eps > 0 whenever batch statistics are used, eps >= 0 otherwise.
    x, rm, rv = torch.randn(8, 3), torch.zeros(3), torch.ones(3)
    for eps in (0.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="eps must be positive"):
            F.batch_norm(x, rm, rv, training=True, eps=eps)
        with pytest.raises(ValueError, match="eps must be positive"):
            F.batch_norm(x, None, None, training=False, eps=eps)  # batch statistics too
        with pytest.raises(ValueError, match="eps must be positive"):
            F.batch_renorm(x, rm, rv, training=True, eps=eps)
    with pytest.raises(ValueError, match=r"positive \(or 0 with population statistics\)"):
        F.batch_norm(x, rm, rv, training=False, eps=-1.0)
    torch.testing.assert_close(  # eps = 0 with population statistics is a plain affine map
        F.batch_norm(x, rm, rv, training=False, eps=0.0).output,
        torch.nn.functional.batch_norm(x, rm, rv, training=False, eps=0.0),
    )


def test_updated_is_always_a_0d_bool_tensor():
    # One type whatever happened: moved, not tracked, eval, empty, non-finite.
    x, rm, rv = torch.randn(8, 3), torch.zeros(3), torch.ones(3)
    bad = x.clone()
    bad[0, 0] = float("nan")
    cases = {
        True: F.batch_norm(x, rm, rv, training=True),
        False: [
            F.batch_norm(x, None, None, training=True),
            F.batch_norm(x, rm, rv, training=False),
            F.batch_norm(x[:0], rm, rv, training=True),
            F.batch_norm(bad, rm, rv, training=True),
            F.batch_norm(bad, rm, rv, training=True, backward="paper"),
        ],
    }
    for expected, outs in ((True, [cases[True]]), (False, cases[False])):
        for out in outs:
            assert isinstance(out.updated, torch.Tensor)
            assert out.updated.dtype == torch.bool and out.updated.shape == ()
            assert bool(out.updated) is expected


def test_paper_backward_shares_the_gradient_helper_with_masks_and_counts():
    # batch_norm_backward with a mask equals it on the selected positions alone.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, dtype=torch.float64, generator=g)
    mask = torch.rand(5, 1, 4, generator=g) > 0.3
    x[~mask.expand_as(x)] = float("nan")
    dy = torch.randn(5, 3, 4, dtype=torch.float64, generator=g)
    sel = x.transpose(1, 2)[mask[:, 0]]  # (K, C)
    mean, var = sel.mean(0), sel.var(0, correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    xhat = (x - mean[:, None]) * invstd[:, None]
    gamma = torch.rand(3, dtype=torch.float64, generator=g)[:, None] + 0.5
    gi, gg, gb = F.batch_norm_backward(dy, xhat, invstd[:, None], gamma, [0, 2], mask=mask)
    xs = sel.clone().requires_grad_()
    ys = torch.nn.functional.batch_norm(xs, None, None, gamma[:, 0], None, True, eps=1e-5)
    (ys * dy.transpose(1, 2)[mask[:, 0]]).sum().backward()
    torch.testing.assert_close(gi.transpose(1, 2)[mask[:, 0]], xs.grad)
    k = (gamma * invstd[:, None]).expand_as(x)
    torch.testing.assert_close(gi[~mask.expand_as(x)], (dy * k)[~mask.expand_as(x)])
    assert torch.isfinite(gg).all() and torch.isfinite(gb).all()
