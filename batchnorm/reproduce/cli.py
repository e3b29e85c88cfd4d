"""The `batchnorm` command line: `batchnorm data ...` and `batchnorm reproduce <figure>`.

Flags are parsed at the edge and handed to the data module and the experiments; every
experiment takes ``--out RUN_DIR`` (a new run) or ``--resume RUN_DIR`` (see `run_folder`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

# What the command line needs beyond the library: the `reproduce` extra of pyproject.toml.
_EXTRA = {"numpy": "numpy", "matplotlib": "matplotlib", "PIL": "pillow"}

# Each entry: (subcommand path, module that provides `add_cli(parser)`).
# `add_cli` adds the module's flags and calls `parser.set_defaults(func=...)`; `func(args)`
# returns the process exit code. Imports are lazy so one broken experiment never hides the rest.
_DATA = "batchnorm.reproduce.data"
_EXPERIMENTS = {
    "fig1": "batchnorm.reproduce.fig1",
    "fig2": "batchnorm.reproduce.fig2",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchnorm",
        description="Batch Normalization (Ioffe & Szegedy 2015): data and paper reproductions.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    data_parser = commands.add_parser("data", help="fetch, verify and locate data sets")
    importlib.import_module(_DATA).add_cli(data_parser)
    reproduce = commands.add_parser("reproduce", help="re-run one of the paper's experiments")
    experiments = reproduce.add_subparsers(dest="experiment", required=True)
    for name, module_name in _EXPERIMENTS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        module.add_cli(experiments.add_parser(name, help=(module.__doc__ or "").splitlines()[0]))
    return parser


def _check_extra() -> None:
    # A library-only install (`pip install batchnorm`) has no numpy/matplotlib/Pillow: say
    # so before anything runs, rather than fail with a traceback (or, for the plot, after
    # training).
    missing = [package for module, package in _EXTRA.items() if _absent(module)]
    if missing:
        sys.exit(
            f"batchnorm: the command line needs the reproduce extra ({', '.join(missing)} "
            "missing): pip install 'batchnorm[reproduce]'"
        )


def _absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ValueError:  # in sys.modules without a spec
        return False


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 success, 1 data unavailable, 2 usage error, 130 interrupted."""
    _check_extra()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: say where the run is and how to go on, no traceback
        run_dir = getattr(args, "run_dir", None)
        go_on = ""
        if run_dir is not None and (Path(run_dir) / "config.json").is_file():
            go_on = f"; continue it with `batchnorm reproduce {args.experiment} --resume {run_dir}`"
        print(f"batchnorm: interrupted{go_on}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
