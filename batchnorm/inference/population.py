"""Algorithm 2's population statistics (Sec. 3.1): the estimators and the statistics pass.

`batchnorm.recalibrate` writes what they measure and `batchnorm.diagnose` compares it with
the running statistics; both go through this module, so both see the same batches the same
way and a model recalibrated on some data has exactly the population statistics `diagnose`
measures on it.

- `PopulationStats`: E[x] and Var[x] of one layer's input from its per-batch mu_B, sigma2_B
  and m, in float64, with either estimator (`ESTIMATORS`).
- `StatisticsPass`: runs batches through a model as Algorithm 2 sees them and feeds each
  layer's `PopulationStats`; the model is restored afterwards.

Statistical conventions (biased sigma2_B, unbiased population variance, m/(m-1)) are those
of `batchnorm.functional`.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm import functional as F
from batchnorm.swap import channel_axis

__all__ = [
    "ESTIMATORS",
    "check_estimator",
    "mask_argument",
    "PopulationStats",
    "StatisticsPass",
    "SKIPPED",
]

ESTIMATORS = ("algorithm2", "pooled")


def check_estimator(estimator: str) -> None:
    """Refuse an estimator name that is not one of `ESTIMATORS`."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {list(ESTIMATORS)}, got {estimator!r}")


class PopulationStats:
    """E[x] and Var[x] of one layer's input, from each batch's (mu_B, sigma2_B, m).

    "algorithm2" (Algorithm 2, step 2): E[x] = E_B[mu_B], Var[x] = E_B[m/(m-1) sigma2_B],
    every batch weighing the same. "pooled": the exact mean and unbiased variance of every
    value seen, whatever the batch split; each batch's (m, mu_B, M2 = m sigma2_B) is merged
    into the totals with `F.merge_stats`, which stays accurate where summing x and x^2 would
    cancel. The batch means are summed shifted by the first one (``ref``), also against
    cancellation. A batch with non-finite statistics is left out and counted in
    ``nonfinite``. Subclasses add their own terms by extending `add`.
    """

    def __init__(self, estimator: str = "algorithm2") -> None:
        check_estimator(estimator)
        self.estimator = estimator
        self.batches = 0  # batches added
        self.nonfinite = 0  # batches left out
        self.n = 0  # values per channel over the batches added
        self.ref: Tensor | None = None  # the first batch's mu_B
        self.sum_d: Tensor | float = 0.0  # sum of mu_B - ref
        self.sum_unbiased: Tensor | float = 0.0  # sum of m/(m-1) sigma2_B
        self.mean: Tensor | None = None  # pooled mean and M2 of the values seen
        self.m2: Tensor | None = None

    def add(self, mean: Tensor, var: Tensor, count: int) -> bool:
        """Add one batch: float64 mu_B and sigma2_B (C,), m >= 2 values per channel.

        Returns False when the batch was left out because a statistic is not finite."""
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            self.nonfinite += 1
            return False
        if self.ref is None:
            self.ref, self.mean, self.m2 = mean, mean, var * count
        elif self.estimator == "pooled":
            counts = torch.tensor([[self.n], [count]], dtype=mean.dtype, device=mean.device)
            _, self.mean, self.m2 = F.merge_stats(
                counts, torch.stack([self.mean, mean]), torch.stack([self.m2, var * count])
            )
        self.batches += 1
        self.n += count
        self.sum_d = self.sum_d + (mean - self.ref)
        self.sum_unbiased = self.sum_unbiased + var * (count / (count - 1))
        return True

    def merge(self, other: PopulationStats) -> None:
        """Add another accumulator's batches (another rank's: `StatisticsPass` with a process
        group) as if they had been added here: counts and sums add, the shifted sum of mu_B
        moves to this accumulator's ``ref``, and the pooled (n, mean, M2) merge exactly
        with `F.merge_stats` (Chan et al.)."""
        self.nonfinite += other.nonfinite
        if other.ref is None:  # the other saw no usable batch
            return
        if self.ref is None:
            self.ref, self.mean, self.m2 = other.ref, other.mean, other.m2
            self.batches, self.n = other.batches, other.n
            self.sum_d, self.sum_unbiased = other.sum_d, other.sum_unbiased
            return
        if self.estimator == "pooled":
            counts = torch.tensor([[self.n], [other.n]], dtype=self.mean.dtype)
            _, self.mean, self.m2 = F.merge_stats(
                counts.to(self.mean.device),
                torch.stack([self.mean, other.mean]),
                torch.stack([self.m2, other.m2]),
            )
        self.sum_d = self.sum_d + other.sum_d + other.batches * (other.ref - self.ref)
        self.sum_unbiased = self.sum_unbiased + other.sum_unbiased
        self.batches += other.batches
        self.n += other.n

    def result(self) -> tuple[Tensor, Tensor]:
        """(E[x], Var[x]) per channel; needs at least one batch added."""
        if self.estimator == "pooled":
            return self.mean, self.m2 / (self.n - 1)
        return self.ref + self.sum_d / self.batches, self.sum_unbiased / self.batches


