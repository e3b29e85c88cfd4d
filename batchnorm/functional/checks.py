"""The input conventions every function here shares, and their checks (stated once).

Where the channel is (``axis``), which dimensions a statistic reduces, how a (C,) tensor
broadcasts, which dtype statistics accumulate in, how many values a channel has (m), and the
checks of eps, masks, a training batch and the settings: the layers, the collectives and the
kernels import these instead of writing their own.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

__all__ = [
    "check_input",
    "channel_axis",
    "transformed",
    "has_tangent",
    "reduce_dims",
    "per_channel",
    "stats_dtype",
    "values_per_channel",
    "check_eps",
    "check_mask",
    "check_training_batch",
    "check_arguments",
    "check_backward",
    "check_virtual_batch_size",
    "check_renorm_limits",
    "check_residual",
]


def check_input(
    input: Tensor, num_features: int, axis: int = 1, ranks: tuple[int, ...] = (), who: str = ""
) -> None:
    """A layer's input, before any work: a rank in ``ranks`` (any rank >= 2 when empty), a
    channel ``axis`` it has, a floating-point dtype, ``num_features`` channels. The errors
    name ``who`` (the layer), what it expected and what came."""
    dim = input.dim()
    if ranks:
        if dim not in ranks:
            expected = " or ".join(f"{r}D" for r in ranks)
            raise ValueError(
                f"{who} expected {expected} input, got {dim}D input of shape {tuple(input.shape)}"
            )
    elif dim < 2:
        raise ValueError(
            f"{who} expected input of at least 2 dimensions (N, C, ...), "
            f"got shape {tuple(input.shape)}"
        )
    if not -dim <= axis < dim:
        raise ValueError(
            f"{who} normalizes channel axis {axis}, which input of shape "
            f"{tuple(input.shape)} does not have"
        )
    if not input.is_floating_point():
        raise TypeError(f"{who} expected a floating-point input, got {input.dtype}")
    if input.shape[axis] != num_features:
        raise ValueError(
            f"{who}({num_features}) expected {num_features} channels on axis {axis}, got "
            f"{input.shape[axis]} (input shape {tuple(input.shape)})"
        )


def channel_axis(input: Tensor, axis: int) -> int:
    if input.dim() < 2:
        raise ValueError(
            f"batch norm expects an input of at least 2 dimensions (N, C, ...), "
            f"got shape {tuple(input.shape)}"
        )
    if not -input.dim() <= axis < input.dim():
        raise ValueError(
            f"channel axis {axis} is out of range for input of shape {tuple(input.shape)}"
        )
    return axis % input.dim()


def transformed(t: Tensor) -> bool:
    """Whether ``t`` is wrapped by a torch.func transform or a vmap (the legacy one batches
    ``autograd.grad(..., is_grads_batched=True)``): no in-place ``out=`` writes, no data
    pointer for a kernel."""
    functorch = torch._C._functorch
    return (
        functorch.is_functorch_wrapped_tensor(t)
        or functorch.is_batchedtensor(t)
        or functorch.is_legacy_batchedtensor(t)
    )


def has_tangent(*tensors) -> bool:
    """Whether forward-mode AD (`torch.autograd.forward_ad`) carries a tangent on any of
    ``tensors`` (``None`` entries allowed)."""
    if getattr(forward_ad, "_current_level", 0) < 0:  # no dual level entered: the fast answer
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def reduce_dims(input: Tensor, axis: int) -> list[int]:
    return [d for d in range(input.dim()) if d != axis]


def per_channel(t: Tensor, input: Tensor, axis: int) -> Tensor:
    """View a (C,) tensor so it broadcasts along ``axis`` of ``input``."""
    shape = [1] * input.dim()
    shape[axis] = -1
    return t.reshape(shape)


def stats_dtype(input: Tensor) -> torch.dtype:
    # Half-precision sums lose the mean; accumulate in float32 (float64 stays float64).
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def values_per_channel(input: Tensor, axis: int) -> int:
    return input.numel() // input.shape[axis] if input.shape[axis] else 0


def check_eps(eps: float, batch_statistics: bool) -> None:
    # torch's rule: eps > 0 whenever the batch's own variance is normalized by (it may be 0),
    # eps >= 0 with population statistics.
    if batch_statistics and not eps > 0:
        raise ValueError(f"eps must be positive when normalizing with batch statistics, got {eps}")
    if not eps >= 0:
        # torch's words (its module tests match "eps must be positive").
        raise ValueError(f"eps must be positive (or 0 with population statistics), got {eps}")


def check_mask(mask: Tensor, input: Tensor, axis: int) -> None:
    """A mask is a bool tensor of the input's shape without the channel axis (any mode)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor (True = use this position), got {got}")
    expected = tuple(s for d, s in enumerate(input.shape) if d != axis)
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask must have the input's shape without the channel axis, {expected}, "
            f"got {tuple(mask.shape)} (input {tuple(input.shape)}, channel axis {axis})"
        )


def check_training_batch(input: Tensor, axis: int, count: int, what: str = "") -> None:
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {count}{what} "
            f"(input size {tuple(input.shape)}, channel axis {axis}): the batch variance of a "
            "single value is undefined. Use a larger batch, drop the last incomplete batch, or "
            "evaluate with population statistics (eval mode)."
        )


def check_backward(backward: str) -> None:
    """``backward`` names a backward pass: "native" (torch's kernel) or "paper" (Sec. 3)."""
    if backward not in ("native", "paper"):
        raise ValueError(f"backward must be 'native' or 'paper', got {backward!r}")


def check_arguments(input, axis, eps, batch_statistics, backward, mask, virtual_batch_size):
    check_backward(backward)
    axis = channel_axis(input, axis)
    check_eps(eps, batch_statistics)
    if mask is not None:
        check_mask(mask, input, axis)
    if virtual_batch_size is not None:
        check_virtual_batch_size(virtual_batch_size)
    return axis


def check_virtual_batch_size(v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 2:
        raise ValueError(f"virtual_batch_size must be an int >= 2 or None, got {v!r}")


def check_renorm_limits(r_max: float, d_max: float) -> None:
    if not (r_max >= 1 and d_max >= 0):
        raise ValueError(f"need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")


def check_residual(
    input: Tensor, residual: Tensor | None, memory_saving: bool = False, who: str = ""
) -> None:
    """A residual of fused BN, act(BN(x) + residual), has the input's shape; memory saving
    takes none. ``who`` (a layer's name) opens the message."""
    if residual is None:
        return
    prefix = f"{who} " if who else ""
    if residual.shape != input.shape:
        raise ValueError(
            f"{prefix}expected a residual of the input's shape {tuple(input.shape)}, got "
            f"{tuple(residual.shape)}"
        )
    if memory_saving:
        raise ValueError(
            f"{prefix}memory_saving=True takes no residual: subtracting it from the output "
            "would cancel most digits of gamma * xhat; add the residual after the layer instead"
        )
