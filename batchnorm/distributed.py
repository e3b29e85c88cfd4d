"""Sec. 3 across processes: BN statistics synchronized over a torch.distributed process group.

The paper normalizes each worker's mini-batch on its own (Sec. 4.2: 32 examples per replica).
`SyncBatchNorm` instead takes mu_B and sigma2_B over the union of the ranks' mini-batches, so
that W ranks with n examples each normalize exactly like one process with W*n examples. It
runs on CPU/gloo (where ``torch.nn.SyncBatchNorm`` refuses) and on CUDA/NCCL.

The merge (Chan, Golub & LeVeque 1979), per channel, from each rank's count n_r, mean mu_r
and sum of squared deviations M2_r = n_r * sigma2_r:

    N     = sum_r n_r
    mu    = sum_r n_r * mu_r / N
    M2    = sum_r M2_r + sum_r n_r * (mu_r - mu)^2
    sigma2_B = M2 / N                     (biased, for normalizing)
    running_var target = M2 / (N - 1)     (unbiased, with the GLOBAL count)

It is exact (no E[x^2] - E[x]^2 cancellation) and count-weighted, so uneven batches and empty
ones (n_r = 0: the rank still joins every collective and adds nothing) merge correctly.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from batchnorm import functional as F
from batchnorm.modules import BatchNorm, _BatchNormBase
from batchnorm.swap import (
    foreign_reason,
    layer_settings,
    rebuild,
    restore,
    swap_modules,
    warn_left_alone,
)

__all__ = ["SyncBatchNorm", "global_batch_stats"]


def _group_size(group) -> int:
    """World size of ``group``, or 1 when torch.distributed is unavailable or not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _as_timedelta(timeout) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    return datetime.timedelta(seconds=float(timeout))


def _collective(op: str, fn, group, timeout: datetime.timedelta | None) -> None:
    """Run one collective; turn a dead or missing peer into a RuntimeError that says so.

    With ``timeout`` the call is issued asynchronously and waited on for at most that long;
    without it the process group's own timeout applies (``init_process_group(timeout=...)``;
    gloo honours it per operation, NCCL through its watchdog). A peer that has exited
    usually fails the collective at once (the connection closes); one that is alive but
    never joins fails it at the timeout.
    """
    try:
        if timeout is None:
            fn(async_op=False)
        else:
            fn(async_op=True).wait(timeout=timeout)
    except RuntimeError as err:  # DistBackendError and gloo/NCCL failures subclass it
        limit = f"{timeout.total_seconds():g} s" if timeout is not None else "its timeout"
        raise RuntimeError(
            f"SyncBatchNorm: the {op} over the process group (world size "
            f"{dist.get_world_size(group)}, this rank {dist.get_rank(group)}) failed or did not "
            f"complete within {limit}. Another rank has probably died, or skipped this layer "
            f"(every rank must run every SyncBatchNorm forward and backward, even with an empty "
            f"batch). Backend error: {err}"
        ) from err


def _local_moments(input: Tensor, mask: Tensor | None) -> tuple[int, Tensor, Tensor]:
    """This rank's n, mu and M2 = n * sigma2_B per channel (axis 1), from `F.batch_stats`.

    With a mask, n counts (and the moments cover) the selected positions only."""
    input = input.detach()  # the statistics enter _SyncBatchNormFunction as constants
    n = F._values_per_channel(input, 1) if mask is None else int(mask.sum().item())
    if n == 0:  # the mean of nothing is NaN; an empty rank contributes count 0 instead
        zeros = torch.zeros(input.shape[1], dtype=F._stats_dtype(input), device=input.device)
        return 0, zeros, zeros.clone()
    mean, var, _ = F.batch_stats(input, 1, mask)
    return n, mean, var * n


