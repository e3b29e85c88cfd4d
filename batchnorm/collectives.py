"""Sec. 3 across processes: the collectives and autograd Functions behind `SyncBatchNorm`.

`global_batch_stats` takes mu_B and sigma2_B over the union of the ranks' mini-batches; the
autograd Functions carry SyncBatchNorm's training transform and its backward (whose two
per-channel sums are added over the ranks); `run_collective` runs every collective of the
package and turns a dead peer into an error that says so. Only torch and
`batchnorm.functional` are imported: the layer (`batchnorm.distributed`) and the pass over a
model's buffers (`batchnorm.parallel`) build on this module, through its public names:
`global_batch_stats`, `SyncBatchNormFunction` and `differentiable_sync` (the training
transform, fast and differentiable to any order), `run_collective`, `group_size` and
`as_timedelta` (a layer's ``timeout`` in seconds or as a timedelta).

The merge (Chan, Golub & LeVeque 1979), per channel, from each rank's count n_r, mean mu_r
and sum of squared deviations M2_r = n_r * sigma2_r:

    N     = sum_r n_r
    mu    = sum_r n_r * mu_r / N
    M2    = sum_r M2_r + sum_r n_r * (mu_r - mu)^2 = sum_r (M2_r + n_r mu_r^2) - N mu^2
    sigma2_B = M2 / N                     (biased, for normalizing)
    running_var target = M2 / (N - 1)     (unbiased, with the GLOBAL count)

It is exact (two passes on each rank, and no E[x^2] - E[x]^2 cancellation across ranks: one
all_gather of every rank's (n_r, mu_r, M2_r) in float64) and count-weighted, so uneven
batches and empty ones (n_r = 0: the rank still joins every collective and adds nothing)
merge correctly.
"""

from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist
from torch import Tensor

from batchnorm import functional as F

__all__ = [
    "SyncBatchNormFunction",
    "as_timedelta",
    "differentiable_sync",
    "global_batch_stats",
    "group_size",
    "run_collective",
]


def group_size(group) -> int:
    """World size of ``group``, or 1 when torch.distributed is unavailable or not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def as_timedelta(timeout) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    return datetime.timedelta(seconds=float(timeout))


# How long a rank polls a gloo collective before it blocks (see `run_collective`).
_SPIN_SECONDS = 0.005


def run_collective(op: str, fn, group, timeout: datetime.timedelta | None) -> None:
    """Run one collective; turn a dead or missing peer into a RuntimeError that says so.

    With ``timeout`` the call is waited on for at most that long; without it the process
    group's own timeout applies (``init_process_group(timeout=...)``; gloo honours it per
    operation, NCCL through its watchdog). A peer that has exited usually fails the
    collective at once (the connection closes); one that is alive but never joins fails it
    at the timeout.

    On gloo the calling thread first polls the operation for up to `_SPIN_SECONDS`, yielding
    the core between polls, and only then blocks: a BN layer's collective is a few hundred
    values that complete in well under a millisecond once every rank has joined, and a
    blocked thread is woken late (measured with `benchmarks/bench_sync.py`). A rank that
    waits longer for a slow peer stops polling and sleeps. With NCCL ``wait`` only orders
    the streams, so there is nothing to poll.
    """
    try:
        work = fn(async_op=True)
        if dist.get_backend(group) == "gloo":
            _poll(work, _SPIN_SECONDS)
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout=timeout)
    except RuntimeError as err:  # DistBackendError and gloo/NCCL failures subclass it
        limit = f"{timeout.total_seconds():g} s" if timeout is not None else "its timeout"
        raise RuntimeError(
            f"SyncBatchNorm: the {op} over the process group (world size "
            f"{dist.get_world_size(group)}, this rank {dist.get_rank(group)}) failed or did not "
            f"complete within {limit}. Another rank has probably died, or skipped this layer "
            f"(every rank must run every SyncBatchNorm forward and backward, even with an empty "
            f"batch). Backend error: {err}"
        ) from err


def _poll(work, seconds: float) -> None:
    """Return when ``work`` has completed (or failed), or after about ``seconds``."""
    yield_ = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))
    deadline = time.perf_counter() + seconds
    while not work.is_completed() and time.perf_counter() < deadline:
        yield_()


def _local_moments(input: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's n, mu and M2 = n * sigma2_B per channel (axis 1), from `F.batch_stats`.

    n is a (1,) float64 tensor (with a mask: the number of selected positions, counted on the
    device, never read back). An empty rank gives n = 0 and zero moments."""
    input = input.detach()  # the statistics enter SyncBatchNormFunction as constants
    if mask is None:
        n = F.values_per_channel(input, 1)
        count = torch.full((1,), float(n), dtype=torch.float64, device=input.device)
        if n == 0:  # the mean of nothing is NaN; an empty rank contributes count 0 instead
            zeros = torch.zeros(input.shape[1], dtype=F.stats_dtype(input), device=input.device)
            return count, zeros, zeros.clone()
        # F.batch_stats's two passes, with the square taken in place (no autograd here).
        x = input.to(F.stats_dtype(input))
        dims = F.reduce_dims(input, 1)
        mean = x.mean(dims, keepdim=True)
        deviation = x - mean
        return count, mean.reshape(-1), deviation.mul_(deviation).sum(dims)
    F.check_mask(mask, input, 1)
    keep = mask.unsqueeze(1)
    count = mask.sum().reshape(1).to(torch.float64)
    x = torch.where(keep, input.to(F.stats_dtype(input)), 0.0)
    dims = F.reduce_dims(input, 1)
    # n = 0 gives 0/0 = NaN: clamp the divisor (the sums are 0 then, so the mean is 0).
    mean = x.sum(dims, keepdim=True) / count.clamp_min(1).to(x.dtype)
    m2 = torch.square(torch.where(keep, x - mean, 0.0)).sum(dims)
    return count, mean.reshape(-1), m2


