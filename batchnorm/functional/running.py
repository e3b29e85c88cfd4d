"""Algorithm 2, step 2: the running statistics E[x], Var[x] as moving averages of the batches'
mu_B and m/(m-1) sigma2_B, their non-finite guard, and the one function that writes them.

The rule is pure (`running_stats_step`, `update_running_stats`); `commit_running_stats` is the
one place in the library that writes running statistics and their counters, for every
engine: the layers' torch path, torch's fused kernel (which computes the same rule into
copies) and the Triton kernels (which return the batch statistics).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from batchnorm.functional.statistics import BatchStats

__all__ = [
    "running_stats_step",
    "all_finite",
    "finite_step",
    "update_running_stats",
    "host_readable",
    "momentum_value",
    "write_running_stats",
    "commit_running_stats",
]


def running_stats_step(
    running_mean: Tensor, running_var: Tensor, stats: BatchStats, momentum: float | Tensor
) -> tuple[Tensor, Tensor]:
    """One moving-average step towards a batch's statistics, unguarded (the layers' rule).

    running_mean <- (1 - momentum) * running_mean + momentum * mu_B
    running_var  <- (1 - momentum) * running_var  + momentum * m/(m-1) * sigma2_B

    Computed in the buffers' dtype (what they will store). ``momentum`` may be a 0-d tensor
    (the cumulative average 1/k stays in the graph under torch.compile). torch's kernel
    applies the same rule in place (``torch.batch_norm`` with running statistics).
    """
    count = stats.count
    mean = stats.mean.to(running_mean.dtype)
    var = stats.var.to(running_var.dtype) * (count / (count - 1))
    if isinstance(momentum, Tensor):
        momentum = momentum.to(running_mean.dtype)
    return torch.lerp(running_mean, mean, momentum), torch.lerp(running_var, var, momentum)


def all_finite(*tensors: Tensor) -> Tensor:
    """0-d bool tensor: whether every value of ``tensors`` is finite."""
    finite = torch.isfinite(tensors[0]).all()
    for t in tensors[1:]:
        finite = finite & torch.isfinite(t).all()
    return finite


def finite_step(new_mean: Tensor, new_var: Tensor) -> Tensor:
    """The guard: 0-d bool, whether new running statistics may be stored.

    The variance is computed from the mean, so a non-finite batch mean makes it non-finite
    too, and in 32 or 64 bits the variance alone tells; 16-bit buffers can round a finite
    float32 mean to inf (|mean| > 65504 in float16), so there both are checked.
    """
    if new_mean.element_size() < 4:
        return all_finite(new_mean, new_var)
    return all_finite(new_var)


def _finite_on_host(new_mean: Tensor, new_var: Tensor) -> bool:
    # `finite_step` read back, in its fast form: max propagates NaN, so one reduction and one
    # read tell whether every value is finite (isfinite + all costs several operations).
    if new_mean.element_size() < 4 and not math.isfinite(new_mean.abs().max().item()):
        return False
    return math.isfinite(new_var.max().item())


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, stats: BatchStats, momentum: float | Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The running-statistics rule with its guard: `running_stats_step`, kept only if finite.

    Returns:
        (new_running_mean, new_running_var, updated); where the step is not finite the old
        statistics come back and ``updated`` (a 0-d bool tensor) is False. Nothing is read
        back to the host, so this is the same under torch.compile, torch.func and on GPUs.
    """
    new_mean, new_var = running_stats_step(running_mean, running_var, stats, momentum)
    return _guarded(running_mean, running_var, new_mean, new_var)


def _guarded(running_mean, running_var, new_mean, new_var) -> tuple[Tensor, Tensor, Tensor]:
    # The guard in tensor form: the new statistics where `finite_step` allows, else the old.
    updated = finite_step(new_mean, new_var)
    return (
        torch.where(updated, new_mean, running_mean),
        torch.where(updated, new_var, running_var),
        updated,
    )


