"""Algorithm 1 (Sec. 3): the Batch Normalizing Transform, its statistics and its backward pass.

Everything here is a pure function: it computes and returns, new running statistics included,
and never writes into its arguments, so `torch.func` transforms and `torch.compile` apply.

Conventions (stated once, here; the modules and the rest of the library refer to this).
Paper symbols map to torch names as gamma = ``weight``, beta = ``bias``, mu_B = batch mean,
sigma2_B = batch variance, E[x] = ``running_mean``, Var[x] = ``running_var``.

- Statistics are taken per channel over every other axis: per activation for (N, C), per
  feature map over N and all spatial positions for (N, C, *spatial) (Sec. 3.2, m' = m*p*q).
  ``axis`` names the channel axis (1 by default, -1 for channels-last data).
- Normalization uses the biased batch variance sigma2_B = 1/m sum (x - mu_B)^2 and
  xhat = (x - mu_B) / sqrt(sigma2_B + eps): eps goes inside the square root.
- ``running_var`` stores the unbiased variance m/(m-1) * sigma2_B (Algorithm 2, step 2), with
  m the number of values per channel in the batch.
- ``momentum`` weighs the NEW value (torch's convention):
  running = (1 - momentum) * running + momentum * batch. Keras/Flax's momentum 0.99 is
  torch's 0.01. A cumulative average (Algorithm 2's E_B over equal batches) is momentum
  1/k at the k-th update.
- Half-precision input (float16/bfloat16) is normalized with float32 statistics and float32
  gamma/beta; the output keeps the input dtype.
- A batch whose statistics are not finite still produces its (non-finite) output, but the
  running statistics are returned unchanged and ``updated`` is False.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BatchStats",
    "BatchNormOutput",
    "batch_stats",
    "merge_stats",
    "normalize",
    "inference_affine",
    "update_running_stats",
    "batch_norm",
    "BatchNormFunction",
    "batch_norm_backward",
    "batch_renorm",
    "renorm_limits",
]


class BatchStats(NamedTuple):
    """Per-channel statistics of one mini-batch: mu_B, the biased sigma2_B, and m."""

    mean: Tensor
    var: Tensor
    count: int


class BatchNormOutput(NamedTuple):
    """What `batch_norm` returns: y, the new running statistics, and whether they moved."""

    output: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    updated: bool | Tensor | None


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


def _mask_weights(mask: Tensor, input: Tensor, axis: int, dtype: torch.dtype) -> Tensor:
    """The mask as 0/1 weights that broadcast against ``input`` (a size-1 channel axis)."""
    expected = tuple(s for d, s in enumerate(input.shape) if d != axis)
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask must have the input's shape without the channel axis, {expected}, "
            f"got {tuple(mask.shape)} (input {tuple(input.shape)}, channel axis {axis})"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = use this position), got {mask.dtype}")
    return mask.unsqueeze(axis).to(dtype)


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
            statistics, and m counts them.

    Returns:
        BatchStats(mean (C,), var (C,), count m) in float32 (float64 for float64 input).
    """
    axis = _channel_axis(input, axis)
    x = input.to(_stats_dtype(input))
    dims = _reduce_dims(input, axis)
    if mask is None:
        # Explicit passes: torch.var_mean over non-innermost dims is ~15x slower on CPU.
        mean = x.mean(dims, keepdim=True)
        var = torch.square(x - mean).mean(dims)
        return BatchStats(mean.reshape(-1), var, _values_per_channel(input, axis))
    weights = _mask_weights(mask, input, axis, x.dtype)
    count = weights.sum()
    mean = (x * weights).sum(dims) / count
    var = ((x - _per_channel(mean, input, axis)) ** 2 * weights).sum(dims) / count
    return BatchStats(mean, var, int(count.item()))


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


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float,
) -> tuple[Tensor, Tensor]:
    """One moving-average step towards this batch's statistics (conventions in the module doc).

    Args:
        mean, var: the batch's mu_B and biased sigma2_B; var is stored unbiased, * m/(m-1).
        count: m, the values per channel.
        momentum: the weight of the new value.

    Returns:
        (new_running_mean, new_running_var). No guard against non-finite values here:
        `batch_norm` applies it.
    """
    mean = mean.to(running_mean.dtype)
    var = var.to(running_var.dtype) * (count / (count - 1))
    return torch.lerp(running_mean, mean, momentum), torch.lerp(running_var, var, momentum)