def _gather_rows(t: Tensor, group, timeout, what: str) -> Tensor:
    """Every rank's ``t`` (1-d), stacked in rank order: (W, len(t)), the same on every rank.

    One all_gather. For the few hundred values a BN layer exchanges, gloo's all_gather takes
    a third to a half of the time of its all_reduce (2 ranks on loopback: 0.5-0.7 ms against
    1.5-1.9 ms, median of 40 x 20 calls; 0.73 against 1.37 ms in a later session), and
    summing the W rows locally costs nothing."""
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    run_collective(
        what,
        lambda async_op: dist.all_gather(gathered, t, group=group, async_op=async_op),
        group,
        timeout,
    )
    return torch.stack(gathered)


def global_batch_stats(
    input: Tensor,
    group=None,
    timeout: float | datetime.timedelta | None = None,
    mask: Tensor | None = None,
) -> F.BatchStats:
    """mu_B and the biased sigma2_B over the union of every rank's batch, channel axis 1.

    Each rank computes its local statistics in two passes (float32 for half input), then ONE
    all_gather exchanges (n_r, mu_r, M2_r) per channel and every rank merges them identically
    with the formula of this module's docstring (`F.merge_stats`), in float64 so the merge
    adds no rounding of its own. Nothing is read back to the host. A rank whose batch is
    empty contributes n_r = 0 and must still call this.

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
    count, mean, m2 = _local_moments(input, mask)
    # One message per rank: [n, mu_1..mu_C, M2_1..M2_C]. float64 counts stay exact past 2^24
    # values per channel (a large 3D batch), where float32 would round them.
    packed = torch.cat([count, mean.double(), m2.double()])
    table = _gather_rows(packed, group, as_timedelta(timeout), "all_gather of batch statistics")
    c = mean.numel()
    counts, means, m2s = table[:, :1], table[:, 1 : 1 + c], table[:, 1 + c :]  # (W,1),(W,C),(W,C)
    # total: () float64, on the input's device, never read back here. With N = 0 the
    # merge gives NaN; the caller checks N before using it.
    total, global_mean, global_m2 = F.merge_stats(counts, means, m2s)
    return F.BatchStats(global_mean.to(mean.dtype), (global_m2 / total).to(mean.dtype), total)


class _AllReduce(torch.autograd.Function):
    """Sum a tensor over the ranks of a group, differentiably (backward and forward mode).

    Every rank gets out = sum_r t_r. For the loss sum_r loss_r(out), dl/dt_r = sum_s
    dl_s/dout: the backward is again this all_reduce (so it is differentiable in turn, for
    a double backward), and so is the forward-mode tangent. Every rank must call it, and
    its backward and tangent, together."""

    @staticmethod
    def forward(ctx, t, group, timeout, what):  # noqa: D102
        out = t.clone()
        run_collective(
            what,
            lambda async_op: dist.all_reduce(out, group=group, async_op=async_op),
            group,
            timeout,
        )
        ctx.args = group, timeout, what
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return _AllReduce.apply(grad, *ctx.args), None, None, None

    @staticmethod
    def jvp(ctx, tangent, *_):  # noqa: D102
        return _AllReduce.apply(tangent, *ctx.args)


def differentiable_sync(input, weight, bias, eps, group, timeout, mask):
    """SyncBatchNorm's training transform from differentiable operations alone.

    The statistics are taken in two all-reduced passes (n and sum x, then sum (x - mu)^2)
    through `_AllReduce`, so autograd sees their dependence on every rank's input, to any
    order, and forward-mode AD works. Slower than `SyncBatchNormFunction` (two collectives
    in forward, and autograd's generic backward); used for forward-mode AD, and by the
    Function's backward when a graph of it is requested (a double backward). With a mask,
    padding is normalized with the detached statistics, as in the single-process transform.

    Returns (output, BatchStats detached)."""
    dtype = F.stats_dtype(input)
    dims = F.reduce_dims(input, 1)
    x = input.to(dtype)
    keep = None if mask is None else mask.unsqueeze(1)
    if keep is None:
        n = torch.full((1,), float(F.values_per_channel(input, 1)), dtype=torch.float64,
                       device=input.device)  # fmt: skip
        xs = x
    else:
        n = mask.sum().reshape(1).to(torch.float64)
        xs = torch.where(keep, x, 0.0)
    sums = _AllReduce.apply(
        torch.cat([n, xs.sum(dims).double()]), group, timeout, "all_reduce of batch sums"
    )
    count = sums[0]
    mean = (sums[1:] / count).to(dtype)
    deviation = xs - F.per_channel(mean, x, 1)
    if keep is not None:
        deviation = torch.where(keep, deviation, 0.0)
    m2 = _AllReduce.apply(
        torch.square(deviation).sum(dims).double(), group, timeout, "all_reduce of batch M2"
    )
    var = (m2 / count).to(dtype)
    scale, shift = F.inference_affine(mean, var, weight, bias, eps)
    scale_c, shift_c = F.per_channel(scale, x, 1), F.per_channel(shift, x, 1)
    output = torch.addcmul(shift_c, xs, scale_c)
    if keep is not None:
        padding = torch.addcmul(shift_c.detach(), x, scale_c.detach())
        output = torch.where(keep, output, padding)
    stats = F.BatchStats(mean.detach(), var.detach(), count.detach())
    return output.to(input.dtype), stats


class SyncBatchNormFunction(torch.autograd.Function):
    """y = gamma * xhat + beta with given global statistics; backward all-reduces its two sums.

    Backward is the paper's compact form with m = N, the global count, and the two
    per-channel sums taken over ALL ranks:

        dl/dx = gamma / (N s) * (N dl/dy - sum_all dl/dy - xhat * sum_all(dl/dy * xhat))

    so input gradients equal single-process BN on the concatenated batch for the loss
    sum_r loss_r. The returned dl/dgamma = sum dl/dy * xhat and dl/dbeta = sum dl/dy are this
    rank's LOCAL sums, as in ``torch.nn.SyncBatchNorm``: summed over ranks they are the
    single-process gradients of sum_r loss_r, and DistributedDataParallel's averaging of
    them (1/W sum_r) is consistent with the averaging it applies to every other parameter.
    With a mask, padding is normalized with the same statistics and adds nothing to the sums
    (as in the single-process masked transform).

    The fast case (no mask; float32/float64 input in the parameters' dtype) runs torch's own
    kernels: forward is the eval-mode ``torch.batch_norm`` with the global statistics; the
    backward's ``native_batch_norm_backward`` in eval mode gives the two local sums alone
    (one read of dl/dy and x, nothing full-size written), one collective adds them, the
    correction ``- gamma/s * (sum_all dl/dy / N + xhat * sum_all(dl/dy * xhat) / N)``, an
    affine map of xhat per channel, is the eval-mode kernel again, applied to x, and
    gamma/s * dl/dy is added to it in place. Other cases use the
    library's one gradient helper, `batchnorm.functional.batch_norm_backward`, with the sums
    all-reduced.

    Twice differentiable: when a graph of the backward is requested (``create_graph=True``),
    the backward recomputes the forward with `differentiable_sync` and differentiates it,
    so the second derivative includes the statistics' dependence on every rank's input.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, mean, var, count, eps, group, timeout, mask):  # noqa: D102
        if _native_eval_ok(input, weight, mean):
            output = torch.batch_norm(
                input, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled
            )
        else:
            output = F.normalize(input, mean, var, weight, bias, eps, 1)
        ctx.save_for_backward(input, weight, bias, mean, var, mask)
        ctx.count, ctx.eps, ctx.group, ctx.timeout = count, eps, group, timeout
        return output

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        input, weight, bias, mean, var, mask = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the differentiable transform
            return _double_backward(ctx, grad_output, input, weight, bias, mask)
        sums_fn = _sums_all_reduce(ctx.group, ctx.timeout)
        needs = ctx.needs_input_grad
        # (torch's CPU kernel divides by zero on an empty input: SIGFPE, not an error)
        fast = mask is None and input.numel() > 0 and grad_output.dtype == input.dtype
        if fast and _same_dtype(input, weight, mean):
            grad_input, grad_weight, grad_bias = _fast_backward(
                grad_output, input, weight, mean, var, ctx.count, ctx.eps, sums_fn, needs[0]
            )
        else:
            grad_input, grad_weight, grad_bias = _generic_backward(
                grad_output, input, weight, mean, var, ctx.count, ctx.eps, sums_fn, mask,
                needs[0],
            )  # fmt: skip
        grad_weight = grad_weight.to(weight.dtype) if weight is not None and needs[1] else None
        if bias is not None and needs[2]:
            grad_bias = grad_bias.to(grad_output.dtype if weight is None else weight.dtype)
        else:
            grad_bias = None
        if grad_input is not None:
            grad_input = grad_input.to(input.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def _same_dtype(input: Tensor, weight: Tensor | None, mean: Tensor) -> bool:
    return input.dtype == mean.dtype and (weight is None or weight.dtype == mean.dtype)


def _native_eval_ok(input: Tensor, weight: Tensor | None, mean: Tensor) -> bool:
    # torch's eval-mode kernel takes half input with float32 statistics and parameters.
    half = input.dtype in (torch.float16, torch.bfloat16) and mean.dtype == torch.float32
    return (weight is None or weight.dtype == mean.dtype) and (half or input.dtype == mean.dtype)


def _sums_all_reduce(group, timeout):
    gather = dist.get_backend(group) == "gloo"  # see `_gather_rows`; NCCL: all_reduce

    def all_reduce(sums):
        # The same on every rank (same model, same requires_grad), so every rank joins.
        if gather:  # the rows summed in rank order: identical on every rank
            sums.copy_(_gather_rows(sums, group, timeout, "all_gather of gradient sums").sum(0))
            return
        run_collective(
            "all_reduce of gradient sums",
            lambda async_op: dist.all_reduce(sums, group=group, async_op=async_op),
            group,
            timeout,
        )

    return all_reduce


def _fast_backward(grad_output, input, weight, mean, var, count, eps, all_reduce, input_grad):
    # sum dl/dy * xhat (= dl/dgamma) and sum dl/dy (= dl/dbeta), local: the eval-mode kernel
    # asked for the two sums only reads dl/dy and x once and writes nothing full-size.
    _, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
        grad_output, input, weight, mean, var, None, None, False, eps, [False, True, True]
    )
    if not input_grad:
        return None, grad_gamma, grad_beta
    sums = torch.cat([grad_beta, grad_gamma])
    all_reduce(sums)
    sum_dy, sum_dy_xhat = sums.chunk(2)
    k = torch.rsqrt(var + eps)
    if weight is not None:
        k = k * weight  # gamma / s
    # dl/dx = gamma/s * dl/dy - gamma/s * (sum dl/dy / N + xhat * sum(dl/dy * xhat) / N):
    # the correction is an affine map of xhat per channel, which torch's eval-mode kernel
    # computes from x in one pass (on the CPU folded as x * a + b, as its eval forward is, so
    # |mu| >> sigma costs digits there); gamma/s * dl/dy is then added in place, one more
    # pass and no other full-size tensor.
    grad_input = torch.batch_norm(
        input, -k * (sum_dy_xhat / count), -k * (sum_dy / count), mean, var, False, 0.0, eps,
        torch.backends.cudnn.enabled,
    )  # fmt: skip
    return grad_input.addcmul_(grad_output, F.per_channel(k, input, 1)), grad_gamma, grad_beta


def _generic_backward(grad_output, input, weight, mean, var, count, eps, all_reduce, mask,
                      input_grad):  # fmt: skip
    dims = F.reduce_dims(input, 1)
    invstd = torch.rsqrt(var + eps)
    dtype = invstd.dtype
    invstd_c = F.per_channel(invstd, input, 1)
    xhat = input.to(dtype) * invstd_c
    xhat.add_(F.per_channel(-mean * invstd, input, 1))  # as `normalize` computes it
    grad_input, grad_gamma, grad_beta = F.batch_norm_backward(
        grad_output.to(dtype),
        xhat,
        invstd_c,
        None if weight is None else F.per_channel(weight.to(dtype), input, 1),
        dims,
        count=count,
        mask=None if mask is None else mask.unsqueeze(1),
        all_reduce=all_reduce,
        input_grad=input_grad,
    )
    return grad_input, grad_gamma.reshape(-1), grad_beta.reshape(-1)


def _double_backward(ctx, grad_output, input, weight, bias, mask):
    """The backward as a graph: recompute the transform differentiably and differentiate it.

    Every rank takes this path together (create_graph is the same call on every rank)."""
    needs = ctx.needs_input_grad[:3]
    wrt = [t for t, need in zip((input, weight, bias), needs, strict=True) if need]
    output, _ = differentiable_sync(input, weight, bias, ctx.eps, ctx.group, ctx.timeout, mask)
    grads = iter(torch.autograd.grad(output, wrt, grad_output, create_graph=True,
                                     allow_unused=True, materialize_grads=True))  # fmt: skip
    out = [next(grads) if need else None for need in needs]
    return (*out, None, None, None, None, None, None, None)
