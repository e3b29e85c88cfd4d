"""Provenance of a run: library versions, machine, git revision, command and time (Sec. 4 evidence).

Every run folder's config.json (`run_folder`) and every benchmark or sweep record starts from
`provenance`, so a number says how, where and from which code it was obtained.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

__all__ = ["provenance", "git_state", "command_line", "now"]

_PACKAGE = Path(__file__).resolve().parents[1]  # batchnorm/


def now() -> str:
    """The current UTC time, ISO 8601 to the second (config.json's "started", "finished")."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(_PACKAGE), *args], capture_output=True, text=True, timeout=10,
            check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None


def git_state() -> dict:
    """{"revision": HEAD or None, "dirty": whether the package's sources differ from HEAD}."""
    revision = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", ".") if revision else None
    return {"revision": revision, "dirty": None if status is None else bool(status)}


def command_line(argv: list[str] | None = None) -> list[str]:
    """The command as typed: ``python -m batchnorm`` for ``__main__.py``, else the program."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return []
    path = Path(argv[0])
    program = path.name
    if path.suffix == ".py" and path.resolve().is_relative_to(_PACKAGE):
        module = path.resolve().relative_to(_PACKAGE.parent).with_suffix("").parts
        program = "python -m " + ".".join(module[:-1] if module[-1] == "__main__" else module)
    elif program == "__main__.py":  # python -m <package> of another package (pytest, ...)
        program = f"python -m {path.parent.name}"
    return [program, *argv[1:]]


def provenance(argv: list[str] | None = None) -> dict:
    """Versions, machine, git revision, command and start time of the current process."""
    import batchnorm

    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "batchnorm": batchnorm.__version__,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "git": git_state(),
        "command": command_line(argv),
        "started": now(),
    }
