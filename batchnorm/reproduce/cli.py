"""The `batchnorm` command line: parses flags at the edge and hands them to experiments and data."""

from __future__ import annotations

import argparse
import importlib
import sys

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
