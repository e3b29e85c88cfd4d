"""Triton building blocks shared by the forward and backward kernels: tile addressing, the
activations, Chan et al.'s merge of partial moments, and BN's per-channel affine map."""

from __future__ import annotations

import triton
import triton.language as tl

from batchnorm.activations import ACTIVATIONS as REGISTRY

# The activations the kernels implement, name -> the ACT code `activate` branches on: read
# from the one registry (batchnorm.activations, which imports only torch).
ACTIVATIONS = {name: act.kernel for name, act in REGISTRY.items() if act.kernel is not None}


@triton.jit
def tile(t, tiles_per_row, cols, chans, C, BLOCK_S: tl.constexpr):
    """Tile ``t`` of a channel block: its row, positions (BLOCK_S,) and mask (BLOCK_S, BLOCK_C)."""
    row = t // tiles_per_row
    s = (t - row * tiles_per_row) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (s < cols)[:, None] & (chans < C)[None, :]
    return row, s, mask


@triton.jit
def addr(row, s, chans, stride_n, stride_s, stride_c):
    # (BLOCK_S, BLOCK_C) element offsets; see layout.Geometry.
    return row * stride_n + s[:, None] * stride_s + chans[None, :] * stride_c


@triton.jit
def store(ptr, value, mask):
    """Store float32 ``value`` in ``ptr``'s dtype (rounded to nearest on a GPU; Triton's
    interpreter truncates float32 -> bfloat16)."""
    tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def activate(u, slope, ACT: tl.constexpr):
    # ACT is the registry's kernel code (ACTIVATIONS above): 0 identity, 1 relu, 2 leaky_relu.
    # `u < 0` (not `u > 0`) keeps NaN as NaN, like torch's relu and leaky_relu.
    if ACT == 1:
        u = tl.where(u < 0.0, 0.0, u)
    elif ACT == 2:
        u = tl.where(u < 0.0, u * slope, u)
    return u


@triton.jit
def activation_grad(dy, z, slope, ACT: tl.constexpr):
    """dl/du from dl/dz through z = act(u), read off the output z as torch's relu does:
    u > 0 exactly when z > 0 for relu and leaky_relu with slope >= 0."""
    if ACT == 1:
        dy = tl.where(z > 0.0, dy, 0.0)
    elif ACT == 2:
        dy = tl.where(z > 0.0, dy, dy * slope)
    return dy


@triton.jit
def merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan, Golub & LeVeque: (n, mean, M2) of the union of two parts (as merge_stats)."""
    n = n_a + n_b
    w = n_b / tl.maximum(n, 1.0)  # 0 when both parts are empty
    delta = mean_b - mean_a
    return n, mean_a + delta * w, m2_a + m2_b + delta * delta * n_a * w


@triton.jit
def shift_of(x_ptr, sxc, chans, cmask):
    """Each channel's first value (row 0, position 0): the moments are taken of x - shift,
    so that float32 keeps the mean's digits where |mean| >> std (the final mean is
    shift + mean(x - shift), rounded once)."""
    return tl.load(x_ptr + chans * sxc, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def range_moments(
    x_ptr, sxn, sxs, sxc, t_begin, t_end, tiles_per_row, cols, chans, C, shift,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """(n, mean, M2) per channel of x - shift over tiles [t_begin, t_end): exact two-pass
    moments of each tile in float32, merged tile by tile (no E[x^2] - E[x]^2 cancellation)."""
    n = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for t in range(t_begin, t_end):
        row, s, mask = tile(t, tiles_per_row, cols, chans, C, BLOCK_S)
        x = tl.load(x_ptr + addr(row, s, chans, sxn, sxs, sxc), mask=mask, other=0.0)
        x = tl.where(mask, x.to(tl.float32) - shift[None, :], 0.0)
        cnt = tl.sum(tl.where(mask, 1.0, 0.0), 0)
        t_mean = tl.sum(x, 0) / tl.maximum(cnt, 1.0)
        d = tl.where(mask, x - t_mean[None, :], 0.0)
        n, mean, m2 = merge(n, mean, m2, cnt, t_mean, tl.sum(d * d, 0))
    return n, mean, m2


@triton.jit
def affine(w_ptr, b_ptr, chans, cmask, var, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Per-channel (a, beta) with BN(x) = (x - mean) * a + beta, a = gamma / sqrt(var + eps).

    Subtracting the mean first keeps float32's digits where |mean| >> std; the folded
    x * scale + shift (`functional.inference_affine`) would cancel them."""
    a = tl.rsqrt(var + eps)
    if HAS_W:
        a = a * tl.load(w_ptr + chans, mask=cmask, other=1.0).to(tl.float32)
    beta = tl.zeros(var.shape, tl.float32)
    if HAS_B:
        beta = tl.load(b_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
    return a, beta


@triton.jit
def normalize_range(
    x_ptr, sxn, sxs, sxc, y_ptr, syn, sys, syc, r_ptr, srn, srs, src,
    t_begin, t_end, tiles_per_row, cols, chans, C, mean, a, beta, slope,
    BLOCK_S: tl.constexpr, ACT: tl.constexpr, HAS_R: tl.constexpr,
):
    """y = act((x - mean) * a + beta (+ residual)) over tiles [t_begin, t_end)."""
    for t in range(t_begin, t_end):
        row, s, mask = tile(t, tiles_per_row, cols, chans, C, BLOCK_S)
        x = tl.load(x_ptr + addr(row, s, chans, sxn, sxs, sxc), mask=mask, other=0.0)
        u = (x.to(tl.float32) - mean[None, :]) * a[None, :] + beta[None, :]
        if HAS_R:
            r = tl.load(r_ptr + addr(row, s, chans, srn, srs, src), mask=mask, other=0.0)
            u = u + r.to(tl.float32)
        y = activate(u, slope, ACT)
        store(y_ptr + addr(row, s, chans, syn, sys, syc), y, mask)
