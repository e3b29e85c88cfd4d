"""The two wings stay apart: the library imports no reproduction code and no plotting."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

import batchnorm

PACKAGE = Path(batchnorm.__file__).resolve().parent
ROOT = PACKAGE.parent


def _library_files() -> list[Path]:
    # Every source file of the library wing; __main__.py is the command line's entry point.
    return [p for p in PACKAGE.rglob("*.py")
            if "reproduce" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"]


def test_library_source_never_imports_the_reproduction_wing():
    offenders = []
    for path in _library_files():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "batchnorm.reproduce" or n.startswith("batchnorm.reproduce.")
                   for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert len(_library_files()) >= 5 and not offenders


def test_library_imports_and_runs_without_the_reproduction_extra():
    # matplotlib, Pillow, numpy and the reproduction wing made unimportable: the library
    # and every one of its modules still import, and a layer trains and recalibrates. The
    # Triton kernels (batchnorm.kernels.*, loaded on first GPU use) are left out: their
    # needs are Triton's (its interpreter imports numpy).
    code = (
        "import sys, importlib, pkgutil\n"
        "for name in ('matplotlib', 'PIL', 'numpy', 'batchnorm.reproduce'):\n"
        "    sys.modules[name] = None\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "import torch, batchnorm\n"
        "skip = ('batchnorm.reproduce', 'batchnorm.__main__', 'batchnorm.kernels.')\n"
        "for m in pkgutil.walk_packages(batchnorm.__path__, 'batchnorm.'):\n"
        "    if not m.name.startswith(skip):\n"
        "        importlib.import_module(m.name)\n"
        "net = torch.nn.Sequential(torch.nn.Linear(3, 4), batchnorm.BatchNorm1d(4))\n"
        "net(torch.randn(8, 3)).sum().backward()\n"
        "batchnorm.recalibrate(net, [torch.randn(8, 3)], progress=False)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


def test_dependencies_split_into_library_and_reproduce():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda specs: {s.split(";")[0].split(">")[0].split("=")[0].strip().lower()  # noqa: E731
                           for s in specs}
    assert names(project["dependencies"]) == {"torch", "tqdm"}
    assert {"matplotlib", "numpy", "pillow"} <= names(project["optional-dependencies"]["reproduce"])
    assert project["scripts"]["batchnorm"] == "batchnorm.reproduce.cli:main"
    pinned = {line.split("==")[0].strip().lower()
              for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    assert names(project["optional-dependencies"]["reproduce"]) <= pinned
    assert '".[dev,reproduce]"' in (ROOT / "Makefile").read_text()


def test_command_line_without_the_extra_names_it():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from batchnorm.reproduce.cli import main\n"
            "main(['data', 'info'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 1
    assert "reproduce extra (matplotlib missing)" in done.stderr
    assert "pip install 'batchnorm[reproduce]'" in done.stderr
