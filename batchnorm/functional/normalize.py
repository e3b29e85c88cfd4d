"""The normalizing map y = gamma (x - mean) / sqrt(var + eps) + beta: Algorithm 1's output with
batch statistics, and Algorithm 2, step 3 (the fixed affine map of inference) with population
statistics."""

from __future__ import annotations

import torch
from torch import Tensor

from batchnorm.functional.checks import channel_axis, per_channel

__all__ = ["inference_affine", "normalize", "batch_norm_inference"]


def inference_affine(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Algorithm 2, step 3: BN with fixed statistics as one affine map y = scale * x + shift.

    scale = gamma / sqrt(Var[x] + eps), shift = beta - gamma * E[x] / sqrt(Var[x] + eps).
    Missing gamma/beta count as 1/0. Used for inference, folding and export.
    """
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def normalize(
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> Tensor:
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, per channel along ``axis``.

    With batch statistics this is Algorithm 1's output; with population statistics it is
    Algorithm 2's inference transform. Computed in the statistics' dtype, returned in the
    input's.
    """
    axis = channel_axis(input, axis)
    scale, shift = inference_affine(mean, var, weight, bias, eps)
    x = input.to(scale.dtype)
    y = torch.addcmul(per_channel(shift, input, axis), x, per_channel(scale, input, axis))
    return y.to(input.dtype)


def batch_norm_inference(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    backward: str = "native",
) -> Tensor:
    """Algorithm 2, step 3: normalize with the population statistics (one affine map).

    The native path is torch's kernel, which does not write to the running statistics in
    eval mode; the paper path (and any channel axis but 1) is `normalize`.
    """
    # torch's kernel has no case for parameters in another dtype than the statistics (bf16
    # parameters with fp32 buffers, as FSDP2's mixed precision casts them).
    same = weight is None or weight.dtype == running_var.dtype
    if backward == "native" and axis in (1, 1 - input.dim()) and same:
        return torch.batch_norm(
            input, weight, bias, running_mean, running_var, False, 0.0, eps,
            torch.backends.cudnn.enabled,
        )  # fmt: skip
    return normalize(input, running_mean, running_var, weight, bias, eps, axis)