def global_batch_stats(
    input: Tensor,
    group=None,
    timeout: float | datetime.timedelta | None = None,
    mask: Tensor | None = None,
) -> F.BatchStats:
    """mu_B and the biased sigma2_B over the union of every rank's batch, channel axis 1.

    Each rank computes its local statistics in two passes (float32 for half input), then one
    all_gather exchanges (n_r, mu_r, M2_r) per channel and every rank merges them identically
    with the formula of this module's docstring, in float64 so the merge adds no rounding of
    its own. A rank whose batch is empty contributes n_r = 0 and must still call this.

    Args:
        input: (N, C, *) local batch; N may be 0.
        group: the process group (None: the default group).
        timeout: seconds (or a timedelta) to wait for the other ranks; None uses the group's.
        mask: optional bool tensor of the input's shape without axis 1: only True positions
            enter the statistics (see `batchnorm.functional.batch_stats`).

    Returns:
        BatchStats(mean (C,), var (C,), count N) with mean and var in float32 (float64 for
        float64 input), as `batchnorm.functional.batch_stats` returns them. ``count``, the
        global number of values per channel, is a 0-d float64 tensor on the input's device
        (exact integers up to 2^53), the same on every rank: turning it into a Python int
        would make an accelerator wait for the collective.
    """
    n, mean, m2 = _local_moments(input, mask)
    stats_dtype = mean.dtype
    # One message per rank: [n, mu_1..mu_C, M2_1..M2_C]. float64 counts stay exact past 2^24
    # values per channel (a large 3D batch), where float32 would round them.
    count = torch.full((1,), float(n), dtype=torch.float64, device=input.device)
    packed = torch.cat([count, mean.double(), m2.double()])
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    _collective(
        "all_gather of batch statistics",
        lambda async_op: dist.all_gather(gathered, packed, group=group, async_op=async_op),
        group,
        _as_timedelta(timeout),
    )
    table = torch.stack(gathered)  # (W, 1 + 2C)
    c = mean.numel()
    counts, means, m2s = table[:, :1], table[:, 1 : 1 + c], table[:, 1 + c :]  # (W,1),(W,C),(W,C)
    # total: () float64, on the input's device, never read back here. With N = 0 the
    # merge gives NaN; the caller checks N before using it.
    total, global_mean, global_m2 = F.merge_stats(counts, means, m2s)
    return F.BatchStats(global_mean.to(stats_dtype), (global_m2 / total).to(stats_dtype), total)


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = gamma * xhat + beta with given global statistics; backward all-reduces its two sums.

    Forward uses `batchnorm.functional.normalize`. Backward is the library's one gradient
    helper, `batchnorm.functional.batch_norm_backward`, with m = N, the global count, and the
    two per-channel sums taken over ALL ranks:

        dl/dx = gamma / (N s) * (N dl/dy - sum_all dl/dy - xhat * sum_all(dl/dy * xhat))

    so input gradients equal single-process BN on the concatenated batch for the loss
    sum_r loss_r. The returned dl/dgamma = sum dl/dy * xhat and dl/dbeta = sum dl/dy are this
    rank's LOCAL sums, as in ``torch.nn.SyncBatchNorm``: summed over ranks they are the
    single-process gradients of sum_r loss_r, and DistributedDataParallel's averaging of
    them (1/W sum_r) is consistent with the averaging it applies to every other parameter.
    With a mask, padding is normalized with the same statistics and adds nothing to the sums
    (as in the single-process masked transform). Differentiable once: a double backward
    raises instead of silently dropping the statistics' dependence on x.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, mean, var, count, eps, group, timeout, mask):  # noqa: D102
        invstd = torch.rsqrt(var + eps)
        output = F.normalize(input, mean, var, weight, bias, eps, 1)
        ctx.save_for_backward(input, weight, mean, invstd, mask)
        ctx.count, ctx.group, ctx.timeout = count, group, timeout
        ctx.has_bias = bias is not None
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # noqa: D102
        input, weight, mean, invstd, mask = ctx.saved_tensors
        dims = F._reduce_dims(input, 1)
        dtype = invstd.dtype
        invstd_c = F._per_channel(invstd, input, 1)
        xhat = input.to(dtype) * invstd_c
        xhat.add_(F._per_channel(-mean * invstd, input, 1))  # as `normalize` computes it

        def all_reduce(sums):
            # The same on every rank (same model, same requires_grad), so every rank joins.
            _collective(
                "all_reduce of gradient sums",
                lambda async_op: dist.all_reduce(sums, group=ctx.group, async_op=async_op),
                ctx.group,
                ctx.timeout,
            )

        grad_input, grad_gamma, grad_beta = F.batch_norm_backward(
            grad_output.to(dtype),
            xhat,
            invstd_c,
            None if weight is None else F._per_channel(weight.to(dtype), input, 1),
            dims,
            count=ctx.count,
            mask=None if mask is None else mask.unsqueeze(1),
            all_reduce=all_reduce,
            input_grad=ctx.needs_input_grad[0],
        )
        grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = grad_gamma.reshape(-1).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dtype = grad_output.dtype if weight is None else weight.dtype
            grad_bias = grad_beta.reshape(-1).to(dtype)
        if grad_input is not None:
            grad_input = grad_input.to(input.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


class SyncBatchNorm(_BatchNormBase):
    """BN whose training statistics are taken over every rank of a process group (Sec. 3).

    Drop-in for ``torch.nn.SyncBatchNorm`` (same arguments, parameters, buffers and
    `convert_sync_batchnorm`), for any input rank >= 2 with channels on axis 1, on CPU/gloo
    as well as CUDA/NCCL. Conventions are those of `batchnorm.functional`; the exact merge of
    per-rank statistics is in this module's docstring.

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
      `_SyncBatchNormFunction`.

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
        if not self.training or _group_size(self.process_group) == 1:
            return super()._transform(input, mask)
        stats = global_batch_stats(input, self.process_group, self.timeout, mask)
        # N >= n: only a rank with at most one local value needs to read N back (a device
        # sync). If N <= 1 every rank has n <= 1, so every rank reads it and acts together.
        local = F._values_per_channel(input, 1) if mask is None else int(mask.sum().item())
        if local <= 1 and int(stats.count) <= 1:
            if int(stats.count) == 0:  # every rank's batch is empty or fully masked:
                return super()._transform(input, mask)  # the single-process answer, (y, None)
            raise ValueError(
                "Expected more than 1 value per channel when training, got "
                f"{int(stats.count)} over all {dist.get_world_size(self.process_group)} ranks "
                f"(this rank's input size {tuple(input.shape)}): the batch variance of a single "
                "value is undefined."
            )
        output = _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, stats.mean, stats.var, stats.count, self.eps,
            self.process_group, _as_timedelta(self.timeout), mask,
        )  # fmt: skip
        return output, stats

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
        from batchnorm.fused import SyncBatchNormAct  # fused.py builds on this module

        left: dict[int, str] = {}

        def fn(m):
            if not isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, cls):
                return None
            why = foreign_reason(m)
            if why is not None:
                left[id(m)] = why
                return None
            target = SyncBatchNormAct if "activation" in layer_settings(m) else cls
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
            from batchnorm.fused import BatchNormAct  # fused.py builds on this module

            target = BatchNormAct if "activation" in layer_settings(m) else BatchNorm
            return rebuild(m, target, drop={"process_group", "timeout"})

        return swap_modules(module, fn)
