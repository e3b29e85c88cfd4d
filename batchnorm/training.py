"""BN in real training loops (Sec. 3, 3.1): gradient accumulation and repeated forwards
(`accumulate`), checkpoint recomputation (`checkpoint_safe`), EMA models and target networks
(`ema_update`).

A BN layer in training commits its running statistics at every forward (Algorithm 2, step 2
with the moving average of `batchnorm.functional`). Three common loops break the premise
"one forward = one optimizer step's batch":

- gradient accumulation splits a logical batch into micro-batches, and a GAN discriminator
  or a two-view method (SimCLR, BYOL) calls the same layers twice per step: the running
  statistics take k momentum steps towards k small batches instead of one towards the
  logical batch (a different running_var, and momentum compounding k times);
- activation checkpointing runs a segment's forward again inside backward, and torch.nn's
  layers commit that recomputation too (the running statistics move twice);
- an EMA copy of the model (mean teacher, BYOL, DQN targets) that averages only the
  parameters keeps the running statistics it was created with (ignite#2590).

`accumulate` defers our layers' commit: each forward's batch statistics (m, mu_B, M2 =
m sigma2_B) are kept in a pending slot and merged exactly (Chan et al., `merge_stats`) into
one commit by the layer's own rule (momentum, momentum=None's 1/k, m/(m-1), the non-finite
guard). Normalization stays per forward.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm import functional as F
from batchnorm.inference.recalibrate import recalibrate
from batchnorm.modules import _BatchNormBase, recomputing

__all__ = ["Accumulation", "accumulate", "checkpoint_safe", "ema_update", "EMA_BUFFERS"]

EMA_BUFFERS = ("copy", "ema", "recalibrate")


class _Pending:
    """One layer's deferred commit: the batch statistics of its forwards since the last
    commit, and their merge into the statistics of one forward over all of them.

    Plain BN (masks and SyncBatchNorm's global statistics included): the exact merge of
    (m, mu_B, M2) over the forwards, `F.merge_stats` in float64, so the commit equals one
    forward over the concatenated batch. Ghost BN commits the mean of its groups' mu_B and
    unbiased variances (see `F.batch_norm`'s ``virtual_batch_size``): the forwards' group
    means are weighted by their number of groups, so that again the commit is that of one
    forward over the concatenation. A non-finite forward makes the merge non-finite: the
    whole logical step is skipped by the commit's guard, and counted once.
    """

    def __init__(self, ghost: bool) -> None:
        self.ghost = ghost
        self.stats: list[F.BatchStats] = []
        self.groups: list[int] = []  # Ghost BN: each forward's number of groups
        self.current_groups = 0  # Ghost BN: N / v of the forward in progress (a pre-hook)

    def add(self, stats: F.BatchStats) -> None:
        self.stats.append(stats)
        if self.ghost:
            self.groups.append(self.current_groups)

    def merged(self) -> F.BatchStats | None:
        """The statistics one forward over every batch added would have committed."""
        if not self.stats:
            return None
        dtype = self.stats[0].mean.dtype
        means = torch.stack([s.mean.double() for s in self.stats])  # (K, C)
        variances = torch.stack([s.var.double() for s in self.stats])
        counts = [s.count for s in self.stats]
        if self.ghost:
            # Every group holds m values per channel: mean over all groups, each weighing 1.
            groups = _column(self.groups, means)
            m = counts[0]
            unbiased = variances * _column([c / (c - 1) for c in counts], means)
            mean = (groups * means).sum(0) / groups.sum()
            var = (groups * unbiased).sum(0) / groups.sum() * ((m - 1) / m)
            return F.BatchStats(mean.to(dtype), var.to(dtype), m)
        n = _column(counts, means)
        total, mean, m2 = F.merge_stats(n, means, variances * n)
        # An int count where every forward had one (no read-back of the tensor total).
        count = sum(counts) if all(isinstance(c, int) for c in counts) else total
        return F.BatchStats(mean.to(dtype), (m2 / total).to(dtype), count)


def _column(values: list, like: Tensor) -> Tensor:
    """(K, 1) float64 on ``like``'s device from Python numbers (device fills, not a copy from
    the host) or 0-d tensors (SyncBatchNorm's global count, never read back)."""
    return torch.stack(
        [v.to(like) if isinstance(v, Tensor) else like.new_full((), float(v)) for v in values]
    ).unsqueeze(1)


class Accumulation:
    """Deferred running-statistics commits for the BN layers of a model; see `accumulate`."""

    def __init__(self, model: nn.Module, steps: int | None = None) -> None:
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
        ):
            raise ValueError(f"steps must be a positive int or None, got {steps!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"accumulate expects an nn.Module, got {type(model).__name__}")
        theirs = [
            name for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and not isinstance(m, _BatchNormBase)
            and m.track_running_stats
        ]  # fmt: skip
        if theirs:
            raise TypeError(
                f"accumulate defers the commit of batchnorm's layers; {theirs} are torch.nn BN "
                "layers, which commit inside torch's kernel. Convert them first: "
                "model = batchnorm.convert(model)"
            )
        self.layers = [m for m in model.modules() if isinstance(m, _BatchNormBase)]
        self.layers = [m for m in self.layers if m.track_running_stats]
        if not self.layers:
            raise ValueError(
                f"accumulate found no BN layer with running statistics in {type(model).__name__}"
            )
        busy = [m for m in self.layers if m._pending is not None]
        if busy:
            raise RuntimeError(
                "accumulate: these layers already defer their commit to another accumulate "
                f"that is still open: {busy[:3]}; close it (or leave its `with`) first"
            )
        self.steps = steps
        self.forwards = 0  # forwards of ``model`` since the last commit (counted with steps)
        self._handles = []
        for layer in self.layers:  # modules() lists a shared layer once
            ghost = layer.virtual_batch_size is not None
            layer._pending = _Pending(ghost)
            if ghost:
                self._handles.append(layer.register_forward_pre_hook(_count_groups))
        if steps is not None:
            self._handles.append(model.register_forward_hook(self._after_forward))
        self.open = True

    def _after_forward(self, module, args, output) -> None:
        if not module.training or recomputing():
            return  # evaluation and checkpoint recomputation are not micro-batches
        self.forwards += 1
        if self.forwards == self.steps:
            self.step()

    def step(self) -> None:
        """Commit: each layer's running statistics take one step towards the merged
        statistics of its forwards since the last commit (nothing for a layer that ran none),
        and the layers keep deferring. Call it next to ``optimizer.step()``."""
        if not self.open:
            raise RuntimeError("this accumulate was closed; start a new one")
        self.forwards = 0
        for layer in self.layers:
            pending = layer._pending
            stats = pending.merged()
            pending.stats, pending.groups = [], []
            if stats is not None:
                layer._pending = None  # the one commit rule, now for real
                try:
                    layer._commit(stats)
                finally:
                    layer._pending = pending

    def discard(self) -> None:
        """Drop what is pending without committing (e.g. a skipped optimizer step)."""
        self.forwards = 0
        for layer in self.layers:
            layer._pending.stats, layer._pending.groups = [], []

    def close(self) -> None:
        """Commit what is pending (`step`) and stop deferring: later forwards commit each."""
        if self.open:
            self.step()
            self._release()

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        for layer in self.layers:
            layer._pending = None
        self.open = False

    def __enter__(self) -> Accumulation:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # an interrupted logical step commits nothing
            self.discard()
            self._release()


def _count_groups(layer: nn.Module, args: tuple) -> None:
    # Ghost BN's merge weighs each forward by its number of groups, N / virtual_batch_size.
    if layer._pending is not None and args and isinstance(args[0], Tensor) and args[0].dim() > 0:
        layer._pending.current_groups = args[0].shape[0] // layer.virtual_batch_size


def accumulate(model: nn.Module, steps: int | None = None) -> Accumulation:
    """Commit the BN layers' running statistics once per logical step, not once per forward.

    For gradient accumulation (k micro-batches per optimizer step) and for repeated
    forwards in one step (a GAN discriminator on real and fake batches, two augmented views):
    while the returned `Accumulation` is open, every BN layer of ``model`` keeps the batch
    statistics of each training forward (m, mu_B, M2 = m sigma2_B: only the positions a
    ``mask`` selects; for SyncBatchNorm the statistics already merged over ranks) instead of
    committing them. A commit merges them exactly (Chan et al., `functional.merge_stats`) and
    moves the running statistics once by the layer's own rule (Algorithm 2, step 2:
    momentum, or momentum=None's 1/k with k counting logical steps; m/(m-1) with m the
    logical batch's count; the non-finite guard: one bad forward skips the whole step's
    update, counted once in ``num_batches_skipped``). The running statistics and counters
    are then those of ONE forward over the concatenation of the forwards' inputs (Ghost BN:
    of one Ghost BN forward over it, the mean over all its groups).

    Normalization is unchanged: each forward is normalized with its own batch statistics,
    so outputs and gradients are those of the loop without `accumulate`. Batch Renorm reads
    the running statistics in training: they now stay at the last logical step's values
    through the whole step, as in one forward over the logical batch. While deferring, our
    layers take the torch path (torch's fused kernel and the Triton kernels update the
    buffers themselves). torch.nn's BN layers commit inside torch's kernel and are refused:
    convert them first (``batchnorm.convert(model)``).

    Commit when:
        - the ``with`` block exits normally (an exception discards the pending statistics);
        - `Accumulation.step()` is called (e.g. next to ``optimizer.step()``);
        - with ``steps=k``, after every k-th training-mode forward of ``model`` itself
          (eval-mode forwards and those autograd recomputes for checkpointing are not
          counted); what is left commits on exit or `Accumulation.close()`.

    Args:
        model: the module whose BN layers defer (ours, any subclass; shared layers once).
        steps: commit automatically every ``steps`` forwards of ``model`` (None: only on
            `step`/exit).

    Returns:
        An open `Accumulation`, also a context manager.

    Example:
        >>> import batchnorm
        >>> net = nn.Sequential(nn.Linear(4, 8), batchnorm.BatchNorm1d(8))
        >>> with batchnorm.accumulate(net):
        ...     for micro in torch.randn(32, 4).chunk(4):
        ...         net(micro).square().mean().backward()
        >>> int(net[1].num_batches_tracked)
        1
    """
    return Accumulation(model, steps)


# ---------------------------------------------------------------------------------------------
# checkpoint recomputation


class _RecomputeGuard:
    """Hooks on torch.nn BN layers: a forward run inside autograd's backward (a recomputed
    checkpointed segment) normalizes as before and commits nothing."""

    _BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, layers: list[nn.Module]) -> None:
        self.handles = []
        self.held: dict[int, dict[str, Tensor]] = {}  # id(layer) -> its real buffers
        for layer in layers:
            self.handles.append(layer.register_forward_pre_hook(self._before))
            self.handles.append(layer.register_forward_hook(self._after, always_call=True))

    def _before(self, layer, args) -> None:
        if layer.training and layer.track_running_stats and recomputing():
            # The same kernel call as the real forward (a non-reentrant checkpoint checks
            # that it saves the same tensors), on copies of the buffers it would move.
            buffers = layer._buffers
            real = {k: buffers[k] for k in self._BUFFERS if buffers.get(k) is not None}
            self.held[id(layer)] = real
            for k, t in real.items():
                buffers[k] = t.clone()

    def _after(self, layer, args, output) -> None:
        real = self.held.pop(id(layer), None)
        if real is not None:
            layer._buffers.update(real)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self) -> _RecomputeGuard:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def checkpoint_safe(model: nn.Module) -> _RecomputeGuard:
    """Make ``model``'s torch.nn BN layers commit once per real forward under checkpointing.

    ``torch.utils.checkpoint`` (reentrant or not, and wrappers built on it: HF's
    ``gradient_checkpointing_enable``, ``checkpoint_wrapper``) runs a segment's forward again
    inside backward; torch.nn's BN layers commit that recomputation too, so the running
    statistics and the counter take two steps per real forward (pytorch#96136). This
    library's layers detect the recomputation themselves (the forward runs inside autograd's
    backward) and skip its commit; this installs forward hooks that do the same for
    torch.nn's ``_BatchNorm`` layers (BatchNorm1d/2d/3d, SyncBatchNorm): during a
    recomputation the layer's running statistics and counter are copies, and the real
    buffers are put back after it. Nothing global is patched; the hooks are removed by
    ``.remove()`` or on leaving a ``with`` block.

    Running statistics, counters, outputs and gradients then equal those of the run without
    checkpointing. Exception: Batch Renorm reads the running statistics in training, and a
    recomputation sees those its real forward committed; wrap the step in `accumulate`,
    whose deferred commit keeps them unchanged until after backward.

    Example:
        >>> from torch.utils.checkpoint import checkpoint
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> with checkpoint_safe(net):
        ...     checkpoint(net, torch.randn(16, 4), use_reentrant=False).sum().backward()
        >>> int(net[1].num_batches_tracked)
        1
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"checkpoint_safe expects an nn.Module, got {type(model).__name__}")
    layers = [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and not isinstance(m, _BatchNormBase)
    ]
    return _RecomputeGuard(layers)


# ---------------------------------------------------------------------------------------------
# EMA models and target networks


def _bn_statistics(model: nn.Module) -> set[str]:
    """Names of the running_mean/running_var buffers of the BN layers of ``model``."""
    names = set()
    for prefix, m in model.named_modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            for buffer in ("running_mean", "running_var"):
                if getattr(m, buffer, None) is not None:
                    names.add(f"{prefix}.{buffer}" if prefix else buffer)
    return names


def _paired(kind: str, ema: dict, model: dict) -> list[tuple[str, Tensor, Tensor]]:
    if list(ema) != list(model):
        missing = [n for n in model if n not in ema][:3]
        extra = [n for n in ema if n not in model][:3]
        raise ValueError(
            f"ema_update: the two models' {kind} differ (the EMA model must be a copy of the "
            f"model, e.g. copy.deepcopy(model)): missing in the EMA model {missing}, not in "
            f"the model {extra}" + ("" if missing or extra else ", or their order")
        )
    pairs = []
    for name, t in model.items():
        if ema[name].shape != t.shape:
            raise ValueError(
                f"ema_update: {kind[:-1]} {name!r} has shape {tuple(ema[name].shape)} in the EMA "
                f"model and {tuple(t.shape)} in the model"
            )
        pairs.append((name, ema[name], t))
    return pairs


@torch.no_grad()
def ema_update(
    ema_model: nn.Module,
    model: nn.Module,
    decay: float,
    buffers: str = "copy",
    *,
    batches: Iterable | None = None,
    num_batches: int | None = None,
) -> None:
    """Update an EMA copy (mean teacher, BYOL/MoCo target, DQN target network) of ``model``,
    BN buffers included (ignite#2590: averaging the parameters alone leaves the copy's
    running statistics at their initial values, and its eval mode normalizes wrongly).

    Parameters: p_ema <- decay * p_ema + (1 - decay) * p (``decay=0`` copies: a target
    network's hard update). Buffers, by ``buffers``:

    - "copy": every buffer is copied from ``model`` (running statistics and counters).
    - "ema": BN running_mean and running_var are averaged like the parameters (the running
      statistics of a network whose weights are themselves an average); every other buffer,
      counters included, is copied.
    - "recalibrate": the buffers are copied, then `batchnorm.recalibrate` recomputes the EMA
      model's population statistics on ``batches`` (Algorithm 2 with the averaged weights,
      Sec. 3.1; SWA's ``update_bn``). Costs a pass over the batches: call it before
      evaluating the EMA model, not every step.

    Works for torch.nn's BN layers and ours (any ``_BatchNorm``). The two models must have
    the same parameter and buffer names and shapes (the EMA model a ``copy.deepcopy``);
    mismatches are refused before anything is written. Pass the module under a
    DistributedDataParallel wrapper (``ddp.module``). Non-floating-point parameters are copied.

    Args:
        ema_model: the average, updated in place.
        model: the trained model, read only.
        decay: in [0, 1]; the weight of the old average.
        buffers: "copy", "ema" or "recalibrate".
        batches, num_batches: for "recalibrate", as for `batchnorm.recalibrate`.

    Example:
        >>> import copy
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> ema = copy.deepcopy(net)
        >>> _ = net(torch.randn(16, 4))
        >>> ema_update(ema, net, decay=0.999)
        >>> torch.equal(ema[1].running_mean, net[1].running_mean)
        True
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
        raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
    if buffers not in EMA_BUFFERS:
        raise ValueError(f"buffers must be one of {list(EMA_BUFFERS)}, got {buffers!r}")
    if buffers == "recalibrate" and batches is None:
        raise ValueError('buffers="recalibrate" needs batches (an iterable of inputs)')
    if buffers != "recalibrate" and (batches is not None or num_batches is not None):
        raise ValueError(f'batches and num_batches are for buffers="recalibrate", not {buffers!r}')
    params = _paired(
        "parameters", dict(ema_model.named_parameters()), dict(model.named_parameters())
    )
    bufs = _paired("buffers", dict(ema_model.named_buffers()), dict(model.named_buffers()))
    weight = 1.0 - float(decay)
    for _, p_ema, p in params:
        if p_ema.is_floating_point():
            p_ema.lerp_(p.to(p_ema), weight)
        else:
            p_ema.copy_(p)
    averaged = _bn_statistics(model) if buffers == "ema" else set()
    for name, b_ema, b in bufs:
        if name in averaged:
            b_ema.lerp_(b.to(b_ema), weight)
        else:
            b_ema.copy_(b)
    if buffers == "recalibrate":
        recalibrate(ema_model, batches, num_batches=num_batches, progress=False)
