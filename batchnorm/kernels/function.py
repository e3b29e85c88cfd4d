"""The Triton BN + activation (+ residual) as one autograd.Function and its functional forms.

Conventions are those of `batchnorm.functional` (biased sigma2_B for normalizing, unbiased
running_var, momentum weighing the new value, the non-finite guard). The kernels in
`forward` and `backward` compute the output, the batch statistics and the gradients; the
running statistics are committed by the library's one rule,
`batchnorm.functional.commit_running_stats` (`batch_norm_act`), or by the layer that called
`transform` (`batchnorm.dispatch`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchnorm.activations import check_activation
from batchnorm.functional import (
    BatchStats,
    check_residual,
    check_training_batch,
    commit_running_stats,
    has_tangent,
    transformed,
)
from batchnorm.kernels import backward as B
from batchnorm.kernels import forward as F
from batchnorm.kernels.common import ACTIVATIONS
from batchnorm.kernels.layout import DTYPES

GAMMA_MIN = 1e-3  # memory saving divides by gamma; below this |gamma| it keeps x instead
# ... and it keeps x where rebuilding would add more than this to any |xhat' - xhat|
# (bfloat16's unit roundoff: never more than storing xhat itself in bfloat16 would lose).
XHAT_TOL = 2.0**-8
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def gamma_invertible(
    weight: Tensor | None,
    gamma_min: float = GAMMA_MIN,
    *,
    bias: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> bool:
    """Whether memory saving may rebuild xhat = (u - beta) / gamma from an output of ``dtype``.

    The rebuilt xhat carries the output's rounding amplified by 1/|gamma|: with u_z the unit
    roundoff of ``dtype`` (2^-24 float32, 2^-11 float16, 2^-8 bfloat16),
    |xhat' - xhat| <= u_z * |xhat| + u_z * |beta| / |gamma| up to float32 rounding. So every
    channel needs |gamma| >= ``gamma_min`` and u_z * |beta| <= XHAT_TOL * |gamma|; then
    |xhat' - xhat| <= u_z * |xhat| + XHAT_TOL, and dl/dgamma is off by at most
    u_z * sum |dy' xhat| + XHAT_TOL * sum |dy'| over the channel. In bfloat16 that allows
    |beta| <= |gamma|, in float16 |beta| <= 8 |gamma|, in float32 |beta| <= 65536 |gamma|.
    Reads gamma (and beta) back to the host: one synchronization on a GPU.
    """
    if weight is None:
        return True
    gamma = weight.detach().abs()
    ok = gamma >= gamma_min
    if bias is not None:
        ok &= bias.detach().abs() * UNIT_ROUNDOFF.get(dtype, 2.0**-8) <= XHAT_TOL * gamma
    return bool(ok.all())


def _unit_stride(t: Tensor | None) -> Tensor | None:
    # The kernels address per-channel tensors as pointer + channel.
    return t if t is None or t.stride(0) == 1 or t.shape[0] <= 1 else t.contiguous()


def _torch_gradients(ctx, grad_output, saved):
    """The backward pass in torch operations, for what the kernels cannot do: a backward
    that is itself differentiated (``create_graph=True``) and batched gradients
    (``is_grads_batched=True``, a vmap over grad_output). The statistics are recomputed
    from x, so the gradients are differentiable functions of x, gamma, beta and the
    residual, as torch's BN backward is."""
    x, mean, var, weight, bias, residual, output = saved
    x_dtype = (output if ctx.memory_saving else x).dtype  # no residual with memory saving
    dims = [d for d in range(grad_output.dim()) if d != 1]
    shape = [1, -1] + [1] * (grad_output.dim() - 2)
    dy = grad_output.float()
    gamma = 1.0 if weight is None else weight.float().view(shape)
    beta = 0.0 if bias is None else bias.float().view(shape)
    if ctx.memory_saving:  # batched gradients only (double backward was refused)
        u = output.float()
        if ctx.activation == "leaky_relu":
            u = torch.where(u > 0, u, u / ctx.negative_slope)
        xhat = (u - beta) / gamma
        invstd = torch.rsqrt(var.float() + ctx.eps).view(shape)
    else:
        xf = x.float()
        if ctx.training:
            mean = xf.mean(dims, keepdim=True)
            var = xf.var(dims, correction=0, keepdim=True)
        else:
            mean, var = mean.float().view(shape), var.float().view(shape)
        invstd = torch.rsqrt(var + ctx.eps)
        xhat = (xf - mean) * invstd
        u = xhat * gamma + beta
        if residual is not None:
            u = u + residual.float()
    if ctx.activation == "relu":
        dy = torch.where(u > 0, dy, 0.0)
    elif ctx.activation == "leaky_relu":
        dy = torch.where(u > 0, dy, dy * ctx.negative_slope)
    if ctx.training:
        dx = dy - dy.mean(dims, keepdim=True) - xhat * (dy * xhat).mean(dims, keepdim=True)
    else:
        dx = dy
    dx = dx * (gamma * invstd)
    needs = ctx.needs_input_grad
    return (
        dx.to(x_dtype) if needs[0] else None,
        (dy * xhat).sum(dims).to(weight.dtype) if needs[1] and weight is not None else None,
        dy.sum(dims).to(bias.dtype) if needs[2] and bias is not None else None,
        dy.to(residual.dtype) if needs[3] and residual is not None else None,
    )


