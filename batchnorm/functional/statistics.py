"""Algorithm 1, steps 1-2: the mini-batch statistics mu_B and sigma2_B, per channel (Sec. 3.2),
with masks and Ghost BN's groups, and their exact merge over parts (micro-batches, ranks)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from batchnorm.functional.checks import (
    channel_axis,
    check_mask,
    reduce_dims,
    stats_dtype,
    values_per_channel,
)

__all__ = ["BatchStats", "batch_stats", "merge_stats", "ghost_groups", "ghost_batch_stats"]


class BatchStats(NamedTuple):
    """Per-channel statistics of one mini-batch: mu_B, the biased sigma2_B, and m.

    ``count`` is an int, or a 0-d tensor where reading it back would synchronize (the global
    count of SyncBatchNorm)."""

    mean: Tensor
    var: Tensor
    count: int | Tensor


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
    axis = channel_axis(input, axis)
    x = input.to(stats_dtype(input))
    dims = reduce_dims(input, axis)
    if mask is None:
        # Explicit passes: torch.var_mean over non-innermost dims is ~15x slower on CPU.
        mean = x.mean(dims, keepdim=True)
        var = torch.square(x - mean).mean(dims)
        return BatchStats(mean.reshape(-1), var, values_per_channel(input, axis))
    check_mask(mask, input, axis)
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


def ghost_groups(input: Tensor, axis: int, v: int) -> tuple[Tensor, int]:
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
    axis = channel_axis(input, axis)
    grouped, g = ghost_groups(input, axis, virtual_batch_size)
    s = batch_stats(grouped, 1)
    return BatchStats(s.mean.view(g, -1), s.var.view(g, -1), s.count)
