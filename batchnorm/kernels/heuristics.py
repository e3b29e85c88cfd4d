"""Launch shapes for the BN kernels: tile sizes, how many programs split each channel's
reduction, and when one launch suffices. Pure Python, so it is testable without Triton.

Published Triton BNs run one program per channel; with C = 64 at (32, 64, 56, 56) that is
64 programs for 6.4 M values, far too few to fill a GPU. Here every channel block's reduction
is split over ``splits`` programs (the first launch writes partial moments, the second merges
them), so the grid has up to ``PROGRAMS_PER_SM`` programs per multiprocessor at any C.
The constants are starting points chosen on paper: no GPU was available to tune them.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

from batchnorm.kernels.layout import Geometry

TILE = 2048  # elements one program loads per step (8 KiB of float32)
MAX_BLOCK_C = 64  # channels per tile when channels are contiguous (channels_last, (N, C))
MIN_BLOCK_C = 16  # ... and at least this many, so a tile row fills a 32-byte sector in 16 bits
SINGLE_LAUNCH_MAX = 16384  # up to this many elements one program does the whole forward
MAX_SPLITS = 256  # partial-moment rows per channel block
MERGE_BLOCK = 2048  # splits * block_c: the partials one program loads to merge them
# Every program of the second launch merges its channel block's partials itself, so the grid
# reads splits^2 * C * 3 floats of partials (from L2) against rows * cols * C input values:
# splits is capped where that ratio reaches MERGE_BUDGET.
MERGE_BUDGET = 0.25
PROGRAMS_PER_SM = 4
INTERPRETER_SMS = 2  # the Triton interpreter runs programs one after another


class Launch(NamedTuple):
    """One kernel plan: a (c_blocks, splits) grid of (block_s x block_c) tiles."""

    block_s: int  # positions per tile (power of two)
    block_c: int  # channels per tile (power of two)
    c_blocks: int  # ceil(C / block_c)
    tiles: int  # tiles per channel block: rows * ceil(cols / block_s)
    splits: int  # programs sharing one channel block's tiles
    tiles_per_split: int
    single: bool  # the whole forward fits one program

    @property
    def splits_p2(self) -> int:
        """The partial-moment block the merge loads (splits rounded up to a power of two)."""
        return _next_pow2(self.splits)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_sms(device) -> int:
    """Multiprocessors of ``device`` (a CUDA device), or a small count in the interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1" or device.type != "cuda":
        return INTERPRETER_SMS
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count


def plan(geom: Geometry, sms: int, allow_single: bool = True) -> Launch:
    """Tile shape and grid for ``geom`` on a device with ``sms`` multiprocessors.

    The tile's fast axis follows the first tensor's (the input's) contiguous axis: positions
    for NCHW-like data, channels for channels_last and (N, C). ``allow_single=False`` forces
    the two-launch plan (tests use it to cover both paths on small tensors).
    """
    _, ss, sc = geom.strides[0]
    cols, c = geom.cols, geom.channels
    values = geom.rows * cols
    target = PROGRAMS_PER_SM * sms
    cap = max(1, min(MAX_SPLITS, math.isqrt(int(MERGE_BUDGET * values / 3))))
    if sc == 1 and ss != 1:
        # Channels are the fast axis: narrow the channel block until the grid fills the device.
        block_c = min(_next_pow2(c), MAX_BLOCK_C)
        while block_c > MIN_BLOCK_C and _cdiv(c, block_c) * cap < target:
            block_c //= 2
        block_s = min(_next_pow2(cols), max(1, TILE // block_c))
    else:
        block_s = min(_next_pow2(cols), TILE)
        block_c = min(_next_pow2(c), max(1, TILE // block_s), MAX_BLOCK_C)
    c_blocks = _cdiv(c, block_c)
    tiles = geom.rows * _cdiv(cols, block_s)
    single = allow_single and values * c <= SINGLE_LAUNCH_MAX
    cap = max(1, min(cap, MERGE_BLOCK // block_c))
    splits = 1 if single else max(1, min(_cdiv(target, c_blocks), tiles, cap))
    per_split = _cdiv(tiles, splits)
    splits = _cdiv(tiles, per_split)  # no split without tiles
    return Launch(block_s, block_c, c_blocks, tiles, splits, per_split, single)
