"""Batch Renormalization (Ioffe 2017): Algorithm 1 corrected towards the population statistics,
as a transform step (for the layers) and as a functional `batch_renorm`."""

from __future__ import annotations

import torch
from torch import Tensor

from batchnorm.functional.checks import (
    check_arguments,
    check_renorm_limits,
    check_training_batch,
    values_per_channel,
)
from batchnorm.functional.running import update_running_stats
from batchnorm.functional.statistics import BatchStats, batch_stats
from batchnorm.functional.transform import (
    BatchNormOutput,
    batch_norm,
    batch_norm_transform,
    empty_output,
    unchanged,
)

__all__ = ["renorm_limits", "batch_renorm_transform", "batch_renorm"]


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
    count = values_per_channel(input, axis)
    if count == 0:
        return empty_output(input, weight, bias, axis), None
    check_training_batch(input, axis, count)
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
    check_renorm_limits(r_max, d_max)
    if not training:
        return batch_norm(
            input, running_mean, running_var, weight, bias, False, eps=eps, axis=axis,
            backward=backward,
        )  # fmt: skip
    axis = check_arguments(input, axis, eps, True, backward, None, None)
    output, stats = batch_renorm_transform(
        input, running_mean, running_var, weight, bias, eps, r_max=r_max, d_max=d_max,
        axis=axis, backward=backward,
    )  # fmt: skip
    if stats is None:
        return unchanged(running_mean, running_var, output, input)
    new_mean, new_var, updated = update_running_stats(running_mean, running_var, stats, momentum)
    return BatchNormOutput(output, new_mean, new_var, updated)
