"""Algorithm 2, step 2 (Sec. 3.1): population statistics recomputed with the weights frozen.

Moving averages mix statistics of many past weight settings and lag the final weights;
`recalibrate` instead averages the statistics of the trained network over training batches
(precise BN). Statistical conventions (biased sigma2_B, unbiased running_var, m/(m-1)) are
those of `batchnorm.functional`.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from batchnorm import functional as F
from batchnorm.inference.swap import channel_axis, tracks_running_stats

__all__ = ["recalibrate"]


class _Algorithm2Stats:
    """E[x] = E_B[mu_B], Var[x] = E_B[m/(m-1) sigma2_B]: every batch weighs the same."""

    def __init__(self) -> None:
        self.batches = 0
        self.sum_mean: Tensor | float = 0.0
        self.sum_var: Tensor | float = 0.0

    def add(self, mean: Tensor, var: Tensor, count: int) -> None:
        self.batches += 1
        self.sum_mean = self.sum_mean + mean
        self.sum_var = self.sum_var + var * (count / (count - 1))

    def result(self) -> tuple[Tensor, Tensor]:
        return self.sum_mean / self.batches, self.sum_var / self.batches


class _PooledStats:
    """Exact mean and unbiased variance of every value seen, whatever the batch split.

    Merges each batch's (m, mu_B, M2 = m sigma2_B) into the running totals with
    `F.merge_stats`, which stays accurate where summing x and x^2 would cancel.
    """

    def __init__(self) -> None:
        self.batches = 0
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, mean: Tensor, var: Tensor, count: int) -> None:
        self.batches += 1
        if self.mean is None:
            self.n, self.mean, self.m2 = count, mean, var * count
            return
        counts = torch.tensor([[self.n], [count]], dtype=mean.dtype, device=mean.device)
        _, self.mean, self.m2 = F.merge_stats(
            counts, torch.stack([self.mean, mean]), torch.stack([self.m2, var * count])
        )
        self.n += count

    def result(self) -> tuple[Tensor, Tensor]:
        return self.mean, self.m2 / (self.n - 1)


_ESTIMATORS = {"algorithm2": _Algorithm2Stats, "pooled": _PooledStats}


class _TooFewValues(Exception):
    """Raised by a hook to abandon a batch in which a BN layer sees m < 2 values per channel."""

    def __init__(self, layer: str, count: int) -> None:
        super().__init__(layer, count)
        self.layer, self.count = layer, count


def _first_input(batch) -> Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, Tensor):
        raise TypeError(
            "recalibrate expects batches that are tensors or tuples/lists whose first element "
            f"is the input tensor, got {type(x).__name__}"
        )
    return x


def _progress(iterable, total, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the progress bar is optional; the result is the same without it
        return iterable
    return tqdm(iterable, total=total, desc="recalibrate", unit="batch")


def recalibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    num_batches: int | None = None,
    estimator: str = "algorithm2",
    progress: bool = True,
) -> int:
    """Recompute every BN layer's population statistics with the weights frozen (Algorithm 2).

    Moving averages mix statistics of many past weight settings and lag the final weights;
    Algorithm 2 instead averages the statistics of the trained network over training batches.
    Each batch is passed through ``model`` once, with every BN layer in training mode so it
    normalizes with its batch statistics, as it did during training, and every other layer
    (dropout, ...) in eval mode, as at inference. A pre-forward hook records each BN input's
    per-channel mu_B and sigma2_B (`batchnorm.functional.batch_stats`, so our layers'
    channel axis is respected); the totals are kept in float64. This is precise BN
    (fvcore's ``update_bn_stats``) with a choice of estimator.

    Covers every ``torch.nn.modules.batchnorm._BatchNorm`` with running statistics: ours,
    ``torch.nn.BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (whose statistics are recorded per
    process; average the buffers across processes afterwards if the batches differ). Layers
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

    On return the model's train/eval modes, momenta, parameters and ``num_batches_tracked``
    are as they were; only ``running_mean`` and ``running_var`` hold the new values.

    Args:
        model: any module containing BN layers; its parameters are not changed.
        batches: an iterable of input tensors, or of tuples/lists whose first element is the
            input (a DataLoader of (input, target) works). Inputs are moved to the device of
            the first BN layer's statistics.
        num_batches: draw at most this many batches (all of them when None); skipped
            batches count among them.
        estimator: "algorithm2": E[x] = mean over batches of mu_B and Var[x] = mean over
            batches of m/(m-1) sigma2_B, each batch weighing the same (exactly Algorithm 2).
            "pooled": the exact mean and unbiased variance of all values seen, as if they were
            one batch; invariant to how the samples are split into batches. With equal batch
            sizes the two means coincide; the pooled variance also counts the spread of the
            batch means, which Algorithm 2 leaves out.
        progress: show a tqdm progress bar (if tqdm is installed).

    Returns:
        The number of batches used (skipped ones not counted).

    Raises:
        ValueError: no BN layer with running statistics, no usable batch, an unknown
            estimator, or non-finite statistics (nothing is written then).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU())
        >>> data = [torch.randn(16, 4) for _ in range(5)]
        >>> recalibrate(net, data, progress=False)
        5
    """
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(_ESTIMATORS)}, got {estimator!r}")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer or None, got {num_batches}")
    layers = [(name, m) for name, m in model.named_modules() if tracks_running_stats(m)]
    if not layers:
        raise ValueError(
            f"recalibrate found no BN layer with running statistics in {type(model).__name__} "
            "(track_running_stats=False layers always normalize with batch statistics)"
        )
    stats = {name: _ESTIMATORS[estimator]() for name, _ in layers}
    modes = [(m, m.training) for m in model.modules()]
    # A training-mode forward also moves the running buffers (and num_batches_tracked); they
    # are restored afterwards, so the result never depends on momentum.
    saved = {
        name: {k: b.clone() for k, b in bn._buffers.items() if b is not None} for name, bn in layers
    }
    device = layers[0][1].running_mean.device
    pending: list[tuple[object, Tensor, Tensor, int]] = []  # this batch's statistics

    def hook_for(name, acc, axis):
        def hook(module, args):
            s = F.batch_stats(args[0], axis)
            count = int(s.count)
            if count < 2:
                raise _TooFewValues(name, count)
            pending.append((acc, s.mean.double(), s.var.double(), count))

        return hook

    hooks = [
        bn.register_forward_pre_hook(hook_for(n, stats[n], channel_axis(bn))) for n, bn in layers
    ]
    total = num_batches
    if hasattr(batches, "__len__"):
        total = len(batches) if num_batches is None else min(num_batches, len(batches))
    used, skipped = 0, []
    try:
        model.eval()
        for _, bn in layers:
            bn.train()
        it = batches if num_batches is None else itertools.islice(batches, num_batches)
        with torch.no_grad():
            for batch in _progress(it, total, progress):
                pending.clear()
                try:
                    model(_first_input(batch).to(device))
                except _TooFewValues as small:
                    skipped.append(small)
                    continue
                for acc, mean, var, count in pending:
                    acc.add(mean, var, count)
                used += 1
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes:
            m.training = training
        for name, bn in layers:
            for k, b in saved[name].items():
                bn._buffers[k].copy_(b)
    if skipped:
        first = skipped[0]
        warnings.warn(
            f"recalibrate skipped {len(skipped)} batch(es) in which a BN layer saw fewer than 2 "
            f"values per channel (first: layer {first.layer!r} saw {first.count}); Algorithm "
            "2's unbiased variance needs m >= 2 (use drop_last=True to avoid a last batch of "
            "one sample)",
            stacklevel=2,
        )
    if used == 0:
        why = "the iterable was empty" if not skipped else "every batch was skipped"
        raise ValueError(
            f"recalibrate used no batch: {why}, so no statistics were computed and "
            "the model is unchanged"
        )
    results, unseen, bad = {}, [], []
    for name, _ in layers:
        if stats[name].batches == 0:
            unseen.append(name)
            continue
        mean, var = stats[name].result()
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            bad.append(name)
        results[name] = (mean, var)
    if bad:
        raise ValueError(
            f"recalibrate computed non-finite statistics for {bad} (NaN/Inf inputs or "
            "activations); no statistics were written"
        )
    if unseen:
        warnings.warn(
            f"recalibrate: BN layers {unseen} received no input during the pass and keep "
            "their previous statistics",
            stacklevel=2,
        )
    with torch.no_grad():
        for name, bn in layers:
            if name in results:
                mean, var = results[name]
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
    return used
