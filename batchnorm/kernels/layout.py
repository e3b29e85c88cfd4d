"""How the kernels address a (N, C, *spatial) tensor: three strides per tensor, no copies.

Every kernel sees its tensors as a grid of ``rows x cols`` positions per channel, with the
element of (row n, position s, channel c) at ``n * stride_n + s * stride_s + c * stride_c``.
NCHW, NCDHW and (N, C, L) give rows = N, cols = the spatial size; channels_last, NDHWC and
(N, C) fold the batch into the positions (rows = 1, cols = N * spatial), because there the
batch stride is the spatial one times the spatial size. Only spatial dimensions that do not
flatten into one stride (a permuted or sliced spatial layout), and views whose addresses span
2^31 elements or more (the kernels index with int32), cost a contiguous copy.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

INDEX_LIMIT = 2**31  # the kernels index with int32
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the element types they load and store


class Geometry(NamedTuple):
    """Shared shape of the tensors one kernel reads and writes, and each one's strides."""

    rows: int  # N, or 1 when the batch folds into the positions
    cols: int  # positions per row (spatial size, or N * spatial size)
    channels: int  # C
    strides: tuple[tuple[int, int, int], ...]  # per tensor: (stride_n, stride_s, stride_c)

    @property
    def count(self) -> int:
        """m: values per channel (Sec. 3.2: m' = N * p * q for convolutional input)."""
        return self.rows * self.cols


def _spatial_stride(t: Tensor) -> int | None:
    """The stride that walks ``t``'s flattened spatial dims, 0 if there are none (or all are
    size 1), None when they do not flatten into one stride."""
    dims = [(n, s) for n, s in zip(t.shape[2:], t.stride()[2:]) if n != 1]
    for (_, outer), (size, inner) in zip(dims, dims[1:]):
        if outer != inner * size:
            return None
    return dims[-1][1] if dims else 0


def span(t: Tensor) -> int:
    """Elements from ``t``'s first address to its last (``numel`` for a dense tensor)."""
    if t.numel() == 0:
        return 0
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) + 1


def addressable(t: Tensor) -> bool:
    """Whether the kernels' int32 offsets reach every element of ``t`` as it is strided:
    fewer than 2^31 elements, spread over fewer than 2^31 addresses."""
    return t.numel() < INDEX_LIMIT and span(t) < INDEX_LIMIT


def _check_indexable(t: Tensor) -> None:
    if t.numel() >= INDEX_LIMIT:
        raise ValueError(
            f"the Triton BN kernels index with int32 and take tensors of fewer than 2^31 "
            f"elements, got shape {tuple(t.shape)}: use the torch path"
        )


def geometry(*tensors: Tensor) -> tuple[list[Tensor], Geometry]:
    """View same-shaped (N, C, *spatial) tensors through one Geometry.

    Returns the tensors (a tensor whose spatial dims do not flatten, or whose addresses span
    2^31 elements or more, is replaced by a contiguous copy: the only cases that copy) and
    their Geometry.
    """
    shape = tensors[0].shape
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"expected tensors of shape {tuple(shape)}, got {tuple(t.shape)}")
    n, c = shape[0], shape[1]
    s = math.prod(shape[2:])
    views, strides = [], []
    for t in tensors:
        _check_indexable(t)
        ss = _spatial_stride(t)
        if ss is None or span(t) >= INDEX_LIMIT:
            # Spatial dims that do not flatten, or a view spread over 2^31 addresses or more
            # (`kernels.supports` sends those to the torch path; a direct call copies).
            t = t.contiguous()
            ss = _spatial_stride(t)
        views.append(t)
        strides.append((t.stride(0), ss, t.stride(1)))
    if s == 1:
        # (N, C) and 1x1 spatial: the batch is the only reduced axis; walk it as positions.
        return views, Geometry(1, n, c, tuple((0, sn, sc) for sn, _, sc in strides))
    if n == 1 or all(sn == s * ss for sn, ss, _ in strides):
        # channels_last / NDHWC (or a batch of one): batch and positions form one axis.
        return views, Geometry(1, n * s, c, tuple((0, ss, sc) for _, ss, sc in strides))
    return views, Geometry(n, s, c, tuple(strides))
