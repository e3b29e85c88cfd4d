"""Algorithm 1 (Sec. 3): the Batch Normalizing Transform, its statistics, its backward pass,
and the rule that moves the running statistics (Algorithm 2, step 2).

Everything here is a pure function: it computes and returns, new running statistics included,
and never writes into its arguments, so `torch.func` transforms and `torch.compile` apply. The
layers in `batchnorm.modules` are the one place that writes state back.

Conventions (stated once, here; the modules and the rest of the library refer to this).
Paper symbols map to torch names as gamma = ``weight``, beta = ``bias``, mu_B = batch mean,
sigma2_B = batch variance, E[x] = ``running_mean``, Var[x] = ``running_var``.

- Statistics are taken per channel over every other axis: per activation for (N, C), per
  feature map over N and all spatial positions for (N, C, *spatial) (Sec. 3.2, m' = m*p*q).
  ``axis`` names the channel axis (1 by default, -1 for channels-last data). m is the number
  of values per channel (with a mask: the number of positions it selects).
- Normalization uses the biased batch variance sigma2_B = 1/m sum (x - mu_B)^2 and
  xhat = (x - mu_B) / sqrt(sigma2_B + eps): eps goes inside the square root. eps must be
  positive when batch statistics are used and non-negative otherwise (as torch).
- ``running_var`` stores the unbiased variance m/(m-1) * sigma2_B (Algorithm 2, step 2).
- ``momentum`` weighs the NEW value (torch's convention):
  running = (1 - momentum) * running + momentum * batch. Keras/Flax's momentum 0.99 is
  torch's 0.01. A cumulative average (Algorithm 2's E_B over equal batches) is momentum
  1/k at the k-th update; the layers' ``momentum=None`` computes 1/k as a tensor.
- Half-precision input (float16/bfloat16) is normalized with float32 statistics and float32
  gamma/beta; the output keeps the input dtype.
- A batch whose statistics are not finite (NaN/Inf input, an overflowing variance) still
  produces its non-finite output, but the running statistics stay unchanged. ``updated``,
  whether they moved, is always a 0-d bool tensor on the statistics' device: one type in
  eager mode, under torch.compile and torch.func, on any device, and never a host sync.
- An empty batch (N = 0) in training gives an empty output and moves nothing, counters
  included (torch counts it in ``num_batches_tracked``); so does a batch whose mask selects no
  position, whose output is then the map without statistics, gamma * x + beta.
- Training needs more than one value per channel (the variance of one value is undefined).

The layers' forward reads top to bottom as validate -> transform -> commit: a transform
(`batch_norm_transform`, `batch_renorm_transform`, SyncBatchNorm's) returns the output and the
batch statistics `BatchStats`; `update_running_stats` is the one rule that turns them into new
running statistics, and the layer commits them in place.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd import forward_ad

__all__ = [
    "BatchStats",
    "BatchNormOutput",
    "batch_stats",
    "ghost_batch_stats",
    "merge_stats",
    "normalize",
    "inference_affine",
    "batch_norm_inference",
    "running_stats_step",
    "all_finite",
    "update_running_stats",
    "batch_norm_transform",
    "batch_norm",
    "BatchNormFunction",
    "batch_norm_backward",
    "batch_renorm_transform",
    "batch_renorm",
    "renorm_limits",
]


class BatchStats(NamedTuple):
    """Per-channel statistics of one mini-batch: mu_B, the biased sigma2_B, and m.

    ``count`` is an int, or a 0-d tensor where reading it back would synchronize (the global
    count of SyncBatchNorm)."""

    mean: Tensor
    var: Tensor
    count: int | Tensor


class BatchNormOutput(NamedTuple):
    """What `batch_norm` returns: y, the new running statistics, and whether they moved.

    ``updated`` is a 0-d bool tensor (see the module's conventions)."""

    output: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    updated: Tensor


def _channel_axis(input: Tensor, axis: int) -> int:
    if input.dim() < 2:
        raise ValueError(
            f"batch norm expects an input of at least 2 dimensions (N, C, ...), "
            f"got shape {tuple(input.shape)}"
        )
    if not -input.dim() <= axis < input.dim():
        raise ValueError(
            f"channel axis {axis} is out of range for input of shape {tuple(input.shape)}"
        )
    return axis % input.dim()


def transformed(t: Tensor) -> bool:
    """Whether ``t`` is wrapped by a torch.func transform or a vmap (the legacy one batches
    ``autograd.grad(..., is_grads_batched=True)``): no in-place ``out=`` writes, no data
    pointer for a kernel."""
    functorch = torch._C._functorch
    return (
        functorch.is_functorch_wrapped_tensor(t)
        or functorch.is_batchedtensor(t)
        or functorch.is_legacy_batchedtensor(t)
    )


def has_tangent(*tensors) -> bool:
    """Whether forward-mode AD (`torch.autograd.forward_ad`) carries a tangent on any of
    ``tensors`` (``None`` entries allowed)."""
    if getattr(forward_ad, "_current_level", 0) < 0:  # no dual level entered: the fast answer
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _reduce_dims(input: Tensor, axis: int) -> list[int]:
    return [d for d in range(input.dim()) if d != axis]


def _per_channel(t: Tensor, input: Tensor, axis: int) -> Tensor:
    """View a (C,) tensor so it broadcasts along ``axis`` of ``input``."""
    shape = [1] * input.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _stats_dtype(input: Tensor) -> torch.dtype:
    # Half-precision sums lose the mean; accumulate in float32 (float64 stays float64).
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _values_per_channel(input: Tensor, axis: int) -> int:
    return input.numel() // input.shape[axis] if input.shape[axis] else 0


def _check_eps(eps: float, batch_statistics: bool) -> None:
    # torch's rule: eps > 0 whenever the batch's own variance is normalized by (it may be 0),
    # eps >= 0 with population statistics.
    if batch_statistics and not eps > 0:
        raise ValueError(f"eps must be positive when normalizing with batch statistics, got {eps}")
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps}")


