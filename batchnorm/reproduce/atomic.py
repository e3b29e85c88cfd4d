"""Atomic file writes: the one way the reproduction wing writes a file (Sec. 4 runs' evidence).

Config, summaries, reports, figures, checkpoints and the data cache all go through
`atomic_write`, so a reader or a crash sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_json", "write_text", "save_figure"]


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO], Any], *, text: bool = False
) -> None:
    """Write a file with ``write(f)`` through a temporary file in the same folder and a rename.

    The one way this wing writes a file (config, summaries, reports, figures, checkpoints, the
    data cache): the data is flushed to disk before an atomic ``os.replace``, so a reader or a
    crash sees the old file or the new one, never half of one, and a failed ``write`` leaves
    the old file and no temporary behind. The new file gets the permissions a plain ``open``
    would give (0666 less the umask), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w" if text else "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON with `atomic_write`."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, default=str) + "\n"), text=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (a report) with `atomic_write`."""
    atomic_write(path, lambda f: f.write(text), text=True)


def save_figure(path: str | os.PathLike, fig, dpi: int) -> None:
    """Save a matplotlib figure as PNG with `atomic_write`."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
