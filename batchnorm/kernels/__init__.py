"""Fused Triton kernels for BN + activation (+ residual): Algorithm 1's forward with the
running-statistics update on the device, the paper's backward (Sec. 3), Algorithm 2's eval
map, and In-Place ABN's memory-saving backward.

Triton is imported only when a kernel is first used, so ``import batchnorm`` never needs it.
Public names: `batch_norm_act` (the functional form), `BatchNormActFunction` (its
autograd.Function), `gamma_invertible`, `is_available` and `supports` (for dispatchers).
See docs/kernels.md.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = [
    "batch_norm_act",
    "BatchNormActFunction",
    "gamma_invertible",
    "is_available",
    "supports",
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_available() -> bool:
    """Whether Triton can be imported (it ships with PyTorch's CUDA builds)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a blocked or half-imported module
        return False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(input: torch.Tensor) -> bool:
    """Whether the kernels take ``input``: Triton importable, a CUDA tensor (a CPU one under
    ``TRITON_INTERPRET=1``), float32/float16/bfloat16, rank >= 2, fewer than 2^31 elements.
    Anything else (float64, CPU without the interpreter, huge tensors) is the torch path's."""
    device_ok = input.is_cuda or (input.device.type == "cpu" and _interpreting())
    return (
        device_ok
        and input.dtype in DTYPES
        and input.dim() >= 2
        and input.numel() < 2**31
        and is_available()
    )


def batch_norm_act(*args, **kwargs):
    """act(BN(input) + residual) by the Triton kernels; see `function.batch_norm_act`."""
    from batchnorm.kernels.function import batch_norm_act as impl

    return impl(*args, **kwargs)


def gamma_invertible(weight, gamma_min=None) -> bool:
    """Whether memory saving may divide by gamma; see `function.gamma_invertible`."""
    from batchnorm.kernels import function

    return function.gamma_invertible(weight, function.GAMMA_MIN if gamma_min is None else gamma_min)


def __getattr__(name):
    if name == "BatchNormActFunction":
        from batchnorm.kernels.function import BatchNormActFunction

        return BatchNormActFunction
    raise AttributeError(f"module 'batchnorm.kernels' has no attribute {name!r}")
