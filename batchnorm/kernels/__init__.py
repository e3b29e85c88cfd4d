"""Fused Triton kernels for BN + activation (+ residual): Algorithm 1's forward (output and
batch statistics in one or two launches), the paper's backward (Sec. 3), Algorithm 2's eval
map, and In-Place ABN's memory-saving backward. The running statistics are committed by the
library's one rule (`batchnorm.functional.commit_running_stats`).

Triton is imported only when a kernel is first used, so ``import batchnorm`` never needs it.
Public names: `batch_norm_act` (the functional form), `transform` (the same without the
commit, for a layer's forward), `BatchNormActFunction` (their autograd.Function),
`gamma_invertible`, and for dispatchers `is_available`, `supports`,
`transformed` and `has_tangent`.
See docs/kernels.md.
"""

from __future__ import annotations

import importlib.util
import os

import torch

# Re-exported: the kernels refuse a transformed tensor or one with a tangent.
from batchnorm.functional import has_tangent as has_tangent
from batchnorm.functional import transformed as transformed
from batchnorm.kernels.layout import DTYPES, addressable

__all__ = [
    "batch_norm_act",
    "transform",
    "BatchNormActFunction",
    "gamma_invertible",
    "is_available",
    "supports",
]

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
    ``TRITON_INTERPRET=1``), float32/float16/bfloat16, rank >= 2, its addresses spanning fewer
    than 2^31 elements (the kernels index with int32). Anything else (float64, CPU without the
    interpreter, huge tensors or views spread that far) is the torch path's."""
    device_ok = input.is_cuda or (input.device.type == "cpu" and _interpreting())
    return (
        device_ok
        and input.dtype in DTYPES
        and input.dim() >= 2
        and addressable(input)
        and is_available()
    )


def batch_norm_act(*args, **kwargs):
    """act(BN(input) + residual) by the Triton kernels; see `function.batch_norm_act`."""
    from batchnorm.kernels.function import batch_norm_act as impl

    return impl(*args, **kwargs)


def transform(*args, **kwargs):
    """The kernels as a transform step, (output, batch statistics); see `function.transform`."""
    from batchnorm.kernels.function import transform as impl

    return impl(*args, **kwargs)


def gamma_invertible(weight, gamma_min=None, *, bias=None, dtype=torch.float32) -> bool:
    """Whether memory saving may rebuild xhat from an output of ``dtype``: |gamma| large
    enough, and |beta| / |gamma| small enough for ``dtype``; see `function.gamma_invertible`."""
    from batchnorm.kernels import function

    gamma_min = function.GAMMA_MIN if gamma_min is None else gamma_min
    return function.gamma_invertible(weight, gamma_min, bias=bias, dtype=dtype)


def __getattr__(name):
    if name == "BatchNormActFunction":
        from batchnorm.kernels.function import BatchNormActFunction

        return BatchNormActFunction
    raise AttributeError(f"module 'batchnorm.kernels' has no attribute {name!r}")