class _TooFewValues(Exception):
    """Raised by a hook to abandon a batch in which a BN layer sees m < 2 values per channel."""

    def __init__(self, layer: str, count: int) -> None:
        super().__init__(layer, count)
        self.layer, self.count = layer, count


def mask_argument(layer: nn.Module, args: tuple, kwargs: dict) -> Tensor | None:
    """The ``mask`` a layer's forward was called with (our layers take one), or None: read
    from a forward pre-hook's arguments (this pass's hooks, `batchnorm.monitor`'s)."""
    if not kwargs and len(args) < 2:
        return None
    try:
        bound = inspect.signature(layer.forward).bind(*args, **kwargs)
    except TypeError:  # the forward itself will say what is wrong with the call
        return None
    mask = bound.arguments.get("mask")
    return mask if isinstance(mask, Tensor) else None


def _layer_batch_stats(layer: nn.Module, args: tuple, kwargs: dict, axis: int):
    """The (mu_B, sigma2_B, m) a training-mode layer normalizes this call's input with.

    The statistics of the layer's own transform: only the positions its ``mask`` selects,
    and one entry per group for Ghost BN (``virtual_batch_size``; each group is one batch of
    Algorithm 2, as the layer's running statistics treat it), else the whole input."""
    x = args[0] if args else kwargs.get("input")
    mask = mask_argument(layer, args, kwargs)
    v = getattr(layer, "virtual_batch_size", None)
    if v is not None and mask is None and v != x.shape[0]:
        s = F.ghost_batch_stats(x, axis, v)
        return [F.BatchStats(mean, var, s.count) for mean, var in zip(s.mean, s.var)]
    return [F.batch_stats(x, axis, mask)]


SKIPPED = object()
"""What `StatisticsPass.record` returns for a batch it skipped."""


def _first_input(batch, who: str) -> Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{who} expects batches that are tensors or tuples/lists whose first element is "
            f"the input tensor, got {type(x).__name__}"
        )
    return x


