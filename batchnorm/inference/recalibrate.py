"""Algorithm 2, step 2 (Sec. 3.1): population statistics recomputed with the weights frozen.

Moving averages mix statistics of many past weight settings and lag the final weights;
`recalibrate` instead averages the statistics of the trained network over training batches
(precise BN). Statistical conventions (biased sigma2_B, unbiased running_var, m/(m-1)) are
those of `batchnorm.functional`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from batchnorm.inference.population import PopulationStats, StatisticsPass, check_estimator
from batchnorm.swap import tracks_running_stats

__all__ = ["recalibrate"]


def recalibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    num_batches: int | None = None,
    estimator: str = "algorithm2",
    progress: bool = True,
    process_group=None,
) -> int:
    """Recompute every BN layer's population statistics with the weights frozen (Algorithm 2).

    Moving averages mix statistics of many past weight settings and lag the final weights;
    Algorithm 2 instead averages the statistics of the trained network over training batches.
    Each batch is passed through ``model`` once, with every BN layer in training mode so it
    normalizes with its batch statistics, as it did during training, and every other layer
    (dropout, ...) in eval mode, as at inference. A pre-forward hook records each BN input's
    per-channel mu_B and sigma2_B (`batchnorm.functional.batch_stats`, so our layers'
    channel axis is respected) of what the layer normalizes: only the positions its ``mask``
    selects, and for Ghost BN each group of ``virtual_batch_size`` examples as one batch
    (as the layer's own running statistics count them); the totals are kept in float64.
    This is precise BN (fvcore's ``update_bn_stats``) with a choice of estimator. The pass
    and the estimators are those of `batchnorm.inference.population`, which
    `batchnorm.diagnose` shares.

    Covers every ``torch.nn.modules.batchnorm._BatchNorm`` with running statistics: ours,
    ``torch.nn.BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (whose statistics are recorded per
    process, each batch normalized on its own: pass ``process_group`` to pool them). Layers
    with ``track_running_stats=False`` always use batch statistics and are skipped, and so are
    `FrozenBatchNorm` layers (frozen means frozen: unfreeze them first). A layer
    that receives no input (e.g. an auxiliary head the eval-mode model never runs) keeps its
    statistics, with a warning. A layer called k times per forward counts k batches.

    Batches too small to normalize: a batch in which any BN layer sees fewer than 2 values
    per channel (m < 2, e.g. the last batch of one sample from a DataLoader without
    ``drop_last``) is skipped as a whole, with one warning at the end. Algorithm 2's
    m/(m-1) is undefined there, a training-mode BN cannot normalize a single value, and
    the layers after it would see activations unlike any of training; skipping the whole
    batch keeps every layer's statistics from the same batches.

    Every buffer the training-mode forward moves (running statistics, ``num_batches_tracked``)
    is put back after each batch, so every batch sees the model as it was: the result depends
    neither on momentum nor on the order of the batches (Batch Renorm's training output uses
    the running statistics). On return the model's train/eval modes, momenta, parameters and
    ``num_batches_tracked`` are as they were; only ``running_mean`` and ``running_var`` hold
    the new values.

    Args:
        model: any module containing BN layers; its parameters are not changed.
        batches: an iterable of input tensors, or of tuples/lists whose first element is the
            input (a DataLoader of (input, target) works). Inputs are moved to the device of
            the model's first parameter or buffer.
        num_batches: draw at most this many batches (all of them when None); skipped
            batches count among them.
        estimator: "algorithm2": E[x] = mean over batches of mu_B and Var[x] = mean over
            batches of m/(m-1) sigma2_B, each batch weighing the same (exactly Algorithm 2).
            "pooled": the exact mean and unbiased variance of all values seen, as if they were
            one batch; invariant to how the samples are split into batches. With equal batch
            sizes the two means coincide; the pooled variance also counts the spread of the
            batch means, which Algorithm 2 leaves out.
        progress: show a tqdm progress bar (if tqdm is installed).
        process_group: recalibrate over every rank of this torch.distributed group
            (``torch.distributed.group.WORLD`` for all ranks): each rank passes its own
            batches (its shard), and every rank writes the statistics of all of them,
            exactly as one process would over the concatenated batches (rank 0's first),
            whatever the per-rank numbers of batches (fvcore#152: precise BN per rank
            otherwise gives each rank different statistics). Every rank must call it.
            None (the default): this process's batches alone.

    Returns:
        The number of batches used (skipped ones not counted), over every rank.

    Raises:
        ValueError: no BN layer with running statistics, no usable batch, an unknown
            estimator, or a batch with non-finite statistics (nothing is written then).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU())
        >>> data = [torch.randn(16, 4) for _ in range(5)]
        >>> recalibrate(net, data, progress=False)
        5
    """
    check_estimator(estimator)
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer or None, got {num_batches}")
    layers = [(name, m) for name, m in model.named_modules() if tracks_running_stats(m)]
    if not layers:
        raise ValueError(
            f"recalibrate found no BN layer with running statistics in {type(model).__name__} "
            "(track_running_stats=False layers always normalize with batch statistics)"
        )
    stats = {name: PopulationStats(estimator) for name, _ in layers}
    layer_stats = {n: (bn, stats[n]) for n, bn in layers}
    with StatisticsPass(model, layer_stats, "recalibrate", process_group) as run:
        for x in run.inputs(batches, num_batches, progress):
            run.record(x)
    used = run.finish()
    bad = [name for name, acc in stats.items() if acc.nonfinite]
    if bad:
        raise ValueError(
            f"recalibrate computed non-finite statistics for {bad} (NaN/Inf inputs or "
            "activations); no statistics were written"
        )
    unseen = [name for name, acc in stats.items() if acc.batches == 0]
    if unseen:
        warnings.warn(
            f"recalibrate: BN layers {unseen} received no input during the pass and keep "
            "their previous statistics",
            stacklevel=2,
        )
    with torch.no_grad():
        for name, bn in layers:
            if stats[name].batches:
                mean, var = stats[name].result()
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
    return used
