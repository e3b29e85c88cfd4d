"""Sweep of Figure 1's unstated settings (SGD learning rate, init std) against Figure 1(a).

Every setting trains both nets from the same seed-0 weights (scaled by the init std) on the
same batches, all settings at once in one `StackedMLP` per net, and is scored by the largest
distance to the paper's curve from 10K steps on. Usage:

    .venv/bin/python scripts/sweep_fig1.py --steps 50000 --out results/fig1_sweep/fig1_sweep_d

writes <out>.json (every curve) and <out>.md (the ranked table).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from batchnorm.reproduce.fig1 import _load_data, initial_models
from batchnorm.reproduce.fig1_config import NETS, Fig1Config
from batchnorm.reproduce.fig1_report import PAPER_ACCURACY
from batchnorm.reproduce.models.mlp import StackedMLP
from batchnorm.reproduce.provenance import provenance
from batchnorm.reproduce.train import epoch_permutation, set_threads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5])
    parser.add_argument("--stds", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--eval-every", type=int, default=2500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/fig1_sweep/fig1_sweep")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    base = Fig1Config(seed=args.seed)
    x_train, onehot, x_test, y_test, source = _load_data(base)
    grid = list(itertools.product(args.lrs, args.stds))
    models = [initial_models(dataclasses.replace(base, init_std=std), args.seed)
              for _, std in grid]
    nets = {name: StackedMLP.from_modules([m[name] for m in models]) for name in NETS}
    lr = torch.tensor([lr for lr, _ in grid]).view(-1, 1, 1)  # one learning rate per model
    s, b, n = len(grid), base.batch_size, len(x_train)
    per_epoch = n // b
    curves = {name: [[] for _ in grid] for name in NETS}
    tick = time.perf_counter()
    order = None
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            for name, net in nets.items():
                acc = (net.evaluate(x_test)[0].argmax(-1) == y_test).double().mean(-1)
                for k in range(s):
                    curves[name][k].append([step, acc[k].item()])
            print(f"step {step}: " + "  ".join(
                f"lr {g[0]} std {g[1]}: {curves['baseline'][k][-1][1]:.3f}/"
                f"{curves['bn'][k][-1][1]:.3f}" for k, g in enumerate(grid)), flush=True)
        if step == args.steps:
            break
        if step % per_epoch == 0:  # the same batch order as `batchnorm reproduce fig1`
            order = epoch_permutation(args.seed, step // per_epoch, n)
        idx = order[(step % per_epoch) * b:(step % per_epoch + 1) * b]
        x = x_train.index_select(0, idx).expand(s, b, -1)
        y = onehot.index_select(0, idx).expand(s, b, -1)
        for net in nets.values():
            net.sgd_step(x, y, lr)
    seconds = time.perf_counter() - tick

    rows = []
    for k, (lr_k, std) in enumerate(grid):
        acc = {name: dict((int(st), a) for st, a in curves[name][k]) for name in NETS}
        gaps = [abs(acc[name][st] - PAPER_ACCURACY[st][j])
                for st in PAPER_ACCURACY if 10000 <= st <= args.steps and st in acc["bn"]
                for j, name in enumerate(NETS)]
        bn_late = min((a for st, a in acc["bn"].items() if st >= 5000), default=float("nan"))
        rows.append({"lr": lr_k, "init_std": std, "max_gap_from_10k": max(gaps, default=None),
                     "bn_min_from_5k": bn_late,
                     "at_paper_steps": {str(st): [acc["baseline"].get(st), acc["bn"].get(st)]
                                        for st in PAPER_ACCURACY}})
    rows.sort(key=lambda r: (r["max_gap_from_10k"] is None, r["max_gap_from_10k"]))
    record = {**provenance(),  # versions, machine, git revision, command
              "seed": args.seed, "steps": args.steps, "batch_size": b, "optimizer": "plain SGD",
              "threads": args.threads, "data": source, "seconds": round(seconds, 1),
              "ranked": rows, "curves": {name: {f"lr={g[0]},std={g[1]}": curves[name][k]
                                                for k, g in enumerate(grid)} for name in NETS}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    steps = [st for st in PAPER_ACCURACY if st <= args.steps]
    lines = [f"# Figure 1 sweep: plain SGD, batch {b}, seed {args.seed}, {args.steps:,} steps",
             "", f"Command: `{' '.join(record['command'])}` ({seconds:.0f} s, "
             f"torch {torch.__version__}, "
             f"{args.threads} thread(s)). Cells: test accuracy without BN / with BN; paper first.",
             "", "| lr | init std | max gap from 10K | BN min from 5K | "
             + " | ".join(f"{st / 1000:g}K" for st in steps) + " |",
             "|---|---|---|---|" + "---|" * len(steps),
             "| paper | | | | " + " | ".join(
                 f"{PAPER_ACCURACY[st][0]:.3f} / {PAPER_ACCURACY[st][1]:.3f}" for st in steps)
             + " |"]
    for r in rows:
        cells = [f"{a:.3f} / {c:.3f}" for a, c in (r["at_paper_steps"][str(st)] for st in steps)]
        gap = r["max_gap_from_10k"]
        lines.append(f"| {r['lr']} | {r['init_std']} | {'-' if gap is None else f'{gap:.4f}'} | "
                     f"{r['bn_min_from_5k']:.3f} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
