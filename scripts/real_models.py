"""Per-model table of the inference toolkit (Alg. 2) on real torchvision and timm models.

The models, their preparation and the oracles are tests/realmodels.py's, the ones
tests/test_real_models.py checks (random init, random gamma/beta, running statistics from one
training batch; inputs (2, 3, 32, 32), float32). Per model, one row:

- BN: torch BN layers (``_BatchNorm``: torch's, timm's BatchNormAct2d); conv: how many
  `convert` turned into ours; folded/left: `fold` with example inputs; fused: `fuse_activations`
  with example inputs, plain + residual / left.
- errors, each max |a - b| / max |b| (relative; times max|y|, the model's largest output,
  gives the absolute error): convert (eval, then training mode) against the torch
  model; recal: the float32 running_var against torch's float64 cumulative average, relative
  to the layer's largest variance, worst layer; freeze and fold against a float64 copy of the
  model, with the float32 model's own error beside them (fp32); fuse against the model's eval
  output; export: the torch.export program of the converted model against eager.
- s: seconds for the model's row (building included), on --threads torch threads.

A pass that raises shows "err"; the message is printed below the table.

    .venv/bin/python scripts/real_models.py [--models tv_resnet18 timm_resnet18] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

# This checkout's batchnorm (not whichever one the environment has installed) and
# tests/realmodels.py (tests/ is not a package).
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from realmodels import (  # noqa: E402
    MODELS,
    batches,
    bn_layers,
    build,
    float64_errors,
    float64_population,
    inputs,
    rel_err,
)

import batchnorm  # noqa: E402


def row(name: str, errors: list[str]) -> dict:
    start = time.perf_counter()
    net = build(name)
    x = inputs()
    with torch.no_grad():
        out = {"model": name, "BN": len(bn_layers(net)), "max|y|": net(x).abs().max().item()}

    def attempt(key, fn):
        try:
            out[key] = fn()
        except Exception as error:  # a row per model, whatever fails
            out[key] = "err"
            errors.append(f"{name} {key}: {type(error).__name__}: {str(error)[:300]}")

    def convert():
        ours = batchnorm.convert(copy.deepcopy(net), to="batchnorm")
        out["conv"] = sum(type(m).__module__.startswith("batchnorm.") for _, m in bn_layers(ours))
        torch_train, ours_train = copy.deepcopy(net).train(), copy.deepcopy(ours).train()
        with torch.no_grad():
            eval_err = rel_err(ours(x), net(x))
            torch.manual_seed(0)
            expected = torch_train(x)
            torch.manual_seed(0)
            return f"{cell('', eval_err)}/{cell('', rel_err(ours_train(x), expected))}"

    def recalibrate():
        ours, data = batchnorm.convert(copy.deepcopy(net), to="batchnorm"), batches()
        batchnorm.recalibrate(ours, data, progress=False)
        expected = float64_population(net, data)
        return max(
            ((m.running_var.double() - expected[n][1]).abs().max() / expected[n][1].max()).item()
            for n, m in bn_layers(ours)
        )

    def freeze():
        frozen = batchnorm.freeze(copy.deepcopy(net))
        with torch.no_grad():
            err, out["fp32"] = float64_errors(net, x, frozen(x))
        return err

    def fold():
        folded, report = batchnorm.fold(copy.deepcopy(net), example_inputs=(x,))
        out["folded/left"] = f"{len(report.folded)}/{len(report.skipped)}"
        with torch.no_grad():
            return float64_errors(net, x, folded(x))[0]

    def fuse():
        fused, report = batchnorm.fuse_activations(copy.deepcopy(net), example_inputs=(x,))
        out["fused"] = f"{len(report.fused)}+{len(report.residual)}/{len(report.skipped)}"
        with torch.no_grad():
            return rel_err(fused(x), net(x))

    def export():
        ours = batchnorm.convert(copy.deepcopy(net), to="batchnorm")
        program = torch.export.export(ours, (x,))
        with torch.no_grad():
            return rel_err(program.module()(x), ours(x))

    attempt("convert e/t", convert)
    if out["BN"]:
        attempt("recal", recalibrate)
    attempt("freeze", freeze)
    attempt("fold", fold)
    attempt("fuse", fuse)
    attempt("export", export)
    out["s"] = time.perf_counter() - start
    return out


COLUMNS = ["model", "BN", "max|y|", "conv", "folded/left", "fused", "convert e/t", "recal",
           "freeze", "fp32", "fold", "fuse", "export", "s"]  # fmt: skip


def cell(column: str, value) -> str:
    if value is None:
        return "-"
    if column == "s":
        return f"{value:.1f}"
    if isinstance(value, float):
        return "0" if value == 0 else f"{value:.1e}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # export's and timm's deprecation notes, per model

    errors: list[str] = []
    rows = [row(name, errors) for name in args.models]
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(cell(c, r.get(c)) for c in COLUMNS) + " |")
    revision = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    print(
        f"\ngit {revision}; torch {torch.__version__}, {args.threads} thread(s), "
        f"Python {platform.python_version()}, {platform.machine()}; batchnorm from "
        f"{Path(batchnorm.__file__).parent}"
    )
    for line in errors:
        print(line)


if __name__ == "__main__":
    main()