def _check_mask(mask: Tensor, input: Tensor, axis: int) -> None:
    """A mask is a bool tensor of the input's shape without the channel axis (any mode)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor (True = use this position), got {got}")
    expected = tuple(s for d, s in enumerate(input.shape) if d != axis)
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask must have the input's shape without the channel axis, {expected}, "
            f"got {tuple(mask.shape)} (input {tuple(input.shape)}, channel axis {axis})"
        )


def _check_training_batch(input: Tensor, axis: int, count: int, what: str = "") -> None:
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {count}{what} "
            f"(input size {tuple(input.shape)}, channel axis {axis}): the batch variance of a "
            "single value is undefined. Use a larger batch, drop the last incomplete batch, or "
            "evaluate with population statistics (eval mode)."
        )


def batch_stats(input: Tensor, axis: int = 1, mask: Tensor | None = None) -> BatchStats:
    """mu_B and the biased sigma2_B of Algorithm 1, per channel.

    Two passes (mean, then the mean of squared deviations), accumulated in float32 for half
    input: E[x^2] - E[x]^2 cancels catastrophically when |mean| >> std (1e4 + N(0, 1) in
    float32 loses every digit of the variance).

    Args:
        input: (N, C, *) with the channel at ``axis``.
        axis: the channel axis.
        mask: optional bool tensor of the input's shape without the channel axis; only
            positions marked True (e.g. the non-padded steps of a sequence) enter the
            statistics, and m counts them. Masked-out values are selected away, never
            multiplied by 0, so NaN, Inf or 1e30 there cannot reach the statistics.

    Returns:
        BatchStats(mean (C,), var (C,), count m) in float32 (float64 for float64 input).
        The mean of no values is NaN: callers check m first.
    """
    axis = _channel_axis(input, axis)
    x = input.to(_stats_dtype(input))
    dims = _reduce_dims(input, axis)
    if mask is None:
        # Explicit passes: torch.var_mean over non-innermost dims is ~15x slower on CPU.
        mean = x.mean(dims, keepdim=True)
        var = torch.square(x - mean).mean(dims)
        return BatchStats(mean.reshape(-1), var, _values_per_channel(input, axis))
    _check_mask(mask, input, axis)
    keep = mask.unsqueeze(axis)  # broadcasts over the channel axis
    count = int(mask.sum().item())
    x = torch.where(keep, x, 0.0)
    mean = x.sum(dims, keepdim=True) / count
    deviation = torch.where(keep, x - mean, 0.0)
    var = torch.square(deviation).sum(dims) / count
    return BatchStats(mean.reshape(-1), var, count)


def merge_stats(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact statistics of a union of parts from each part's (n, mean, M2 = n * sigma2).

    Chan, Golub & LeVeque's merge, with N = sum n_k:
    mean = sum n_k mean_k / N, M2 = sum M2_k + sum n_k (mean_k - mean)^2. No E[x^2] - E[x]^2
    cancellation; parts with n_k = 0 add nothing. Serves SyncBatchNorm (parts = ranks) and
    `recalibrate(estimator="pooled")` (parts = batches).

    Args:
        counts: (K, 1) values per channel in each part.
        means, m2s: (K, C).

    Returns:
        (N as a 0-d tensor, mean (C,), M2 (C,)); the biased variance is M2 / N.
    """
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return total, mean, m2