def _keep_if_finite(old_mean, old_var, new_mean, new_var):
    """Return the new statistics if all are finite, else the old ones; and which was chosen.

    A non-finite batch (NaN/Inf input, overflowing variance) must never poison the running
    statistics. On the CPU in eager mode the check is a Python bool (reading one number back
    costs nothing there); on accelerators, under torch.compile and under torch.func
    transforms it stays a tensor and selects with `torch.where`, so nothing synchronizes.
    """
    if (
        new_var.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(new_var)
    ):
        # The variance is computed from the mean, so a non-finite mean makes it non-finite
        # too: one sum of the new variances decides (a finite sum overflowing near 1e38
        # would skip the update, the safe outcome).
        if math.isfinite(new_var.sum().item()):
            return new_mean, new_var, True
        return old_mean, old_var, False
    # Same test as a tensor, in as few kernel launches as possible (eager GPU time here is
    # launch-bound): a sum of variances is never -inf, so s < inf exactly when s is finite.
    updated = new_var.sum() < math.inf
    return (
        torch.where(updated, new_mean, old_mean),
        torch.where(updated, new_var, old_var),
        updated,
    )


def tracked_output(output, running_mean, running_var, mean, var, count, momentum):
    """BatchNormOutput with running statistics moved towards (mean, biased var) of ``count``
    values per channel, guarded against non-finite batches (`_keep_if_finite`)."""
    new_mean, new_var = update_running_stats(
        running_mean, running_var, mean.detach(), var.detach(), count, momentum
    )
    return BatchNormOutput(output, *_keep_if_finite(running_mean, running_var, new_mean, new_var))


class BatchNormFunction(torch.autograd.Function):
    """Algorithm 1 with the paper's backward pass, for channel-at-axis-1 input.

    Forward saves only x, mu_B and 1/sqrt(sigma2_B + eps); backward recomputes xhat from them
    and applies the compact form of the paper's chain rule (Sec. 3), with s = sqrt(sigma2_B+eps):

        dl/dxhat  = dl/dy * gamma
        dl/dx     = 1/(m s) * (m dl/dxhat - sum dl/dxhat - xhat * sum(dl/dxhat * xhat))
        dl/dgamma = sum dl/dy * xhat          dl/dbeta = sum dl/dy

    The gradient flows through mu_B and sigma2_B (the two sums), which Sec. 2 shows is
    necessary. Returns (y, mu_B, sigma2_B); the statistics are not differentiable outputs.
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
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var)

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):  # noqa: D102
        input, weight, mean, invstd = ctx.saved_tensors
        dims = _reduce_dims(input, 1)
        dtype = invstd.dtype
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
    grad_output: Tensor, xhat: Tensor, invstd: Tensor, weight: Tensor | None, dims
) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's backward pass of Algorithm 1 (Sec. 3), compact form, as a pure function.

    With dl/dxhat = dl/dy * gamma and m values per channel:

        dl/dx     = gamma/(m s) * (m dl/dy - sum dl/dy - xhat * sum(dl/dy * xhat))
        dl/dgamma = sum dl/dy * xhat          dl/dbeta = sum dl/dy

    Args:
        grad_output: dl/dy.
        xhat: the normalized input, same shape.
        invstd: 1/s = 1/sqrt(sigma2_B + eps), shaped to broadcast against xhat.
        weight: gamma shaped like invstd, or None for gamma = 1.
        dims: the reduced (non-channel) dimensions.

    Returns:
        (dl/dx, dl/dgamma, dl/dbeta); the last two keep the reduced dims with size 1.
    """
    m = math.prod(xhat.shape[d] for d in dims)
    grad_beta = grad_output.sum(dims, keepdim=True)
    grad_gamma = (grad_output * xhat).sum(dims, keepdim=True)
    # dl/dx = (dy - sum(dy)/m - xhat * sum(dy * xhat)/m) * gamma / s, with one temporary.
    grad_input = torch.sub(grad_output, grad_beta, alpha=1 / m)
    grad_input.addcmul_(xhat, grad_gamma, value=-1 / m)
    grad_input.mul_(invstd if weight is None else invstd * weight)
    return grad_input, grad_gamma, grad_beta


