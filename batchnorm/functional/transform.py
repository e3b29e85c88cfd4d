"""Algorithm 1 (Sec. 3): the Batch Normalizing Transform of a mini-batch, with masks and Ghost BN,
and `batch_norm`, the functional form of a whole BN layer (torch.nn.functional's arguments,
nothing mutated)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from batchnorm.functional.backward import BatchNormFunction
from batchnorm.functional.checks import (
    channel_axis,
    check_arguments,
    check_training_batch,
    has_tangent,
    per_channel,
    values_per_channel,
)
from batchnorm.functional.normalize import batch_norm_inference, inference_affine, normalize
from batchnorm.functional.running import update_running_stats
from batchnorm.functional.statistics import BatchStats, batch_stats, ghost_groups

__all__ = ["BatchNormOutput", "batch_norm_transform", "batch_norm", "empty_output", "unchanged"]


class BatchNormOutput(NamedTuple):
    """What `batch_norm` returns: y, the new running statistics, and whether they moved.

    ``updated`` is a 0-d bool tensor (see the module's conventions)."""

    output: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    updated: Tensor


def empty_output(input: Tensor, weight: Tensor | None, bias: Tensor | None, axis: int) -> Tensor:
    # N = 0: no statistics; an empty y that still depends on x, gamma and beta (as torch's).
    y = input if weight is None else input * per_channel(weight, input, axis)
    if bias is not None:
        y = y + per_channel(bias, input, axis)
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
    axis = channel_axis(input, axis)
    count = values_per_channel(input, axis)
    if count == 0:
        return empty_output(input, weight, bias, axis), None
    if virtual_batch_size is not None and virtual_batch_size != input.shape[0]:
        if mask is not None:
            raise ValueError("virtual_batch_size and mask cannot be combined")
        return _ghost_transform(input, weight, bias, eps, axis, backward, virtual_batch_size, stats)
    if mask is not None:
        return _masked_transform(input, weight, bias, eps, axis, mask)
    check_training_batch(input, axis, count)
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
        check_training_batch(input, axis, s.count, " selected by the mask")
        scale, shift = inference_affine(s.mean, s.var, weight, bias, eps)
        stats = BatchStats(s.mean.detach(), s.var.detach(), s.count)
    keep = mask.unsqueeze(axis)
    x = input.to(scale.dtype)
    scale_c, shift_c = per_channel(scale, input, axis), per_channel(shift, input, axis)
    valid = torch.addcmul(shift_c, torch.where(keep, x, 0.0), scale_c)
    padding = torch.addcmul(shift_c.detach(), x, scale_c.detach())
    output = torch.where(keep, valid, padding).to(input.dtype)
    return output, stats


def _ghost_transform(input, weight, bias, eps, axis, backward, v, stats):
    """Ghost BN through the same transform: the G groups of v examples become G*C channels.

    (N, C, *S) -> (v, G*C, *S) (`ghost_groups`), normalized per (group, channel) with gamma
    and beta repeated G times; the output is laid back. The statistics handed to the commit
    are the groups' means of mu_B and sigma2_B with m the group's count: the moving average
    is linear, so this is one step towards the mean of the groups' statistics (and a
    non-finite group makes the whole update non-finite, hence skipped).
    """
    grouped, g = ghost_groups(input, axis, v)
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


def unchanged(running_mean, running_var, output, like: Tensor) -> BatchNormOutput:
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
    axis = check_arguments(input, axis, eps, use_batch_stats, backward, mask, virtual_batch_size)
    if not use_batch_stats:
        output = batch_norm_inference(
            input, running_mean, running_var, weight, bias, eps, axis=axis, backward=backward
        )
        return unchanged(running_mean, running_var, output, input)
    tracking = training and running_mean is not None and running_var is not None
    output, stats = batch_norm_transform(
        input, weight, bias, eps, axis=axis, backward=backward, mask=mask,
        virtual_batch_size=virtual_batch_size if training else None, stats=tracking,
    )  # fmt: skip
    if not tracking or stats is None:
        return unchanged(running_mean, running_var, output, input)
    new_mean, new_var, updated = update_running_stats(running_mean, running_var, stats, momentum)
    return BatchNormOutput(output, new_mean, new_var, updated)