def inference_affine(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Algorithm 2, step 3: BN with fixed statistics as one affine map y = scale * x + shift.

    scale = gamma / sqrt(Var[x] + eps), shift = beta - gamma * E[x] / sqrt(Var[x] + eps).
    Missing gamma/beta count as 1/0. Used for inference, folding and export.
    """
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def normalize(
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> Tensor:
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, per channel along ``axis``.

    With batch statistics this is Algorithm 1's output; with population statistics it is
    Algorithm 2's inference transform. Computed in the statistics' dtype, returned in the
    input's.
    """
    axis = _channel_axis(input, axis)
    scale, shift = inference_affine(mean, var, weight, bias, eps)
    x = input.to(scale.dtype)
    y = torch.addcmul(_per_channel(shift, input, axis), x, _per_channel(scale, input, axis))
    return y.to(input.dtype)


def batch_norm_inference(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    backward: str = "native",
) -> Tensor:
    """Algorithm 2, step 3: normalize with the population statistics (one affine map).

    The native path is torch's kernel, which does not write to the running statistics in
    eval mode; the paper path (and any channel axis but 1) is `normalize`.
    """
    # torch's kernel has no case for parameters in another dtype than the statistics (bf16
    # parameters with fp32 buffers, as FSDP2's mixed precision casts them).
    same = weight is None or weight.dtype == running_var.dtype
    if backward == "native" and axis in (1, 1 - input.dim()) and same:
        return torch.batch_norm(
            input, weight, bias, running_mean, running_var, False, 0.0, eps,
            torch.backends.cudnn.enabled,
        )  # fmt: skip
    return normalize(input, running_mean, running_var, weight, bias, eps, axis)


def running_stats_step(
    running_mean: Tensor, running_var: Tensor, stats: BatchStats, momentum: float | Tensor
) -> tuple[Tensor, Tensor]:
    """One moving-average step towards a batch's statistics, unguarded (the module's rule).

    running_mean <- (1 - momentum) * running_mean + momentum * mu_B
    running_var  <- (1 - momentum) * running_var  + momentum * m/(m-1) * sigma2_B

    ``momentum`` may be a 0-d tensor (the layers' cumulative average 1/k stays in the graph
    under torch.compile). `update_running_stats` adds the non-finite guard.
    """
    count = stats.count
    mean = stats.mean.to(running_mean.dtype)
    var = stats.var.to(running_var.dtype) * (count / (count - 1))
    if isinstance(momentum, Tensor):
        momentum = momentum.to(running_mean.dtype)
    return torch.lerp(running_mean, mean, momentum), torch.lerp(running_var, var, momentum)


def all_finite(t: Tensor) -> Tensor:
    """0-d bool tensor: whether every value of ``t`` is finite (the running-statistics guard).

    The variance is computed from the mean, so a non-finite mean makes it non-finite too:
    the guard looks at the new variance alone.
    """
    return torch.isfinite(t).all()


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, stats: BatchStats, momentum: float | Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The running-statistics rule with its guard: `running_stats_step`, kept only if finite.

    Returns:
        (new_running_mean, new_running_var, updated); where the step is not finite the old
        statistics come back and ``updated`` (a 0-d bool tensor) is False. Nothing is read
        back to the host, so this is the same under torch.compile, torch.func and on GPUs.
    """
    new_mean, new_var = running_stats_step(running_mean, running_var, stats, momentum)
    updated = all_finite(new_var)
    return (
        torch.where(updated, new_mean, running_mean),
        torch.where(updated, new_var, running_var),
        updated,
    )


class BatchNormFunction(torch.autograd.Function):
    """Algorithm 1 with the paper's backward pass, for channel-at-axis-1 input.

    Forward saves only x, mu_B and 1/sqrt(sigma2_B + eps); backward recomputes xhat from them
    and applies the compact form of the paper's chain rule (Sec. 3), `batch_norm_backward`.
    The gradient flows through mu_B and sigma2_B (the two sums), which Sec. 2 shows is
    necessary. Returns (y, mu_B, sigma2_B); the statistics are not differentiable outputs.

    Twice differentiable: when a graph of the backward is requested (``create_graph=True``),
    the backward recomputes mu_B and sigma2_B from x with differentiable operations, so that
    the second derivative includes their dependence on x (saved statistics would be constants
    to autograd and give wrong second derivatives).
    """

    generate_vmap_rule = True  # forward and backward use only torch ops, so vmap may batch them

    @staticmethod
    def forward(input, weight, bias, eps):  # noqa: D102
        stats = batch_stats(input, 1)
        y = normalize(input, stats.mean, stats.var, weight, bias, eps, 1)
        return y, stats.mean, stats.var

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: D102
        input, weight, bias, eps = inputs
        _, mean, var = output
        ctx.save_for_backward(input, weight, mean, torch.rsqrt(var + eps))
        ctx.has_bias, ctx.eps = bias is not None, eps
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)  # no zero tensors for the statistics' (unused) grads

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):  # noqa: D102
        if grad_y is None:
            return None, None, None, None
        input, weight, mean, invstd = ctx.saved_tensors
        dims = _reduce_dims(input, 1)
        dtype = invstd.dtype
        if torch.is_grad_enabled():  # create_graph: mu_B and 1/s as differentiable functions of x
            mean, var, _ = batch_stats(input, 1)
            invstd = torch.rsqrt(var + ctx.eps)
        invstd = _per_channel(invstd, input, 1)
        xhat = (input.to(dtype) - _per_channel(mean, input, 1)) * invstd
        gamma = None if weight is None else _per_channel(weight.to(dtype), input, 1)
        grad_input, grad_gamma, grad_beta = batch_norm_backward(
            grad_y.to(dtype), xhat, invstd, gamma, dims
        )
        grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = grad_gamma.reshape(-1).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_beta.reshape(-1).to(grad_y.dtype if weight is None else weight.dtype)
        return grad_input.to(input.dtype), grad_weight, grad_bias, None


def batch_norm_backward(
    grad_output: Tensor,
    xhat: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    dims,
    *,
    count: int | Tensor | None = None,
    mask: Tensor | None = None,
    all_reduce=None,
    input_grad: bool = True,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """The paper's backward pass of Algorithm 1 (Sec. 3), compact form, as a pure function.

    With dl/dxhat = dl/dy * gamma, s = sqrt(sigma2_B + eps) and m values per channel:

        dl/dx     = gamma/(m s) * (m dl/dy - sum dl/dy - xhat * sum(dl/dy * xhat))
        dl/dgamma = sum dl/dy * xhat          dl/dbeta = sum dl/dy

    The one gradient helper of the library: `BatchNormFunction`, SyncBatchNorm's backward
    and the Figure 1 network's hand-written step all call it. Built from differentiable
    operations when grad mode is on (a graph of the backward is being recorded), in place
    otherwise.

    Args:
        grad_output: dl/dy.
        xhat: the normalized input, same shape.
        invstd: 1/s = 1/sqrt(sigma2_B + eps), shaped to broadcast against xhat.
        weight: gamma shaped like invstd, or None for gamma = 1.
        dims: the reduced (non-channel) dimensions.
        count: m (default: the number of values per channel, or the mask's count); a 0-d
            tensor is fine (SyncBatchNorm's global count).
        mask: bool, broadcastable to xhat: positions marked False (padding) add nothing to
            the two sums and get dl/dx = dl/dy * gamma / s (they did not enter mu_B, sigma2_B).
        all_reduce: a function that sums a tensor over processes in place (SyncBatchNorm):
            dl/dx then uses the sums over every process; dl/dgamma and dl/dbeta stay local.
        input_grad: whether to compute dl/dx (None is returned otherwise, and nothing is
            reduced).

    Returns:
        (dl/dx, dl/dgamma, dl/dbeta); the last two keep the reduced dims with size 1.
    """
    dy, xh = grad_output, xhat
    if mask is not None:  # select, never multiply: xhat may be NaN at padding
        dy = torch.where(mask, grad_output, 0.0)
        xh = torch.where(mask, xhat, 0.0)
    product = dy * xh
    grad_beta = dy.sum(dims, keepdim=True)
    grad_gamma = product.sum(dims, keepdim=True)
    if not input_grad:
        return None, grad_gamma, grad_beta
    sum_dy, sum_dy_xhat = grad_beta, grad_gamma
    if all_reduce is not None:
        sums = torch.cat([grad_beta, grad_gamma])
        all_reduce(sums)
        sum_dy, sum_dy_xhat = sums.chunk(2)
    if count is None:
        count = mask.expand_as(xhat).sum(dims, keepdim=True) if mask is not None else None
        if count is None:
            count = math.prod(xhat.shape[d] for d in dims)
    k = invstd if weight is None else invstd * weight
    if torch.is_grad_enabled() or transformed(dy):
        # Out of place, so that autograd can differentiate this backward (double backward)
        # and vmap can batch it (is_grads_batched, jacobian(vectorize=True)).
        grad_input = (dy - sum_dy / count - xh * (sum_dy_xhat / count)) * k
    else:
        # dl/dx = (dy - sum(dy)/m - xhat * sum(dy * xhat)/m) * gamma / s, in the buffer of
        # dy * xhat: one full-size temporary besides it.
        if isinstance(count, Tensor):
            grad_input = torch.sub(dy, sum_dy / count, out=product)
            grad_input.addcmul_(xh, sum_dy_xhat / count, value=-1)
        else:
            grad_input = torch.sub(dy, sum_dy, alpha=1 / count, out=product)
            grad_input.addcmul_(xh, sum_dy_xhat, value=-1 / count)
        grad_input.mul_(k)
    if mask is not None:
        grad_input = torch.where(mask, grad_input, grad_output * k)
    return grad_input, grad_gamma, grad_beta


def _empty_output(input: Tensor, weight: Tensor | None, bias: Tensor | None, axis: int) -> Tensor:
    # N = 0: no statistics; an empty y that still depends on x, gamma and beta (as torch's).
    y = input if weight is None else input * _per_channel(weight, input, axis)
    if bias is not None:
        y = y + _per_channel(bias, input, axis)
    return y.to(input.dtype) if y is not input else input.clone()


def batch_norm_transform(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    backward: str = "native",
    mask: Tensor | None = None,
    virtual_batch_size: int | None = None,
    stats: bool = True,
) -> tuple[Tensor, BatchStats | None]:
    """Algorithm 1: normalize with the batch's own statistics; return y and those statistics.

    The transform step of every BN layer (validate -> transform -> commit). Arguments are
    checked by the caller (`batch_norm` or the layer), except what only the batch can tell
    (too few values per channel, a virtual batch size that does not divide N).

    Args:
        input, weight, bias, eps, axis: as for `batch_norm`.
        backward: "native" (torch's fused kernel and its backward) or "paper"
            (`BatchNormFunction`, the paper's equations).
        mask: in-statistics positions, see `batch_stats`. Every position is normalized;
            padding is normalized with the (detached) batch statistics, so that whatever it
            holds reaches neither the statistics, the valid outputs, nor the gradients of
            gamma, beta and the valid inputs. Gradients flow by autograd.
        virtual_batch_size: Ghost BN, see `batch_norm`.
        stats: whether the caller needs the statistics (the native path computes them apart
            from torch's kernel, which keeps its own).

    Returns:
        (y, BatchStats(mu_B, sigma2_B, m) detached) or (y, None) for an empty batch, a mask
        that selects no position (or ``stats=False`` on the native path).
    """
    axis = _channel_axis(input, axis)
    count = _values_per_channel(input, axis)
    if count == 0:
        return _empty_output(input, weight, bias, axis), None
    if virtual_batch_size is not None and virtual_batch_size != input.shape[0]:
        if mask is not None:
            raise ValueError("virtual_batch_size and mask cannot be combined")
        return _ghost_transform(input, weight, bias, eps, axis, backward, virtual_batch_size, stats)
    if mask is not None:
        return _masked_transform(input, weight, bias, eps, axis, mask)
    _check_training_batch(input, axis, count)
    x = input.movedim(axis, 1) if axis != 1 else input
    if backward == "paper" and has_tangent(x, weight, bias):
        # Forward-mode AD: the paper's backward has no jvp, so Algorithm 1 in torch's
        # operations, whose forward derivatives torch knows (the same values).
        batch = batch_stats(x, 1)
        output = normalize(x, batch.mean, batch.var, weight, bias, eps, 1)
        batch = batch._replace(mean=batch.mean.detach(), var=batch.var.detach())  # as the paper's
    elif backward == "paper":
        output, mean, var = BatchNormFunction.apply(x, weight, bias, eps)
        batch = BatchStats(mean, var, count)
    else:
        output = torch.batch_norm(
            x, weight, bias, None, None, True, 0.0, eps, torch.backends.cudnn.enabled
        )
        batch = batch_stats(input.detach(), axis) if stats else None
    if axis != 1:
        output = output.movedim(1, axis)
    return output, batch


def _masked_transform(input, weight, bias, eps, axis, mask) -> tuple[Tensor, BatchStats | None]:
    s = batch_stats(input, axis, mask)
    if s.count == 0:
        # Every position is padding: no statistics, as in an empty batch, so nothing to commit
        # (None), and the empty batch's map gamma * x + beta; like all padding, it reaches no
        # gradient of gamma and beta (the selected branch below is empty).
        one = torch.ones_like(s.mean)
        scale = one if weight is None else one * weight
        shift = one - 1 if bias is None else (one - 1) + bias
        stats = None
    else:
        _check_training_batch(input, axis, s.count, " selected by the mask")
        scale, shift = inference_affine(s.mean, s.var, weight, bias, eps)
        stats = BatchStats(s.mean.detach(), s.var.detach(), s.count)
    keep = mask.unsqueeze(axis)
    x = input.to(scale.dtype)
    scale_c, shift_c = _per_channel(scale, input, axis), _per_channel(shift, input, axis)
    valid = torch.addcmul(shift_c, torch.where(keep, x, 0.0), scale_c)
    padding = torch.addcmul(shift_c.detach(), x, scale_c.detach())
    output = torch.where(keep, valid, padding).to(input.dtype)
    return output, stats


def _ghost_groups(input: Tensor, axis: int, v: int) -> tuple[Tensor, int]:
    """Ghost BN's view of a batch: (N, C, *S) with C at ``axis`` -> (v, G*C, *S), G = N / v.

    Channel j of group g lands on channel g*C + j, so per-channel statistics of the result
    are the groups' statistics: (G*C,) viewed as (G, C)."""
    n = input.shape[0]
    if axis == 0:
        raise ValueError("virtual_batch_size splits axis 0, which cannot be the channel axis")
    if v < 2 or n % v:
        raise ValueError(
            f"virtual_batch_size must be at least 2 and divide the batch size, got "
            f"virtual_batch_size={v} for a batch of {n} (input {tuple(input.shape)})"
        )
    g = n // v
    x = input.movedim(axis, 1)  # (N, C, *S)
    c, rest = x.shape[1], x.shape[2:]
    return x.reshape(g, v, c, *rest).transpose(0, 1).reshape(v, g * c, *rest), g


def ghost_batch_stats(input: Tensor, axis: int, virtual_batch_size: int) -> BatchStats:
    """mu_B and the biased sigma2_B of each Ghost BN group (Hoffer et al. 2017), per channel.

    The statistics each group of ``virtual_batch_size`` consecutive examples is normalized
    with in training (see `batch_norm`): BatchStats(mean (G, C), var (G, C), m per group).
    What `batchnorm.recalibrate` and `batchnorm.diagnose` record for a Ghost BN layer: each
    group is one batch of Algorithm 2.
    """
    axis = _channel_axis(input, axis)
    grouped, g = _ghost_groups(input, axis, virtual_batch_size)
    s = batch_stats(grouped, 1)
    return BatchStats(s.mean.view(g, -1), s.var.view(g, -1), s.count)


def _ghost_transform(input, weight, bias, eps, axis, backward, v, stats):
    """Ghost BN through the same transform: the G groups of v examples become G*C channels.

    (N, C, *S) -> (v, G*C, *S) (`_ghost_groups`), normalized per (group, channel) with gamma
    and beta repeated G times; the output is laid back. The statistics handed to the commit
    are the groups' means of mu_B and sigma2_B with m the group's count: the moving average
    is linear, so this is one step towards the mean of the groups' statistics (and a
    non-finite group makes the whole update non-finite, hence skipped).
    """
    grouped, g = _ghost_groups(input, axis, v)
    x = input.movedim(axis, 1)
    c, rest = x.shape[1], x.shape[2:]

    def repeat(t):
        return None if t is None else t.repeat(g)

    y, s = batch_norm_transform(
        grouped, repeat(weight), repeat(bias), eps, axis=1, backward=backward, stats=stats
    )
    y = y.reshape(v, g, c, *rest).transpose(0, 1).reshape(x.shape).movedim(1, axis)
    if s is None:
        return y, None
    return y, BatchStats(s.mean.view(g, c).mean(0), s.var.view(g, c).mean(0), s.count)


def _check_arguments(input, axis, eps, batch_statistics, backward, mask, virtual_batch_size):
    if backward not in ("native", "paper"):
        raise ValueError(f"backward must be 'native' or 'paper', got {backward!r}")
    axis = _channel_axis(input, axis)
    _check_eps(eps, batch_statistics)
    if mask is not None:
        _check_mask(mask, input, axis)
    if virtual_batch_size is not None:
        _check_virtual_batch_size(virtual_batch_size)
    return axis


def _check_virtual_batch_size(v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 2:
        raise ValueError(f"virtual_batch_size must be an int >= 2 or None, got {v!r}")


def _unchanged(running_mean, running_var, output, like: Tensor) -> BatchNormOutput:
    ref = running_var if running_var is not None else like
    updated = torch.zeros((), dtype=torch.bool, device=ref.device)
    return BatchNormOutput(output, running_mean, running_var, updated)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    backward: str = "native",
    mask: Tensor | None = None,
    virtual_batch_size: int | None = None,
) -> BatchNormOutput:
    """The BN transform: Algorithm 1 in training, Algorithm 2's fixed affine map otherwise.

    Arguments and their order follow ``torch.nn.functional.batch_norm``; unlike it, nothing is
    mutated: the new running statistics are returned. Conventions are in this module's doc.
    In training this is `batch_norm_transform` followed by `update_running_stats`.

    Args:
        input: (N, C, *) with channels at ``axis``.
        running_mean, running_var: (C,) population estimates, or None to always use batch
            statistics (``track_running_stats=False``).
        weight, bias: gamma and beta, (C,) or None.
        training: normalize with batch statistics (and return updated running statistics).
        momentum: weight of the new batch statistics in the running averages (a float or a
            0-d tensor).
        eps: added to the variance inside the square root.
        axis: the channel axis.
        backward: "native" uses torch's fused batch_norm kernel (fastest); "paper" uses
            `BatchNormFunction`, this library's implementation of the paper's equations.
        mask: optional bool tensor of the input's shape without the channel axis; in
            training only True positions enter mu_B and sigma2_B (see `batch_norm_transform`).
            Checked, then ignored, in eval mode.
        virtual_batch_size: Ghost BN (Hoffer et al. 2017): in training, each consecutive
            group of this many examples along axis 0 is normalized with its own mu_B and
            sigma2_B; gamma, beta and the running statistics are shared, the running
            statistics moving towards the mean of the groups' statistics. Must divide N.
            Outside training (without running statistics) the whole batch is normalized
            with its own statistics, whatever N.

    Returns:
        BatchNormOutput(output, running_mean, running_var, updated): the running statistics
        are the inputs themselves when they did not move (eval mode, not tracked, an empty or
        non-finite batch), and ``updated`` is a 0-d bool tensor.

    Example:
        >>> x = torch.randn(8, 3, 4, 4)
        >>> out = batch_norm(x, torch.zeros(3), torch.ones(3), training=True)
        >>> out.running_mean.shape, bool(out.updated)
        (torch.Size([3]), True)
    """
    use_batch_stats = training or running_mean is None or running_var is None
    axis = _check_arguments(input, axis, eps, use_batch_stats, backward, mask, virtual_batch_size)
    if not use_batch_stats:
        output = batch_norm_inference(
            input, running_mean, running_var, weight, bias, eps, axis=axis, backward=backward
        )
        return _unchanged(running_mean, running_var, output, input)
    tracking = training and running_mean is not None and running_var is not None
    output, stats = batch_norm_transform(
        input, weight, bias, eps, axis=axis, backward=backward, mask=mask,
        virtual_batch_size=virtual_batch_size if training else None, stats=tracking,
    )  # fmt: skip
    if not tracking or stats is None:
        return _unchanged(running_mean, running_var, output, input)
    new_mean, new_var, updated = update_running_stats(running_mean, running_var, stats, momentum)
    return BatchNormOutput(output, new_mean, new_var, updated)


def renorm_limits(step: int) -> tuple[float, float]:
    """Batch Renormalization's schedule for (r_max, d_max) at a training step (Ioffe 2017).

    r_max = 1 and d_max = 0 (plain BN) for the first 5K steps, then r_max grows linearly to 3
    by step 40K and d_max to 5 by step 25K.
    """
    if step <= 5000:
        return 1.0, 0.0
    r_max = 1.0 + 2.0 * min(1.0, (step - 5000) / 35000)
    d_max = 5.0 * min(1.0, (step - 5000) / 20000)
    return r_max, d_max


def _check_renorm_limits(r_max: float, d_max: float) -> None:
    if not (r_max >= 1 and d_max >= 0):
        raise ValueError(f"need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")


def batch_renorm_transform(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    axis: int = 1,
    backward: str = "native",
) -> tuple[Tensor, BatchStats | None]:
    """Batch Renormalization's training transform (Ioffe 2017): y and the batch statistics.

    With sigma_B = sqrt(sigma2_B + eps) and sigma = sqrt(Var[x] + eps) from the running
    statistics,

        r = clip(sigma_B / sigma, 1/r_max, r_max)    d = clip((mu_B - E[x]) / sigma, -d_max, d_max)
        y = gamma * (xhat * r + d) + beta

    with r and d constants in backprop. That is BN's transform with gamma' = gamma r and
    beta' = beta + gamma d, which is how it is computed: either backward applies unchanged
    (dl/dx is BN's with gamma', and autograd carries dl/dgamma' and dl/dbeta' to gamma, beta).
    """
    count = _values_per_channel(input, axis)
    if count == 0:
        return _empty_output(input, weight, bias, axis), None
    _check_training_batch(input, axis, count)
    stats = batch_stats(input.detach(), axis)
    sigma_b = torch.sqrt(stats.var + eps)
    sigma = torch.sqrt(running_var.to(sigma_b.dtype) + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max)
    d = ((stats.mean - running_mean.to(stats.mean.dtype)) / sigma).clamp(-d_max, d_max)
    if weight is not None:
        r, d = weight * r, weight * d
    if bias is not None:
        d = d + bias
    output, _ = batch_norm_transform(input, r, d, eps, axis=axis, backward=backward, stats=False)
    return output, stats


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.01,
    eps: float = 1e-5,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    axis: int = 1,
    backward: str = "native",
) -> BatchNormOutput:
    """Batch Renormalization (Ioffe 2017): Algorithm 1 corrected towards the population.

    In training, `batch_renorm_transform` then `update_running_stats`; unclipped, y equals
    the inference transform; r_max = 1, d_max = 0 is plain BN. In eval mode this is
    Algorithm 2's fixed map, exactly as `batch_norm`.

    Deviation from the paper, chosen so buffers and the eval map are BN's: the running
    statistics are ``running_mean`` and the unbiased ``running_var`` updated as in
    `batch_norm` (the paper averages sigma instead of the variance). Momentum weighs the new
    value; the paper's rate is 0.01.

    Returns:
        BatchNormOutput as `batch_norm` (the running statistics are required).
    """
    if running_mean is None or running_var is None:
        raise ValueError("batch_renorm needs running statistics (E[x], Var[x]) to correct towards")
    _check_renorm_limits(r_max, d_max)
    if not training:
        return batch_norm(
            input, running_mean, running_var, weight, bias, False, eps=eps, axis=axis,
            backward=backward,
        )  # fmt: skip
    axis = _check_arguments(input, axis, eps, True, backward, None, None)
    output, stats = batch_renorm_transform(
        input, running_mean, running_var, weight, bias, eps, r_max=r_max, d_max=d_max,
        axis=axis, backward=backward,
    )  # fmt: skip
    if stats is None:
        return _unchanged(running_mean, running_var, output, input)
    new_mean, new_var, updated = update_running_stats(running_mean, running_var, stats, momentum)
    return BatchNormOutput(output, new_mean, new_var, updated)