class BatchNormActFunction(torch.autograd.Function):
    """z = act(BN(x) + residual) by the Triton kernels, with the paper's backward (Sec. 3).

    Saves what torch's BN + activation would (x, and z for relu, whose backward reads the
    mask off z as torch's relu does; leaky_relu rebuilds its mask from x, as torch's saves
    its input), or with memory saving only z: then x can be freed after the forward, and the
    output must not be changed in place (the contract of torch's in-place activations).
    A backward that is itself differentiated, or batched over grad_outputs, is computed in
    torch operations (`_torch_gradients`).
    """

    @staticmethod
    def forward(
        ctx,
        input,
        weight,
        bias,
        residual,
        running_mean,
        running_var,
        training,
        eps,
        activation,
        negative_slope,
        memory_saving,
    ):  # noqa: D102
        ctx.activation, ctx.negative_slope, ctx.eps = activation, negative_slope, eps
        use_batch = training or running_mean is None
        ctx.training = use_batch
        out_dtype = input.dtype  # BN(x) + residual promotes as torch's add does
        if residual is not None:
            out_dtype = torch.promote_types(out_dtype, residual.dtype)
        if input.numel() == 0:
            # Empty batch, spatial size or channels: nothing to normalize, nothing to learn
            # from, no statistics (the caller commits nothing).
            ctx.empty = True
            ctx.save_for_backward(input, weight, bias, residual)
            none = input.new_full((input.shape[1],), float("nan"), dtype=torch.float32)
            ctx.mark_non_differentiable(none)
            return torch.empty_like(input, dtype=out_dtype), none, none
        ctx.empty = False
        w, b = _unit_stride(weight), _unit_stride(bias)
        if use_batch:
            output, mean, var = F.forward_train(
                input, w, b, residual, eps, activation, negative_slope, out_dtype
            )
        else:
            rm, rv = _unit_stride(running_mean), _unit_stride(running_var)
            output = F.forward_eval(
                input, w, b, residual, rm, rv, eps, activation, negative_slope, out_dtype
            )
            mean, var = rm.detach(), rv.detach()  # new tensors: an input is never an output
        ctx.memory_saving = memory_saving and gamma_invertible(
            weight, bias=bias, dtype=output.dtype
        )
        if ctx.memory_saving:
            ctx.save_for_backward(None, mean, var, weight, bias, residual, output)
        else:
            keep_output = activation == "relu"
            ctx.save_for_backward(
                input, mean, var, weight, bias, residual, output if keep_output else None
            )
        ctx.mark_non_differentiable(mean, var)
        return output, mean, var

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_var):  # noqa: D102
        needs = ctx.needs_input_grad[:4]
        try:
            saved = ctx.saved_tensors
        except RuntimeError as error:
            if ctx.memory_saving and "inplace" in str(error):
                raise RuntimeError(
                    "the output of a memory_saving=True BN layer was changed in place (e.g. "
                    "`out += x`): memory saving keeps only that output and rebuilds the input "
                    "from it, like torch's in-place activations. Write `out = out + x`, or use "
                    "memory_saving=False"
                ) from error
            raise
        if ctx.empty:
            input_grads = [
                torch.zeros_like(t) if t is not None and need else None
                for t, need in zip(saved, needs)
            ]
            return (*input_grads, *([None] * 7))
        if torch.is_grad_enabled() or transformed(grad_output):
            if ctx.memory_saving and torch.is_grad_enabled():
                raise RuntimeError(
                    "a double backward (create_graph=True) through a memory_saving=True BN "
                    "layer: the input was not kept, so the gradients cannot be differentiated "
                    "with respect to it; use memory_saving=False"
                )
            return (*_torch_gradients(ctx, grad_output, saved), *([None] * 7))
        x, mean, var, weight, bias, residual, output = saved
        dx, dw, db, dr = B.backward(
            grad_output,
            output if ctx.memory_saving else x,
            output,
            residual,
            mean,
            var,
            _unit_stride(weight),
            _unit_stride(bias),
            ctx.eps,
            ctx.activation,
            ctx.negative_slope,
            ctx.training,
            ctx.memory_saving,
            needs,
        )
        return dx, dw, db, dr, *([None] * 7)


