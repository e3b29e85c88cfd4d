"""Kernel tests run on the CPU under Triton's interpreter; they skip where Triton is missing.

TRITON_INTERPRET must be set before the first ``@triton.jit`` runs, i.e. before
`batchnorm.kernels.forward` is imported: this file is imported at collection, first.
"""

import os
from pathlib import Path

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"

from batchnorm.kernels import is_available  # noqa: E402  (imports no Triton)

HAVE_TRITON = is_available()
HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    if HAVE_TRITON:
        return
    skip = pytest.mark.skip(reason="triton is not installed (pip install -e '.[dev]' brings it)")
    for item in items:
        path = Path(item.fspath)
        if HERE in path.parents and path.name != "test_layout.py":  # that one needs no Triton
            item.add_marker(skip)


@pytest.fixture
def huge_view():
    """A float16 (2, 3, 2, 2) view whose 24 values span 2^31 + 12 addresses (batch stride
    2^31), over 4 GiB of address space of which only the two written pages are memory."""
    try:
        big = torch.empty(2**31 + 16, dtype=torch.float16)
    except RuntimeError:  # an allocator or overcommit policy that refuses the reservation
        pytest.skip("cannot reserve 4 GiB of address space")
    x = big.as_strided((2, 3, 2, 2), (2**31, 4, 2, 1))
    x.copy_(torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0)))
    return x
