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


# --------------------------------------------------------------------------------------------
# Inside the reproduction wing: imports flow one way (no module imports, even lazily or for
# type checking only, a module that imports it back).


def _module_imports(package_dir: Path, package: str) -> dict[str, set[str]]:
    # {module: the modules of the same package it imports}, from the source with ast: every
    # import statement counts, at the top, inside a function or under TYPE_CHECKING.
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path
    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # from . import x, from ..models import y
                    anchor = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                    base = f"{anchor}.{base}" if base else anchor
                # `from pkg import mod` imports the submodule; `from mod import name`, mod
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                         for a in node.names]
            else:
                continue
            for target in found:
                while target and target not in modules:  # a.b.c -> the module that holds it
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    # Each cycle a depth-first search closes, as a path [a, ..., a]; [] for an acyclic graph.
    found, done = [], set()

    def visit(node, path):
        if node in path:
            found.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for target in sorted(graph.get(node, ())):
            visit(target, path + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return found


def test_the_cycle_check_finds_a_cycle(tmp_path):
    # The check below must be able to fail: two modules that import each other, one of them
    # only under TYPE_CHECKING (as fig1 and fig1_report once did), and a third, acyclic one.
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\nfrom pkg.c import C\n")
    (package / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\n")
    (package / "c.py").write_text("import os\n")
    graph = _module_imports(package, "pkg")
    assert graph["pkg.a"] == {"pkg.b", "pkg.c"} and graph["pkg.b"] == {"pkg.a"}
    assert _cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
    (package / "b.py").write_text("from . import c\n")  # relative: no cycle left
    assert _module_imports(package, "pkg")["pkg.b"] == {"pkg.c"}
    assert _cycles(_module_imports(package, "pkg")) == []


def test_the_reproduction_wing_has_no_import_cycle():
    graph = _module_imports(PACKAGE / "reproduce", "batchnorm.reproduce")
    assert len(graph) >= 15 and "batchnorm.reproduce.fig1_config" in graph
    assert graph["batchnorm.reproduce.fig1_report"] >= {"batchnorm.reproduce.fig1_config"}
    assert _cycles(graph) == []