def _check(
    input,
    weight,
    bias,
    residual,
    running_mean,
    running_var,
    num_batches_tracked,
    training,
    momentum,
    activation,
    negative_slope,
    memory_saving,
):
    if input.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *), got {tuple(input.shape)}")
    for name, t in (("input", input), ("residual", residual)):
        if t is not None and t.dtype not in DTYPES:
            raise TypeError(
                f"the Triton BN kernels take a float32, float16 or bfloat16 {name}, got "
                f"{t.dtype}: use the torch path (backend='torch') for other dtypes"
            )
    if has_tangent(input, weight, bias, residual):
        raise ValueError(
            "the Triton BN kernels have no forward-mode AD (a forward_ad tangent was given): "
            "use the torch path (backend='auto' and 'triton' layers take it by themselves)"
        )
    c = input.shape[1]
    for name, t in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"expected {name} of shape ({c},), got {tuple(t.shape)}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and c > 1 and t.stride(0) == 0:
            raise ValueError(
                f"expected a {name} whose entries do not share memory (it is written in "
                f"place), got stride 0"
            )
    check_residual(input, residual, memory_saving)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    check_activation(activation, negative_slope, memory_saving)
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)} on the kernels, got {activation!r}"
        )
    if training and running_mean is not None and momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if training and input.numel() > 0:
        check_training_batch(input, 1, input.numel() // c)


def batch_norm_act(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    activation: str = "identity",
    negative_slope: float = 0.01,
    residual: Tensor | None = None,
    memory_saving: bool = False,
) -> Tensor:
    """act(BN(input) + residual) in Triton kernels, updating the running buffers in place.

    Algorithm 1 in training (batch statistics; two kernel launches, one for small inputs),
    Algorithm 2's affine map otherwise (one elementwise launch). Conventions are those of
    `batchnorm.functional`; unlike its pure functions, this one writes the buffers as a
    layer's commit step does, by the same function (`commit_running_stats`, without a host
    synchronization on a GPU): the running statistics move (momentum weighs the new value;
    ``momentum=None`` is the cumulative average 1/(k+1), k = ``num_batches_tracked``) unless
    a statistic is not finite, and ``num_batches_tracked`` or ``num_batches_skipped`` is
    incremented.

    Args:
        input: (N, C, *) float32, float16 or bfloat16 on a CUDA device (or on the CPU under
            ``TRITON_INTERPRET=1``), any of NCHW, channels_last, NCDHW, NDHWC, (N, C, L),
            (N, C) layouts; strides are used as they are.
        weight, bias: gamma and beta (C,), or None; any stride.
        running_mean, running_var: (C,) buffers, or None (``track_running_stats=False``);
            any stride but 0 (written in place through it).
        num_batches_tracked, num_batches_skipped: 0-d int64 counters, or None.
        training: normalize with batch statistics (always when there are no running ones).
        activation: "identity", "relu" or "leaky_relu" (``negative_slope`` >= 0).
        residual: added after the affine map and before the activation (input's shape).
        memory_saving: keep only the output for the backward pass (In-Place ABN); needs an
            invertible activation and no residual, and the output must not be changed in
            place. Where some |gamma| < ``GAMMA_MIN`` or u_z |beta| > ``XHAT_TOL`` |gamma|
            the call keeps x instead: see `gamma_invertible` for the accuracy bound.

    Returns:
        The output, with the input's strides and dtype (promoted with the residual's, as
        torch's ``BN(x) + residual`` is); an empty input (N, C or the spatial size 0) gives
        an empty output and leaves every buffer untouched.
    """
    _check(
        input,
        weight,
        bias,
        residual,
        running_mean,
        running_var,
        num_batches_tracked,
        training,
        momentum,
        activation,
        negative_slope,
        memory_saving,
    )
    output, stats = transform(
        input, weight, bias, residual, running_mean, running_var, training, eps, activation,
        negative_slope, memory_saving,
    )  # fmt: skip
    if stats is not None and running_mean is not None and training:
        commit_running_stats(
            running_mean, running_var, stats, momentum, num_batches_tracked, num_batches_skipped
        )
    return output


def transform(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
    activation: str,
    negative_slope: float,
    memory_saving: bool,
) -> tuple[Tensor, BatchStats | None]:
    """The kernels as a transform step: (act(BN(input) + residual), the batch statistics or
    None), nothing written. For a caller that has checked its arguments (a layer:
    `batchnorm.dispatch`); `batch_norm_act` checks them, then commits what this returns.
    The statistics are None in eval mode with running statistics and for an empty input."""
    use_batch = training or running_mean is None
    count = input.numel() // input.shape[1] if input.shape[1] else 0
    if use_batch and count:
        check_training_batch(input, 1, count)
    output, mean, var = BatchNormActFunction.apply(
        input, weight, bias, residual, running_mean, running_var, training, eps, activation,
        negative_slope, memory_saving,
    )  # fmt: skip
    if not use_batch or input.numel() == 0:
        return output, None
    return output, BatchStats(mean, var, count)
