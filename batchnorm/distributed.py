"""Sec. 3 across processes: BN statistics synchronized over a torch.distributed process group.

The paper normalizes each worker's mini-batch on its own (Sec. 4.2: 32 examples per replica).
`SyncBatchNorm` instead takes mu_B and sigma2_B over the union of the ranks' mini-batches, so
that W ranks with n examples each normalize exactly like one process with W*n examples. It
runs on CPU/gloo (where ``torch.nn.SyncBatchNorm`` refuses) and on CUDA/NCCL.

The exact merge of the per-rank statistics, the collectives and the autograd Functions live in
`batchnorm.collectives`; `sync_buffers` (the running statistics of plain BN made equal over the
ranks) in `batchnorm.parallel`. Both are importable from here as before.
"""

from __future__ import annotations

import datetime

import torch.distributed as dist
from torch import Tensor, nn

from batchnorm import functional as F
from batchnorm.collectives import (
    SyncBatchNormFunction,
    as_timedelta,
    differentiable_sync,
    global_batch_stats,
    group_size,
)
from batchnorm.modules import BatchNorm, _BatchNormBase
from batchnorm.parallel import sync_buffers
from batchnorm.swap import (
    foreign_reason,
    layer_settings,
    rebuild,
    restore,
    swap_modules,
    warn_left_alone,
)

__all__ = ["SyncBatchNorm", "global_batch_stats", "sync_buffers"]


