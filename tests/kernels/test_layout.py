"""Layouts reach the kernels through strides, without copies, and the launch plan gives
enough programs when C is small (no Triton needed here)."""

import pytest
import torch

from batchnorm.kernels import heuristics
from batchnorm.kernels.layout import Geometry, geometry

# (name, tensor) -> expected (rows, cols, stride_n, stride_s, stride_c)
x4 = torch.empty(2, 3, 4, 5)
x5 = torch.empty(2, 3, 4, 5, 6)
CASES = [
    ("NCHW", x4, (2, 20, 60, 1, 20)),
    ("channels_last", x4.contiguous(memory_format=torch.channels_last), (1, 40, 0, 3, 1)),
    ("NCDHW", x5, (2, 120, 360, 1, 120)),
    ("NDHWC", x5.contiguous(memory_format=torch.channels_last_3d), (1, 240, 0, 3, 1)),
    ("(N, C)", torch.empty(7, 3), (1, 7, 0, 3, 1)),
    ("(N, C, L)", torch.empty(2, 3, 11), (2, 11, 33, 1, 11)),
    ("1x1 spatial", torch.empty(6, 3, 1, 1), (1, 6, 0, 3, 1)),
    ("batch of one", torch.empty(1, 3, 4, 5), (1, 20, 0, 1, 20)),
]


@pytest.mark.parametrize("name,x,expected", CASES, ids=[c[0] for c in CASES])
def test_geometry_uses_strides_without_copies(name, x, expected):
    (view,), geom = geometry(x)
    assert view is x
    rows, cols, sn, ss, sc = expected
    assert (geom.rows, geom.cols, geom.channels) == (rows, cols, x.shape[1])
    assert geom.strides == ((sn, ss, sc),)
    assert geom.count == x.numel() // x.shape[1]


def test_every_element_is_addressed_once():
    # The (row, position, channel) -> offset map of each layout is a bijection onto x.
    for _, x, _ in CASES:
        (_,), geom = geometry(x)
        sn, ss, sc = geom.strides[0]
        offsets = {
            r * sn + s * ss + c * sc
            for r in range(geom.rows)
            for s in range(geom.cols)
            for c in range(geom.channels)
        }
        assert len(offsets) == x.numel()
        assert offsets == set(range(x.numel()))


def test_mixed_layouts_share_one_geometry():
    x = torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    r = torch.empty(2, 3, 4, 5)
    (_, _), geom = geometry(x, r)
    assert geom.rows == 2 and geom.cols == 20  # no batch folding: r's batch stride differs
    assert geom.strides == ((60, 3, 1), (60, 1, 20))


def test_spatial_dims_that_do_not_flatten_are_copied():
    x = torch.empty(2, 3, 4, 5).transpose(2, 3)  # spatial dims permuted
    (view,), geom = geometry(x)
    assert view is not x and view.is_contiguous()
    assert geom.strides == ((60, 1, 20),)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"expected tensors of shape \(2, 3\)"):
        geometry(torch.empty(2, 3), torch.empty(2, 4))


def test_plan_fills_the_device_when_channels_are_few():
    # (32, 64, 56, 56) NCHW on a 132-multiprocessor card: one program per channel would be
    # 64 programs; the plan splits each channel's 100352 values over several programs.
    geom = Geometry(32, 56 * 56, 64, ((64 * 3136, 1, 3136),))
    launch = heuristics.plan(geom, sms=132)
    assert not launch.single
    assert launch.c_blocks * launch.splits >= 2 * 132
    assert launch.splits * launch.tiles_per_split >= launch.tiles
    assert (launch.splits - 1) * launch.tiles_per_split < launch.tiles  # no empty split
    # channels_last: channels are the tile's fast axis, narrowed to give enough programs
    geom = Geometry(1, 32 * 3136, 64, ((0, 64, 1),))
    launch = heuristics.plan(geom, sms=132)
    assert heuristics.MIN_BLOCK_C <= launch.block_c < 64
    assert launch.c_blocks * launch.splits >= 2 * 132
    # the merge of partials stays a small fraction of the input's reads
    values = 32 * 3136
    assert 3 * launch.splits**2 <= heuristics.MERGE_BUDGET * values
    assert launch.splits * launch.block_c <= heuristics.MERGE_BLOCK


def test_plan_uses_one_program_for_small_inputs():
    geom = Geometry(1, 60, 100, ((0, 100, 1),))
    launch = heuristics.plan(geom, sms=132)
    assert launch.single and launch.splits == 1
    assert not heuristics.plan(geom, sms=132, allow_single=False).single


def test_address_span_is_arithmetic_on_sizes_and_strides():
    # The kernels index with int32: a view over 2^31 addresses or more is not addressable,
    # however few elements it has (meta tensors: no memory behind them).
    from batchnorm.kernels.layout import INDEX_LIMIT, addressable, span

    big = torch.empty(2**31 + 16, device="meta")
    x = big.as_strided((2, 3, 2, 2), (2**31, 4, 2, 1))
    assert x.numel() == 24 and span(x) == 2**31 + 12 and not addressable(x)
    assert addressable(big.as_strided((2, 3, 2, 2), (12, 4, 2, 1)))
    assert span(torch.empty(0, 3)) == 0 and span(torch.empty(4, 3).t()) == 12
    assert not addressable(torch.empty(2**31, device="meta").view(2**30, 2))
    assert addressable(torch.empty(1, 1, device="meta").expand(2**15, 2**15))  # stride 0
    assert INDEX_LIMIT == 2**31
