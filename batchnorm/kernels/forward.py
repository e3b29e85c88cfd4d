"""Triton kernels of the BN forward pass (Algorithm 1 in training, Algorithm 2's affine map
in eval), fused with the activation, the residual add and the running-statistics update.

Training, in one launch when the input is small (one program does everything) and in two
otherwise:
  1. ``_partial_moments``: a (channel block, split) grid; each program writes the exact
     (n, mean, M2) of its share of one channel block's values, shifted by each channel's
     first value (`common.shift_of`).
  2. ``_normalize_merged``: the same grid; each program merges its channel block's partials
     (`merge_stats`'s formula), normalizes its share and applies act(. + residual). Program
     (0, 0) also merges every block and writes the batch statistics it returns.

The running statistics are not written here: the kernels return mu_B and sigma2_B, and the
caller commits them by the library's one rule (`batchnorm.functional.commit_running_stats`),
as every other engine does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchnorm.kernels import common as K
from batchnorm.kernels.heuristics import num_sms, plan
from batchnorm.kernels.layout import geometry


@triton.jit
def _forward_single(
    x_ptr, sxn, sxs, sxc, y_ptr, syn, sys, syc, r_ptr, srn, srs, src,
    w_ptr, b_ptr, mean_ptr, var_ptr,
    C, tiles_per_row, cols, tiles, eps, slope,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACT: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
):
    # Small inputs: one program, channel block after channel block (launch-bound regime).
    for c0 in range(0, C, BLOCK_C):
        chans = c0 + tl.arange(0, BLOCK_C)
        cmask = chans < C
        shift = K.shift_of(x_ptr, sxc, chans, cmask)
        n, mean, m2 = K.range_moments(
            x_ptr, sxn, sxs, sxc, 0, tiles, tiles_per_row, cols, chans, C, shift,
            BLOCK_S, BLOCK_C,
        )
        mean = shift + mean
        var = m2 / tl.maximum(n, 1.0)
        tl.store(mean_ptr + chans, mean, mask=cmask)
        tl.store(var_ptr + chans, var, mask=cmask)
        a, beta = K.affine(w_ptr, b_ptr, chans, cmask, var, eps, HAS_W, HAS_B)
        K.normalize_range(
            x_ptr, sxn, sxs, sxc, y_ptr, syn, sys, syc, r_ptr, srn, srs, src,
            0, tiles, tiles_per_row, cols, chans, C, mean, a, beta, slope, BLOCK_S, ACT, HAS_R,
        )


@triton.jit
def _partial_moments(
    x_ptr, sxn, sxs, sxc, pn_ptr, pmean_ptr, pm2_ptr,
    C, tiles_per_row, cols, tiles, tiles_per_split,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    chans = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tiles)
    cmask = chans < C
    n, mean, m2 = K.range_moments(
        x_ptr, sxn, sxs, sxc, t_begin, t_end, tiles_per_row, cols, chans, C,
        K.shift_of(x_ptr, sxc, chans, cmask), BLOCK_S, BLOCK_C,
    )
    tl.store(pn_ptr + split * C + chans, n, mask=cmask)
    tl.store(pmean_ptr + split * C + chans, mean, mask=cmask)
    tl.store(pm2_ptr + split * C + chans, m2, mask=cmask)


@triton.jit
def _merged(pn_ptr, pmean_ptr, pm2_ptr, chans, cmask, C, splits, SPLITS_P2: tl.constexpr):
    # merge_stats over the splits: mean = sum n_k mean_k / n, M2 = sum M2_k + n_k (mean_k - mean)^2
    k = tl.arange(0, SPLITS_P2)
    mask = (k < splits)[:, None] & cmask[None, :]
    off = k[:, None] * C + chans[None, :]
    n_k = tl.load(pn_ptr + off, mask=mask, other=0.0)
    mean_k = tl.load(pmean_ptr + off, mask=mask, other=0.0)
    m2_k = tl.load(pm2_ptr + off, mask=mask, other=0.0)
    n = tl.sum(n_k, 0)
    mean = tl.sum(n_k * mean_k, 0) / tl.maximum(n, 1.0)
    d = mean_k - mean[None, :]
    m2 = tl.sum(m2_k, 0) + tl.sum(tl.where(mask, n_k * d * d, 0.0), 0)
    return mean, m2 / tl.maximum(n, 1.0)


@triton.jit
def _normalize_merged(
    x_ptr, sxn, sxs, sxc, y_ptr, syn, sys, syc, r_ptr, srn, srs, src,
    w_ptr, b_ptr, mean_ptr, var_ptr,
    pn_ptr, pmean_ptr, pm2_ptr,
    C, tiles_per_row, cols, tiles, tiles_per_split, splits, eps, slope,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, SPLITS_P2: tl.constexpr, ACT: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    chans = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = chans < C
    mean, var = _merged(pn_ptr, pmean_ptr, pm2_ptr, chans, cmask, C, splits, SPLITS_P2)
    mean = K.shift_of(x_ptr, sxc, chans, cmask) + mean
    a, beta = K.affine(w_ptr, b_ptr, chans, cmask, var, eps, HAS_W, HAS_B)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tiles)
    K.normalize_range(
        x_ptr, sxn, sxs, sxc, y_ptr, syn, sys, syc, r_ptr, srn, srs, src,
        t_begin, t_end, tiles_per_row, cols, chans, C, mean, a, beta, slope, BLOCK_S, ACT, HAS_R,
    )
    if (pid_c == 0) & (split == 0):
        # One program writes every channel's batch statistics.
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            csmask = cs < C
            m, v = _merged(pn_ptr, pmean_ptr, pm2_ptr, cs, csmask, C, splits, SPLITS_P2)
            m = K.shift_of(x_ptr, sxc, cs, csmask) + m
            tl.store(mean_ptr + cs, m, mask=csmask)
            tl.store(var_ptr + cs, v, mask=csmask)


@triton.jit
def _forward_eval(
    x_ptr, sxn, sxs, sxc, y_ptr, syn, sys, syc, r_ptr, srn, srs, src,
    w_ptr, b_ptr, rm_ptr, rv_ptr,
    C, tiles_per_row, cols, tiles, tiles_per_split, eps, slope,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACT: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
):
    # Algorithm 2, step 3, elementwise: y = act((x - mean) * a + beta (+ residual)).
    chans = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = chans < C
    mean = tl.load(rm_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
    var = tl.load(rv_ptr + chans, mask=cmask, other=1.0).to(tl.float32)
    a, beta = K.affine(w_ptr, b_ptr, chans, cmask, var, eps, HAS_W, HAS_B)
    t_begin = tl.program_id(1) * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tiles)
    K.normalize_range(
        x_ptr, sxn, sxs, sxc, y_ptr, syn, sys, syc, r_ptr, srn, srs, src,
        t_begin, t_end, tiles_per_row, cols, chans, C, mean, a, beta, slope, BLOCK_S, ACT, HAS_R,
    )


def _io(x, residual, out_dtype):
    """(x, y, residual) viewed through one Geometry; y is new, strided like x."""
    y = torch.empty_like(x, dtype=out_dtype)
    tensors = [x, y] if residual is None else [x, y, residual]
    views, geom = geometry(*tensors)
    strides = list(geom.strides)
    if residual is None:
        views.append(x)  # an unused pointer
        strides.append((0, 0, 0))
    return views, geom, [s for triple in strides for s in triple]


def forward_train(
    x, weight, bias, residual, eps, activation, negative_slope, out_dtype=None, allow_single=True
):
    """Training forward: y = act(BN(x) + residual) with batch statistics; returns
    (y, mean, var), the batch's mu_B and biased sigma2_B in float32 (C,), which the caller
    commits to the running statistics. Arguments are validated by the caller
    (`batchnorm.kernels.batch_norm_act`); x has N > 0 and more than one value per channel.
    """
    (x, y, r), geom, strides = _io(x, residual, out_dtype)
    launch = plan(geom, num_sms(x.device), allow_single)
    c = geom.channels
    mean = torch.empty(c, device=x.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    tiles_per_row = launch.tiles // geom.rows
    flags = dict(
        BLOCK_S=launch.block_s, BLOCK_C=launch.block_c, ACT=K.ACTIVATIONS[activation],
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_R=residual is not None,
    )
    pointers = [t if t is not None else mean for t in (weight, bias)]
    scalars = (float(eps), float(negative_slope))
    if launch.single:
        _forward_single[(1,)](
            x, *strides[0:3], y, *strides[3:6], r, *strides[6:9], *pointers, mean, var,
            c, tiles_per_row, geom.cols, launch.tiles, *scalars, **flags,
        )
        return y, mean, var
    grid = (launch.c_blocks, launch.splits)
    pn = torch.empty((launch.splits, c), device=x.device, dtype=torch.float32)
    pmean, pm2 = torch.empty_like(pn), torch.empty_like(pn)
    _partial_moments[grid](
        x, *strides[0:3], pn, pmean, pm2, c, tiles_per_row, geom.cols, launch.tiles,
        launch.tiles_per_split, BLOCK_S=launch.block_s, BLOCK_C=launch.block_c,
    )
    _normalize_merged[grid](
        x, *strides[0:3], y, *strides[3:6], r, *strides[6:9], *pointers, mean, var,
        pn, pmean, pm2, c, tiles_per_row, geom.cols, launch.tiles, launch.tiles_per_split,
        launch.splits, *scalars, SPLITS_P2=launch.splits_p2, **flags,
    )
    return y, mean, var


def forward_eval(x, weight, bias, residual, running_mean, running_var, eps, activation,
                 negative_slope, out_dtype=None):
    """Eval forward, one elementwise launch: y = act((x - mean) * a + beta (+ residual)) with
    the running statistics (Algorithm 2, step 3)."""
    (x, y, r), geom, strides = _io(x, residual, out_dtype)
    launch = plan(geom, num_sms(x.device), allow_single=False)
    _forward_eval[(launch.c_blocks, launch.splits)](
        x, *strides[0:3], y, *strides[3:6], r, *strides[6:9],
        weight if weight is not None else running_mean,
        bias if bias is not None else running_mean,
        running_mean, running_var, geom.channels, launch.tiles // geom.rows, geom.cols,
        launch.tiles, launch.tiles_per_split, float(eps), float(negative_slope),
        BLOCK_S=launch.block_s, BLOCK_C=launch.block_c, ACT=K.ACTIVATIONS[activation],
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_R=residual is not None,
    )
    return y