def _check_training_batch(input: Tensor, axis: int, count: int | None = None) -> None:
    count = _values_per_channel(input, axis) if count is None else count
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {count} "
            f"(input size {tuple(input.shape)}, channel axis {axis}): the batch variance of a "
            "single value is undefined. Use a larger batch, drop the last incomplete batch, or "
            "evaluate with population statistics (eval mode)."
        )


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
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

    Args:
        input: (N, C, *) with channels at ``axis``.
        running_mean, running_var: (C,) population estimates, or None to always use batch
            statistics (``track_running_stats=False``).
        weight, bias: gamma and beta, (C,) or None.
        training: normalize with batch statistics (and return updated running statistics).
        momentum: weight of the new batch statistics in the running averages.
        eps: added to the variance inside the square root.
        axis: the channel axis.
        backward: "native" uses torch's fused batch_norm kernel (fastest); "paper" uses
            `BatchNormFunction`, this library's implementation of the paper's equations.
        mask: optional bool tensor of the input's shape without the channel axis; in
            training only True positions enter mu_B and sigma2_B (padding excluded), every
            position is normalized, and gradients flow by autograd. Ignored in eval mode.
        virtual_batch_size: Ghost BN (Hoffer et al. 2017): in training, each consecutive
            group of this many examples along axis 0 is normalized with its own mu_B and
            sigma2_B; gamma, beta and the running statistics are shared, the running
            statistics moving towards the mean of the groups' statistics. Must divide N.

    Returns:
        BatchNormOutput(output, running_mean, running_var, updated); running statistics are
        None when not tracked. ``updated`` is None when nothing is tracked, else whether the
        batch statistics were finite and used: a Python bool on the CPU in eager mode, a 0-d
        bool tensor where reading it back would synchronize (see `_keep_if_finite`).

    Example:
        >>> x = torch.randn(8, 3, 4, 4)
        >>> out = batch_norm(x, torch.zeros(3), torch.ones(3), training=True)
        >>> out.running_mean.shape
        torch.Size([3])
    """
    if backward not in ("native", "paper"):
        raise ValueError(f"backward must be 'native' or 'paper', got {backward!r}")
    axis = _channel_axis(input, axis)
    use_batch_stats = training or running_mean is None or running_var is None
    if not use_batch_stats:
        # Algorithm 2, step 3: one fixed affine map per channel. torch's kernel does not
        # write to the running statistics in eval mode, so the native path may use it.
        if backward == "native" and axis == 1:
            output = torch.batch_norm(
                input,
                weight,
                bias,
                running_mean,
                running_var,
                False,
                0.0,
                eps,
                torch.backends.cudnn.enabled,
            )
        else:
            output = normalize(input, running_mean, running_var, weight, bias, eps, axis)
        return BatchNormOutput(output, running_mean, running_var, None)

    tracking = training and running_mean is not None and running_var is not None
    if virtual_batch_size is not None and virtual_batch_size != input.shape[0]:
        return _ghost_batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            axis,
            backward,
            mask,
            virtual_batch_size,
        )
    if mask is not None:
        mean, var, count = batch_stats(input, axis, mask)
        _check_training_batch(input, axis, count)
        output = normalize(input, mean, var, weight, bias, eps, axis)
        if not tracking:
            return BatchNormOutput(output, running_mean, running_var, None)
        return tracked_output(output, running_mean, running_var, mean, var, count, momentum)

    _check_training_batch(input, axis)
    x = input.movedim(axis, 1) if axis != 1 else input
    if backward == "native":
        # torch's fused kernel updates running statistics in place: hand it copies, so the
        # caller's tensors stay untouched, and let it do the unbiased, momentum-weighted update.
        new_mean = running_mean.clone() if tracking else None
        new_var = running_var.clone() if tracking else None
        output = torch.batch_norm(
            x, weight, bias, new_mean, new_var, True, momentum, eps, torch.backends.cudnn.enabled
        )
    else:
        output, mean, var = BatchNormFunction.apply(x, weight, bias, eps)
    if axis != 1:
        output = output.movedim(1, axis)
    if not tracking:
        return BatchNormOutput(output, running_mean, running_var, None)
    if backward == "paper":
        count = _values_per_channel(input, axis)
        return tracked_output(output, running_mean, running_var, mean, var, count, momentum)
    return BatchNormOutput(output, *_keep_if_finite(running_mean, running_var, new_mean, new_var))


def _ghost_batch_norm(
    input,
    running_mean,
    running_var,
    weight,
    bias,
    training,
    momentum,
    eps,
    axis,
    backward,
    mask,
    virtual_batch_size,
) -> BatchNormOutput:
    """Ghost BN through the same core: the G groups of v examples become G*C channels.

    (N, C, *S) -> (v, G*C, *S), normalized per (group, channel) with gamma, beta and the
    running statistics repeated G times; the output is laid back and the G updated copies of
    the running statistics are averaged (the moving average is linear, so this is one step
    towards the mean of the groups' statistics).
    """
    n, v = input.shape[0], virtual_batch_size
    if mask is not None:
        raise ValueError("virtual_batch_size and mask cannot be combined")
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
    grouped = x.reshape(g, v, c, *rest).transpose(0, 1).reshape(v, g * c, *rest)

    def repeat(t):
        return None if t is None else t.repeat(g)

    out = batch_norm(
        grouped,
        repeat(running_mean),
        repeat(running_var),
        repeat(weight),
        repeat(bias),
        training,
        momentum,
        eps,
        axis=1,
        backward=backward,
    )
    y = out.output.reshape(v, g, c, *rest).transpose(0, 1).reshape(x.shape).movedim(1, axis)
    if out.updated is None:
        return BatchNormOutput(y, running_mean, running_var, None)
    updated = out.updated  # the inner call already checked every group's statistics
    if updated is False:
        return BatchNormOutput(y, running_mean, running_var, False)
    new_mean = out.running_mean.view(g, c).mean(0)
    new_var = out.running_var.view(g, c).mean(0)
    if updated is not True:  # a tensor: select without synchronizing
        new_mean = torch.where(updated, new_mean, running_mean)
        new_var = torch.where(updated, new_var, running_var)
    return BatchNormOutput(y, new_mean, new_var, updated)


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


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.01,
    eps: float = 1e-5,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    axis: int = 1,
) -> BatchNormOutput:
    """Batch Renormalization (Ioffe 2017): Algorithm 1 corrected towards the population.

    In training, with sigma_B = sqrt(sigma2_B + eps) and sigma = sqrt(Var[x] + eps) from the
    running statistics,

        r = clip(sigma_B / sigma, 1/r_max, r_max)    d = clip((mu_B - E[x]) / sigma, -d_max, d_max)
        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

    with r and d treated as constants in backprop (gradients flow through mu_B and sigma_B).
    Unclipped, y equals the inference transform; r_max = 1, d_max = 0 is plain BN. In eval
    mode this is Algorithm 2's fixed map, exactly as `batch_norm`.

    Deviation from the paper, chosen so buffers and the eval map are BN's: the running
    statistics are ``running_mean`` and the unbiased ``running_var`` updated as in
    `batch_norm` (the paper averages sigma instead of the variance). Momentum weighs the new
    value; the paper's rate is 0.01.

    Returns:
        BatchNormOutput as `batch_norm` (the running statistics are required).
    """
    if running_mean is None or running_var is None:
        raise ValueError("batch_renorm needs running statistics (E[x], Var[x]) to correct towards")
    if r_max < 1 or d_max < 0:
        raise ValueError(f"need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, eps=eps, axis=axis)
    axis = _channel_axis(input, axis)
    _check_training_batch(input, axis)
    mean, var, count = batch_stats(input, axis)
    sigma_b = torch.sqrt(var + eps)
    sigma = torch.sqrt(running_var.to(sigma_b.dtype) + eps)
    with torch.no_grad():
        r = (sigma_b / sigma).clamp(1 / r_max, r_max)
        d = ((mean - running_mean.to(mean.dtype)) / sigma).clamp(-d_max, d_max)
    # y = x * scale + shift per channel, scale = gamma r / sigma_B,
    # shift = beta + gamma (d - mu_B r / sigma_B): one pass over x.
    scale = r / sigma_b
    shift = d - mean * scale
    if weight is not None:
        scale, shift = scale * weight, shift * weight
    if bias is not None:
        shift = shift + bias
    x = input.to(scale.dtype)
    output = torch.addcmul(_per_channel(shift, input, axis), x, _per_channel(scale, input, axis))
    return tracked_output(
        output.to(input.dtype), running_mean, running_var, mean, var, count, momentum
    )
