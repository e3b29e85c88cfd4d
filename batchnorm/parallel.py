"""Sec. 3 across processes, Algorithm 2's running statistics: `sync_buffers` makes every BN
layer's running statistics the same on every rank of a process group (average or broadcast).

A pass over a model for plain BN under DistributedDataParallel, built on the collectives of
`batchnorm.collectives`; the synchronized layer itself is `batchnorm.distributed.SyncBatchNorm`.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch import Tensor, nn

from batchnorm.collectives import as_timedelta, group_size, run_collective

__all__ = ["sync_buffers"]

SYNC_BUFFER_MODES = ("average", "broadcast")


def sync_buffers(
    model: nn.Module,
    mode: str = "average",
    process_group=None,
    *,
    src: int = 0,
    timeout: float | datetime.timedelta | None = None,
) -> int:
    """Make the running statistics of every BN layer in ``model`` the same on every rank.

    For plain (unsynchronized) BN under DistributedDataParallel, where each rank's
    running statistics follow its own batches: call it before evaluating or saving, instead
    of ``broadcast_buffers=True``, which copies rank 0's buffers over the others' at every
    forward (and so throws away what the other ranks measured).

    - ``"average"``: running_mean and running_var become their mean over the ranks. Both
      are averages of per-batch statistics (Algorithm 2, step 2: E_B[mu_B] and
      E_B[m/(m-1) sigma2_B]; with a constant momentum, weighted averages), so the mean over
      ranks is exactly what one process would hold had it seen every rank's batches, each
      normalized with its own statistics as DDP normalizes them: with ``momentum=None``
      the running statistics of one process fed all W*k batches; with momentum, the moving
      average of the per-step mean over ranks. The variance is deliberately not pooled
      with the spread of the rank means: Algorithm 2 leaves the spread of batch means
      out, whichever process a batch was on. ``num_batches_tracked`` is left as it is
      (the same on every rank under DDP).
    - ``"broadcast"``: every rank takes rank ``src``'s running statistics and counters
      (what ``broadcast_buffers=True`` does, once, when you choose).

    Covers every ``torch.nn.modules.batchnorm._BatchNorm`` with running statistics (ours,
    torch.nn's, SyncBatchNorm, whose buffers are already equal). One collective per dtype
    and device of the buffers. Without an initialized process group, or with world size
    1, nothing happens. Every rank of the group must call it.

    Args:
        model: any module containing BN layers.
        mode: "average" or "broadcast".
        process_group: the group (None: the default group).
        src: the group rank whose buffers "broadcast" copies.
        timeout: seconds (or a timedelta) to wait for the other ranks; None uses the group's.

    Returns:
        The number of BN layers synchronized (0 where there is nothing to do).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> sync_buffers(net, "average")  # no process group: nothing to do
        0
    """
    if mode not in SYNC_BUFFER_MODES:
        raise ValueError(f"mode must be one of {list(SYNC_BUFFER_MODES)}, got {mode!r}")
    layers = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.running_mean is not None
        and m.running_var is not None
    ]
    world = group_size(process_group)
    if world == 1 or not layers:
        return 0
    buffers = [t for m in layers for t in (m.running_mean, m.running_var)]
    if mode == "broadcast":
        buffers += [m.num_batches_tracked for m in layers if m.num_batches_tracked is not None]
        root = dist.get_global_rank(process_group, src) if process_group is not None else src
    groups: dict[tuple, list[Tensor]] = {}
    for t in buffers:
        groups.setdefault((t.dtype, t.device), []).append(t)
    limit = as_timedelta(timeout)
    with torch.no_grad():
        for tensors in groups.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            if mode == "broadcast":
                run_collective(
                    f"broadcast of BN buffers from rank {src}",
                    lambda async_op, flat=flat: dist.broadcast(
                        flat, root, group=process_group, async_op=async_op
                    ),
                    process_group,
                    limit,
                )
            else:
                run_collective(
                    "all_reduce of BN buffers",
                    lambda async_op, flat=flat: dist.all_reduce(
                        flat, group=process_group, async_op=async_op
                    ),
                    process_group,
                    limit,
                )
                flat /= world
            pieces = flat.split([t.numel() for t in tensors])
            torch._foreach_copy_(tensors, [p.view_as(t) for p, t in zip(pieces, tensors)])
    return len(layers)
