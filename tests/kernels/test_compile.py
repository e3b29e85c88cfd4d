"""The kernels compile for a real GPU (sm_90, through ptxas to a cubin) on this CPU machine,
which the interpreter-run tests cannot show; see sm90_compile.py."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_kernels_compile_for_sm90(tmp_path):
    triton_dir = Path(importlib.util.find_spec("triton").origin).parent
    ptxas = triton_dir / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton build ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    # this checkout's package, not whichever one the environment has installed
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    script = Path(__file__).with_name("sm90_compile.py")
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().startswith("compiled ")
    assert int(done.stdout.split()[1]) >= 12  # every kernel's branches were reached
