"""Kernel tests run on the CPU under Triton's interpreter; they skip where Triton is missing.

TRITON_INTERPRET must be set before the first ``@triton.jit`` runs, i.e. before
`batchnorm.kernels.forward` is imported: this file is imported at collection, first.
"""

import os
from pathlib import Path

import pytest

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