class SyncBatchNorm(_BatchNormBase):
    """BN whose training statistics are taken over every rank of a process group (Sec. 3).

    Drop-in for ``torch.nn.SyncBatchNorm`` (same arguments, parameters, buffers and
    `convert_sync_batchnorm`), for any input rank >= 2 with channels on axis 1, on CPU/gloo
    as well as CUDA/NCCL. Conventions are those of `batchnorm.functional`; the exact merge of
    per-rank statistics is in `batchnorm.collectives`' docstring.

    In training, with an initialized process group of world size > 1:

    - statistics are merged over all ranks, count-weighted: uneven and empty (N = 0) local
      batches are fine, but every rank must call forward and backward of every SyncBatchNorm
      layer (a rank that skips one leaves the others waiting until the timeout);
    - fewer than 2 values per channel over ALL ranks raises ValueError on every rank (none
      at all: an empty output, nothing committed);
    - ``forward(input, mask=...)`` keeps padding out of the statistics of every rank;
    - running statistics move towards the global mean and the unbiased global variance,
      identically on every rank; a non-finite value on any rank makes the global statistics
      non-finite, so every rank skips the update (``num_batches_skipped``);
    - input gradients are exact (those of single-process BN on the concatenated batch for
      the loss sum_r loss_r); gamma/beta gradients are local sums, see
      `SyncBatchNormFunction`;
    - one collective per forward (an all_gather of 2C + 1 values) and one per backward (2C
      values: an all_gather on gloo, faster there at this size, an all_reduce elsewhere),
      and no read-back to the host (unless a rank holds at most one value per channel, or
      a mask is given);
    - twice differentiable, and forward-mode AD works (`differentiable_sync`); every rank
      must take the same path (a double backward on one rank only waits for the others).

    It is a transform step (`_transform`) under the base layer's one forward, which checks
    the input and commits the running statistics. In eval mode, without an initialized
    process group or with world size 1 it is exactly our `BatchNorm` (channel axis 1): no
    communication.

    A dead rank: the collective fails with a RuntimeError naming the layer's operation
    instead of hanging, at once if the peer's connection closed, else after ``timeout``
    seconds, or after the process group's timeout
    (``torch.distributed.init_process_group(..., timeout=datetime.timedelta(seconds=60))``)
    when ``timeout`` is None. NCCL's own watchdog may abort the process first.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as for
            `batchnorm.BatchNorm2d`.
        process_group: the group to synchronize over (None: the default group).
        timeout: seconds (or a timedelta) each collective may wait for the other ranks;
            None defers to the process group's timeout. With NCCL a layer timeout makes the
            host wait for each collective to finish (no overlap with the GPU): prefer the
            group's timeout there.
        backward: the single-process backward used outside synchronized training.

    Shape: input (N, C, *), N may be 0 on some ranks; output the same.

    Example:
        >>> bn = SyncBatchNorm(8)  # without a process group it is plain BN
        >>> bn(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
        >>> # under torchrun: model = SyncBatchNorm.convert_sync_batchnorm(model)
    """

    # What `convert_sync_batchnorm` makes of a layer that applies an activation (its settings
    # carry one: our fused layers, timm's BatchNormAct2d), and what `revert_sync_batchnorm`
    # makes of a layer of this class built directly. The fused layers (batchnorm.fused) build
    # on this module, so this module never imports them: fused.py enters its SyncBatchNormAct
    # here when it defines it, and SyncBatchNormAct names BatchNormAct as its own _unsynced.
    _activated: type | None = None
    _unsynced: type = BatchNorm

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        timeout: float | datetime.timedelta | None = None,
        backward: str = "native",
        backend: str = "auto",
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            backward=backward, backend=backend,
        )  # fmt: skip
        self.process_group = process_group
        self.timeout = timeout

    def _transform(self, input: Tensor, mask: Tensor | None):
        # The transform step over every rank; the base layer's forward validates and commits.
        if not self.training or group_size(self.process_group) == 1:
            return super()._transform(input, mask)
        timeout = as_timedelta(self.timeout)
        if F.has_tangent(input, self.weight, self.bias):
            return self._transform_forward_ad(input, mask, timeout)
        stats = global_batch_stats(input, self.process_group, timeout, mask)
        # N >= n: only a rank with at most one local value needs to read N back (a device
        # sync). If N <= 1 every rank has n <= 1, so every rank reads it and acts together.
        # With a mask n is the mask's count, read back (on an accelerator, a sync).
        local = F.values_per_channel(input, 1) if mask is None else int(mask.sum())
        if local <= 1 and int(stats.count) <= 1:
            if int(stats.count) == 0:  # every rank's batch is empty or fully masked:
                return super()._transform(input, mask)  # the single-process answer, (y, None)
            F.check_training_batch(input, 1, int(stats.count), self._over_ranks())
        output = SyncBatchNormFunction.apply(
            input, self.weight, self.bias, stats.mean, stats.var, stats.count, self.eps,
            self.process_group, timeout, mask,
        )  # fmt: skip
        return output, stats

    def _transform_forward_ad(self, input, mask, timeout):
        # Forward-mode AD (dual tensors): the differentiable transform, whose collectives
        # carry the tangents. Every rank must run forward AD through the layer together.
        output, stats = differentiable_sync(
            input, self.weight, self.bias, self.eps, self.process_group, timeout, mask
        )
        if int(stats.count) <= 1:
            if int(stats.count) == 0:
                return F.empty_output(input, self.weight, self.bias, 1), None
            F.check_training_batch(input, 1, int(stats.count), self._over_ranks())
        return output, stats

    def _over_ranks(self) -> str:
        return f" over all {dist.get_world_size(self.process_group)} ranks"

    def _settings(self) -> dict:
        # Only what this constructor takes: no bias=False, no Ghost BN.
        settings = super()._settings()
        del settings["bias"], settings["virtual_batch_size"]
        return {**settings, "process_group": self.process_group, "timeout": self.timeout}

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.timeout is not None:
            text += f", timeout={self.timeout}"
        return text

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None, timeout=None):
        """Replace every BatchNorm layer in ``module`` by a SyncBatchNorm sharing its state.

        Converts this library's BatchNorm1d/2d/3d (and `BatchNorm` with axis 1) as well as
        ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm``, through the one swap
        utility (`batchnorm.swap.rebuild`): the parameters are the same Parameter
        objects (an optimizer built before conversion still updates them); the buffers,
        train/eval mode, eps, momentum, backward and ``requires_grad`` carry over; a layer
        registered at several places becomes one shared SyncBatchNorm. The original class
        and settings are remembered for `revert_sync_batchnorm`. Layers SyncBatchNorm cannot
        express (Ghost BN, Batch Renormalization, a channel axis other than 1, no beta) are
        refused with the setting named, and nothing is converted. A BN fused with its
        activation (`batchnorm.fused`, and timm's ``BatchNormAct2d`` whose act is an
        activation of `batchnorm.activations`) becomes `batchnorm.fused.SyncBatchNormAct`
        with that activation; `revert_sync_batchnorm` gives timm's layer its own act and drop
        modules back. A BN subclass the library cannot read (its own forward or child
        modules) is left alone, and one warning names each.

        Args:
            module: a model or a single BN layer.
            process_group: the group to synchronize over (None: the default group).
            timeout: passed to every new layer.

        Returns:
            ``module`` with its BN layers replaced, or the new layer if ``module`` was one.

        Example:
            >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
            >>> net = SyncBatchNorm.convert_sync_batchnorm(net)
            >>> type(net[1]).__name__
            'SyncBatchNorm'
        """
        left: dict[int, str] = {}

        def fn(m):
            if not isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, cls):
                return None
            why = foreign_reason(m)
            if why is not None:
                left[id(m)] = why
                return None
            target = cls._activated if "activation" in layer_settings(m) else cls
            return rebuild(
                m, target, remember=True, process_group=process_group, timeout=timeout
            )

        module = swap_modules(module, fn)
        warn_left_alone(module, left, "convert_sync_batchnorm")
        return module

    @classmethod
    def revert_sync_batchnorm(cls, module: nn.Module) -> nn.Module:
        """Undo `convert_sync_batchnorm`: each SyncBatchNorm becomes its original class.

        The original class comes back with its settings (eps and momentum as they are now);
        a SyncBatchNorm that was built directly (not converted) becomes our `BatchNorm`
        (any rank, channel axis 1; a `SyncBatchNormAct` our `BatchNormAct`). Parameters are
        shared, buffers, mode and a BN + activation layer's own child modules carry over.

        Example:
            >>> net = SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(4)))
            >>> type(SyncBatchNorm.revert_sync_batchnorm(net)[0])
            <class 'torch.nn.modules.batchnorm.BatchNorm1d'>
        """
        def fn(m):
            if not isinstance(m, cls):
                return None
            restored = restore(m)
            if restored is not None:
                return restored
            return rebuild(m, m._unsynced, drop={"process_group", "timeout"})

        return swap_modules(module, fn)