def _progress(iterable, total: int | None, who: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the progress bar is optional; the result is the same without it
        return iterable
    return tqdm(iterable, total=total, desc=who, unit="batch")


class StatisticsPass:
    """Batches through ``model`` as Algorithm 2 sees them, each BN input's statistics recorded.

    In `record`, every BN layer (any ``torch.nn.modules.batchnorm._BatchNorm``: ours, torch's,
    SyncBatchNorm) is in training mode, so it normalizes with its batch statistics as in
    training, and every other module is in eval mode (dropout off, as at inference). A
    forward pre-hook on each layer of ``layers`` records the per-channel mu_B and sigma2_B of
    its input (`F.batch_stats` on the layer's channel axis) and m, as the layer's transform
    sees them: only the positions its ``mask`` argument selects, and each Ghost BN group
    (``virtual_batch_size``) as a batch of its own; when the forward is done
    they go, in float64, to the layer's `PopulationStats` (k of them for a layer called k
    times). A batch in which some layer sees m < 2 values per channel is skipped as a whole:
    m/(m-1) is undefined there, a training-mode BN cannot normalize one value, and the layers
    after it would see activations unlike training's.

    Use as a context manager. A training-mode forward moves the running statistics and the
    counters (``num_batches_tracked``, ``num_batches_skipped``): every buffer of the model is
    put back after each batch, so each batch sees the model as it was (the statistics never
    depend on momentum or on the order of the batches) and the model is left as it was. On
    exit, also after an exception, the hooks are removed and every module's train/eval mode
    is restored. Inside an open `batchnorm.accumulate` the pass's forwards are not part of the
    logical step: the layers' deferral is suspended during the pass and restored after it.
    Runs under ``torch.no_grad``; parameters are never touched.

    Across processes (``process_group``): each rank runs its own batches, and `finish` pools
    every rank's accumulators into every rank's, as if one process had seen all the batches
    (rank 0's first, then rank 1's, ...): counts add, the pooled estimator merges exactly
    (`PopulationStats.merge`), and every rank ends with the same statistics. One
    ``all_gather_object`` of the accumulators (moved to the CPU; with NCCL the current CUDA
    device must be set, as torch requires for object collectives). Every rank of the group
    must run the pass, also with no batch of its own.

    Args:
        model: the model.
        layers: qualified name -> (layer, accumulator with ``add(mean, var, count)`` and
            ``merge(other)``).
        who: the caller's name, for messages and the progress bar.
        process_group: pool over the ranks of this group (``torch.distributed.group.WORLD``
            for all of them); None: this process alone.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, tuple[nn.Module, PopulationStats]],
        who: str,
        process_group=None,
    ) -> None:
        self.model = model
        self.layers = layers
        self.who = who
        self.process_group = process_group
        self.used = 0
        self.skipped: list[_TooFewValues] = []
        self._bn = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        first = next(itertools.chain(model.parameters(), model.buffers()), None)
        self.device = None if first is None else first.device
        self._pending: list[tuple[PopulationStats, Tensor, Tensor, int]] = []
        self._recording = False
        self._hooks: list = []
        self._modes: list = []
        self._saved: list = []
        self._deferred: list = []

    def __enter__(self) -> StatisticsPass:
        self._modes = [(m, m.training) for m in self.model.modules()]
        self._saved = [(b, b.clone()) for b in self.model.buffers()]
        # A layer inside an open `batchnorm.accumulate` defers its commit: this pass's
        # forwards are not micro-batches of that step, so the deferral is suspended here
        # (the layers commit, and every buffer is put back after each batch).
        self._deferred = [(m, m._pending) for m in self._bn if getattr(m, "_pending", None)]
        for m, _ in self._deferred:
            m._pending = None
        try:
            for name, (layer, acc) in self.layers.items():
                hook = self._hook(name, acc, channel_axis(layer))
                self._hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._recording = False
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for m, training in self._modes:
            m.training = training
        for m, pending in self._deferred:
            m._pending = pending
        self._deferred = []
        self._restore_buffers()

    def _hook(self, name: str, acc: PopulationStats, axis: int):
        def hook(module, args, kwargs):
            if not self._recording:
                return
            for s in _layer_batch_stats(module, args, kwargs, axis):
                count = int(s.count)
                if count < 2:
                    raise _TooFewValues(name, count)
                self._pending.append((acc, s.mean.double(), s.var.double(), count))

        return hook

    def _restore_buffers(self) -> None:
        with torch.no_grad():
            for b, saved in self._saved:
                b.copy_(saved)

    def inputs(self, data: Iterable, limit: int | None, progress: bool) -> Iterator[Tensor]:
        """The input tensor of each of the first ``limit`` batches (all when None), on the
        device of the model's first parameter or buffer. A batch is a tensor or a tuple/list
        whose first element is the input (a DataLoader of (input, target) works)."""
        total = limit
        if hasattr(data, "__len__"):
            total = len(data) if limit is None else min(limit, len(data))
        batches = data if limit is None else itertools.islice(data, limit)
        if progress:
            batches = _progress(batches, total, self.who)
        for batch in batches:
            x = _first_input(batch, self.who)
            yield x if self.device is None else x.to(self.device)

    def record(self, x: Tensor):
        """One forward with batch statistics, recorded; the model output, or `SKIPPED` when a
        layer saw fewer than 2 values per channel (nothing of that batch is recorded)."""
        self.model.eval()
        for m in self._bn:
            m.train()
        self._pending.clear()
        self._recording = True
        try:
            with torch.no_grad():
                output = self.model(x)
        except _TooFewValues as small:
            self.skipped.append(small)
            return SKIPPED
        finally:
            self._recording = False
            self._restore_buffers()
        for acc, mean, var, count in self._pending:
            acc.add(mean, var, count)
        self.used += 1
        return output

    def eval_output(self, x: Tensor):
        """The model's eval-mode output (running statistics) for ``x``; nothing recorded."""
        self.model.eval()
        try:
            with torch.no_grad():
                return self.model(x)
        finally:
            self._restore_buffers()

    def finish(self, *extra) -> int:
        """After the pass: pool over the process group (if any), warn once about skipped
        batches; the number of batches used (over every rank).

        Args:
            extra: further accumulators of the caller's (with ``merge(other)``) to pool
                over the ranks with the layers' ones.

        Raises:
            ValueError: no batch was used (on any rank).
        """
        if self.process_group is not None:
            self._pool(list(extra))
        if self.skipped:
            first = self.skipped[0]
            warnings.warn(
                f"{self.who} skipped {len(self.skipped)} batch(es) in which a BN layer saw "
                f"fewer than 2 values per channel (first: layer {first.layer!r} saw "
                f"{first.count}); Algorithm 2's unbiased variance needs m >= 2 (use "
                "drop_last=True to avoid a last batch of one sample)",
                stacklevel=3,
            )
        if self.used == 0:
            why = "the iterable was empty" if not self.skipped else "every batch was skipped"
            raise ValueError(
                f"{self.who} used no batch: {why}, so no statistics were computed and the "
                "model is unchanged"
            )
        return self.used

    def _pool(self, extra: list) -> None:
        """Merge every rank's accumulators (and counts) into this rank's, in rank order."""
        import torch.distributed as dist

        group = self.process_group
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"{self.who} was given a process_group, but torch.distributed is not "
                "initialized (call torch.distributed.init_process_group first)"
            )
        if dist.get_world_size(group) == 1:
            return
        mine = [acc for _, acc in self.layers.values()] + extra
        skipped = [(s.layer, s.count) for s in self.skipped]
        local = ([_map_tensors(acc, lambda t: t.cpu()) for acc in mine], self.used, skipped)
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, local, group=group)
        pooled = [copy.copy(acc) for acc in gathered[0][0]]
        for accs, _, _ in gathered[1:]:
            for total, acc in zip(pooled, accs, strict=True):
                total.merge(acc)
        device = self.device if self.device is not None else torch.device("cpu")
        for acc, total in zip(mine, pooled, strict=True):
            acc.__dict__.update(_map_tensors(total, lambda t: t.to(device)).__dict__)
        self.used = sum(used for _, used, _ in gathered)
        self.skipped = [_TooFewValues(*s) for _, _, skips in gathered for s in skips]


def _map_tensors(obj, fn):
    """A shallow copy of ``obj`` with ``fn`` applied to every tensor among its attributes
    (also inside dicts, tuples and lists)."""

    def convert(v):
        if isinstance(v, Tensor):
            return fn(v)
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        if isinstance(v, (tuple, list)):
            return type(v)(convert(x) for x in v)
        return v

    new = copy.copy(obj)
    new.__dict__ = {k: convert(v) for k, v in obj.__dict__.items()}
    return new
