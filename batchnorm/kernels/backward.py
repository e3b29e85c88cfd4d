"""Triton kernels of the BN backward pass (Sec. 3), fused with the activation's backward and
the residual's gradient; optionally rebuilding xhat from the output (In-Place ABN).

With dy' = dl/du the gradient through z = act(u), u = gamma * xhat + beta (+ residual), and
m values per channel, the paper's compact form is

    dl/dx     = gamma / (m s) * (m dy' - sum dy' - xhat * sum(dy' * xhat)),
    s = sqrt(sigma2_B + eps),
    dl/dgamma = sum dy' * xhat        dl/dbeta = sum dy'        dl/dresidual = dy'

and in eval mode (fixed statistics) dl/dx = gamma / s * dy'. The two sums are a per-channel
reduction: for small inputs one launch does it with one program per channel block, otherwise
``_partial_sums`` writes per-split partial sums and ``_apply`` adds them up and writes the
gradients, like the forward's two launches. Partial sums are added in a fixed order, so the
gradients are deterministic (no atomics).

Memory saving (Rota Bulo et al., In-Place Activated BatchNorm, CVPR 2018): the forward keeps
z instead of x and the backward rebuilds xhat = (act^-1(z) - beta) / gamma, for invertible
activations (identity, leaky_relu with a positive slope); the caller decides when gamma is
safe to divide by (`batchnorm.kernels.gamma_invertible`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchnorm.kernels import common as K
from batchnorm.kernels.heuristics import num_sms, plan
from batchnorm.kernels.layout import geometry


@triton.jit
def _channel_params(mean_ptr, var_ptr, w_ptr, b_ptr, chans, cmask, eps,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    mean = tl.load(mean_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
    invstd = tl.rsqrt(tl.load(var_ptr + chans, mask=cmask, other=1.0).to(tl.float32) + eps)
    gamma = tl.full(mean.shape, 1.0, tl.float32)
    if HAS_W:
        gamma = tl.load(w_ptr + chans, mask=cmask, other=1.0).to(tl.float32)
    beta = tl.zeros(mean.shape, tl.float32)
    if HAS_B:
        beta = tl.load(b_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
    return mean, invstd, gamma, beta


@triton.jit
def _grad_tile(
    dy_ptr, sdn, sds, sdc, src_ptr, sxn, sxs, sxc, z_ptr, szn, szs, szc,
    res_ptr, s_rn, s_rs, s_rc, row, s, chans, mask, mean, invstd, gamma, beta, slope,
    ACT: tl.constexpr, MEMORY_SAVING: tl.constexpr, HAS_R: tl.constexpr,
):
    """(xhat, dy') of one tile, zero outside the mask. ``src`` is x, or z when memory saving.

    The activation's mask: relu reads it off the saved z (as torch's relu); leaky_relu
    recomputes u from x (+ residual) with the forward's operations (torch's saves its
    input), so an output changed in place afterwards does not matter."""
    dy = tl.load(dy_ptr + K.addr(row, s, chans, sdn, sds, sdc), mask=mask, other=0.0)
    dy = dy.to(tl.float32)
    src = tl.load(src_ptr + K.addr(row, s, chans, sxn, sxs, sxc), mask=mask, other=0.0)
    src = src.to(tl.float32)
    if MEMORY_SAVING:
        z = src
        u = z
        if ACT == 2:
            u = tl.where(z > 0.0, z, z / slope)  # leaky_relu^-1
        xhat = (u - beta[None, :]) / gamma[None, :]
    else:
        xhat = (src - mean[None, :]) * invstd[None, :]
        z = src
        if ACT == 1:
            z = tl.load(z_ptr + K.addr(row, s, chans, szn, szs, szc), mask=mask, other=0.0)
            z = z.to(tl.float32)
        elif ACT == 2:
            # u as the forward computed it (common.normalize_range): the same sign.
            z = (src - mean[None, :]) * (invstd * gamma)[None, :] + beta[None, :]
            if HAS_R:
                r = tl.load(res_ptr + K.addr(row, s, chans, s_rn, s_rs, s_rc), mask=mask,
                            other=0.0)
                z = z + r.to(tl.float32)
    dyp = K.activation_grad(dy, z, slope, ACT)
    return tl.where(mask, xhat, 0.0), tl.where(mask, dyp, 0.0)


@triton.jit
def _range_sums(
    dy_ptr, sdn, sds, sdc, src_ptr, sxn, sxs, sxc, z_ptr, szn, szs, szc,
    res_ptr, s_rn, s_rs, s_rc,
    t_begin, t_end, tiles_per_row, cols, chans, C, mean, invstd, gamma, beta, slope,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACT: tl.constexpr,
    MEMORY_SAVING: tl.constexpr, HAS_R: tl.constexpr,
):
    # (sum dy', sum dy' * xhat) per channel over tiles [t_begin, t_end), float32.
    sum_dy = tl.zeros([BLOCK_C], tl.float32)
    sum_dyx = tl.zeros([BLOCK_C], tl.float32)
    for t in range(t_begin, t_end):
        row, s, mask = K.tile(t, tiles_per_row, cols, chans, C, BLOCK_S)
        xhat, dyp = _grad_tile(
            dy_ptr, sdn, sds, sdc, src_ptr, sxn, sxs, sxc, z_ptr, szn, szs, szc,
            res_ptr, s_rn, s_rs, s_rc, row, s, chans, mask, mean, invstd, gamma, beta, slope,
            ACT, MEMORY_SAVING, HAS_R,
        )
        sum_dy += tl.sum(dyp, 0)
        sum_dyx += tl.sum(dyp * xhat, 0)
    return sum_dy, sum_dyx


@triton.jit
def _partial_sums(
    dy_ptr, sdn, sds, sdc, src_ptr, sxn, sxs, sxc, z_ptr, szn, szs, szc,
    res_ptr, s_rn, s_rs, s_rc, mean_ptr, var_ptr, w_ptr, b_ptr, p_dy_ptr, p_dyx_ptr,
    C, tiles_per_row, cols, tiles, tiles_per_split, eps, slope,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACT: tl.constexpr,
    MEMORY_SAVING: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_R: tl.constexpr,
):
    chans = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = chans < C
    split = tl.program_id(1)
    mean, invstd, gamma, beta = _channel_params(
        mean_ptr, var_ptr, w_ptr, b_ptr, chans, cmask, eps, HAS_W, HAS_B
    )
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tiles)
    sum_dy, sum_dyx = _range_sums(
        dy_ptr, sdn, sds, sdc, src_ptr, sxn, sxs, sxc, z_ptr, szn, szs, szc,
        res_ptr, s_rn, s_rs, s_rc,
        t_begin, t_end, tiles_per_row, cols, chans, C, mean, invstd, gamma, beta, slope,
        BLOCK_S, BLOCK_C, ACT, MEMORY_SAVING, HAS_R,
    )
    tl.store(p_dy_ptr + split * C + chans, sum_dy, mask=cmask)
    tl.store(p_dyx_ptr + split * C + chans, sum_dyx, mask=cmask)


@triton.jit
def _apply(
    dy_ptr, sdn, sds, sdc, src_ptr, sxn, sxs, sxc, z_ptr, szn, szs, szc,
    res_ptr, s_rn, s_rs, s_rc, dx_ptr, sgn, sgs, sgc, dr_ptr, srn, srs, src,
    mean_ptr, var_ptr, w_ptr, b_ptr, dw_ptr, db_ptr, p_dy_ptr, p_dyx_ptr,
    C, tiles_per_row, cols, tiles, tiles_per_split, splits, count, eps, slope,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, SPLITS_P2: tl.constexpr, ACT: tl.constexpr,
    MEMORY_SAVING: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    TRAINING: tl.constexpr, FUSED_SUMS: tl.constexpr, NEED_SUMS: tl.constexpr,
    WRITE_DX: tl.constexpr, WRITE_DR: tl.constexpr, WRITE_DW: tl.constexpr,
    WRITE_DB: tl.constexpr, HAS_R: tl.constexpr,
):
    chans = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = chans < C
    split = tl.program_id(1)
    mean, invstd, gamma, beta = _channel_params(
        mean_ptr, var_ptr, w_ptr, b_ptr, chans, cmask, eps, HAS_W, HAS_B
    )
    sum_dy = tl.zeros([BLOCK_C], tl.float32)
    sum_dyx = tl.zeros([BLOCK_C], tl.float32)
    if FUSED_SUMS:  # one split: this program reduces its channel block itself
        sum_dy, sum_dyx = _range_sums(
            dy_ptr, sdn, sds, sdc, src_ptr, sxn, sxs, sxc, z_ptr, szn, szs, szc,
            res_ptr, s_rn, s_rs, s_rc,
            0, tiles, tiles_per_row, cols, chans, C, mean, invstd, gamma, beta, slope,
            BLOCK_S, BLOCK_C, ACT, MEMORY_SAVING, HAS_R,
        )
    elif NEED_SUMS:
        k = tl.arange(0, SPLITS_P2)
        pmask = (k < splits)[:, None] & cmask[None, :]
        off = k[:, None] * C + chans[None, :]
        sum_dy = tl.sum(tl.load(p_dy_ptr + off, mask=pmask, other=0.0), 0)
        sum_dyx = tl.sum(tl.load(p_dyx_ptr + off, mask=pmask, other=0.0), 0)
    if split == 0:
        if WRITE_DW:
            K.store(dw_ptr + chans, sum_dyx, cmask)
        if WRITE_DB:
            K.store(db_ptr + chans, sum_dy, cmask)
    if WRITE_DX or WRITE_DR:
        scale = gamma * invstd
        mean_dy = sum_dy / count
        mean_dyx = sum_dyx / count
        t_begin = split * tiles_per_split
        t_end = tl.minimum(t_begin + tiles_per_split, tiles)
        for t in range(t_begin, t_end):
            row, s, mask = K.tile(t, tiles_per_row, cols, chans, C, BLOCK_S)
            xhat, dyp = _grad_tile(
                dy_ptr, sdn, sds, sdc, src_ptr, sxn, sxs, sxc, z_ptr, szn, szs, szc,
                res_ptr, s_rn, s_rs, s_rc, row, s, chans, mask, mean, invstd, gamma, beta,
                slope, ACT, MEMORY_SAVING, HAS_R,
            )
            if WRITE_DR:
                K.store(dr_ptr + K.addr(row, s, chans, srn, srs, src), dyp, mask)
            if WRITE_DX:
                if TRAINING:
                    dx = (dyp - mean_dy[None, :] - xhat * mean_dyx[None, :]) * scale[None, :]
                else:
                    dx = dyp * scale[None, :]
                K.store(dx_ptr + K.addr(row, s, chans, sgn, sgs, sgc), dx, mask)


def backward(
    grad_output, source, output, residual, mean, var, weight, bias, eps, activation,
    negative_slope, training, memory_saving, needs, allow_single=True,
):
    """Gradients of y = act(BN(x) + residual) from what the forward saved.

    Args:
        grad_output: dl/dz, shaped like x.
        source: x, or the output z when ``memory_saving``.
        output: z, read for relu's mask (None for the other activations).
        residual: the residual or None; gives its gradient its dtype and strides, and is
            read for leaky_relu's mask.
        mean, var: the statistics the forward normalized with (batch mu_B and biased
            sigma2_B in training, the running statistics in eval), (C,).
        weight, bias: gamma and beta (C,) with stride 1, or None.
        needs: (input, weight, bias, residual) flags, as ``ctx.needs_input_grad``.

    Returns:
        (dl/dx, dl/dgamma, dl/dbeta, dl/dresidual), None where not needed.
    """
    need_x, need_w, need_b, need_r = needs
    need_w = need_w and weight is not None
    need_b = need_b and bias is not None
    need_r = need_r and residual is not None
    read_r = residual is not None and activation == "leaky_relu" and not memory_saving
    z = output if output is not None else source
    dx = torch.empty_like(source) if need_x else None
    dr = torch.empty_like(residual) if need_r else None
    res = residual if read_r else source  # an unused pointer where not read
    tensors = [grad_output, source, z, res] + [t for t in (dx, dr) if t is not None]
    views, geom = geometry(*tensors)
    strides = [s for triple in geom.strides for s in triple]
    grad_output, source, z, res = views[:4]
    rest = iter(views[4:])
    dx = next(rest) if need_x else None
    dr = next(rest) if need_r else None
    s_dx = strides[12:15] if need_x else [0, 0, 0]
    s_dr = strides[-3:] if need_r else [0, 0, 0]
    dw = torch.empty_like(weight) if need_w else None
    db = torch.empty_like(bias) if need_b else None
    need_sums = need_w or need_b or (need_x and training)
    launch = plan(geom, num_sms(grad_output.device), allow_single)
    fused = need_sums and launch.single
    splits = 1 if fused else launch.splits
    per_split = launch.tiles if fused else launch.tiles_per_split
    c = geom.channels
    tiles_per_row = launch.tiles // geom.rows
    placeholder = mean
    common = dict(
        BLOCK_S=launch.block_s, BLOCK_C=launch.block_c, ACT=K.ACTIVATIONS[activation],
        MEMORY_SAVING=memory_saving, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_R=read_r,
    )
    p_dy = p_dyx = placeholder
    if need_sums and not fused:
        p_dy = torch.empty((splits, c), device=mean.device, dtype=torch.float32)
        p_dyx = torch.empty_like(p_dy)
        _partial_sums[(launch.c_blocks, splits)](
            grad_output, *strides[0:3], source, *strides[3:6], z, *strides[6:9],
            res, *strides[9:12],
            mean, var, weight if weight is not None else placeholder,
            bias if bias is not None else placeholder, p_dy, p_dyx,
            c, tiles_per_row, geom.cols, launch.tiles, per_split, float(eps),
            float(negative_slope), **common,
        )
    _apply[(launch.c_blocks, splits)](
        grad_output, *strides[0:3], source, *strides[3:6], z, *strides[6:9],
        res, *strides[9:12],
        dx if dx is not None else placeholder, *s_dx,
        dr if dr is not None else placeholder, *s_dr,
        mean, var, weight if weight is not None else placeholder,
        bias if bias is not None else placeholder,
        dw if dw is not None else placeholder, db if db is not None else placeholder,
        p_dy, p_dyx, c, tiles_per_row, geom.cols, launch.tiles, per_split, splits,
        float(geom.count), float(eps), float(negative_slope),
        SPLITS_P2=triton.next_power_of_2(splits), TRAINING=training, FUSED_SUMS=fused,
        NEED_SUMS=need_sums, WRITE_DX=need_x, WRITE_DR=need_r, WRITE_DW=need_w,
        WRITE_DB=need_b, **common,
    )
    return dx, dw, db, dr