# Counters on the CPU add this instead of the int 1, which the dispatcher would first wrap
# into a tensor (0.8 us of a (60, 100) layer's ~40 us forward).
_ONE = torch.ones((), dtype=torch.long)


_compiling = torch.compiler.is_compiling  # bound once: every training call asks
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def host_readable(t: Tensor) -> bool:
    """Whether reading a value of ``t`` back to Python is free: eager mode on the CPU.

    On accelerators it would synchronize; under torch.compile it would break the graph;
    under torch.func transforms it is not allowed. There the write selects with
    `torch.where` instead of branching."""
    return t.is_cpu and not _compiling() and not _wrapped(t)


def momentum_value(
    momentum: float | None, num_batches_tracked: Tensor, like: Tensor, readable: bool
) -> float | Tensor:
    """The weight of this batch: ``momentum``, or for ``momentum=None`` the cumulative
    average's 1/(k+1) after k tracked batches (Algorithm 2's E_B over equal batches).

    1/(k+1) is a float when reading k back is free (``readable``, `host_readable`), else a
    0-d tensor of ``like``'s dtype, so that torch.compile keeps it in the graph instead of
    specializing (and recompiling) on every new k.
    """
    if momentum is not None:
        return momentum
    if readable:
        return 1.0 / (num_batches_tracked.item() + 1)
    return (num_batches_tracked + 1).to(like.dtype).reciprocal()


def write_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    new_mean: Tensor,
    new_var: Tensor,
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
    readable: bool | None = None,
    backup: Tensor | None = None,
) -> None:
    """The one write of running statistics, guarded: store ``new_mean``, ``new_var`` in place
    if `finite_step` allows and count the batch in ``num_batches_tracked``; otherwise leave
    the buffers as they were and count it in ``num_batches_skipped`` (either counter may be
    None).

    In eager mode on the CPU (`host_readable`; ``readable`` when the caller has it already)
    the guard is read back and branches, and the buffers are written through ``.data``, as
    torch's kernel writes them: no autograd version bump, so a graph that saved the buffers
    stays valid. There a kernel may have written the new values into the buffers already
    (torch's, which applies `running_stats_step`'s rule in place): it passes the buffers as
    ``new_mean``/``new_var`` and ``backup``, the old values as one (2C,) tensor, which a
    failed guard restores. Elsewhere the guard selects with `torch.where` and is added to the
    counters as a 0-d bool: nothing synchronizes or breaks a compiled graph (plain copies:
    foreach ops have no vmap rule).
    """
    if readable if readable is not None else host_readable(running_var):
        if _finite_on_host(new_mean, new_var):
            if new_mean is not running_mean:
                torch._foreach_copy_([running_mean.data, running_var.data], [new_mean, new_var])
            if num_batches_tracked is not None:
                num_batches_tracked.add_(_ONE)
            return
        if backup is not None:
            torch._foreach_copy_([running_mean.data, running_var.data], list(backup.chunk(2)))
        if num_batches_skipped is not None:
            num_batches_skipped.add_(_ONE)
        return
    if backup is not None:
        raise ValueError("a kernel writes the buffers in place only where the guard is read back")
    kept_mean, kept_var, updated = _guarded(running_mean, running_var, new_mean, new_var)
    running_mean.copy_(kept_mean)
    running_var.copy_(kept_var)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(updated)
    if num_batches_skipped is not None:
        num_batches_skipped.add_(~updated)


def commit_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    stats: BatchStats,
    momentum: float | None,
    num_batches_tracked: Tensor,
    num_batches_skipped: Tensor | None = None,
) -> None:
    """Commit one batch's statistics to the running statistics, in place: the momentum
    (`momentum_value`), the rule (`running_stats_step`) and the guarded write
    (`write_running_stats`)."""
    readable = host_readable(running_var)
    weight = momentum_value(momentum, num_batches_tracked, running_mean, readable)
    new_mean, new_var = running_stats_step(running_mean, running_var, stats, weight)
    write_running_stats(
        running_mean, running_var, new_mean, new_var, num_batches_tracked, num_batches_skipped,
        readable,
    )  # fmt: skip
