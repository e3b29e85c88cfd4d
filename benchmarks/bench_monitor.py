"""Cost of `batchnorm.monitor` on a training step, against the same step unmonitored.

The step is docs/diagnose.md's worked-example net (three conv-BN-ReLU blocks and a
Linear-BN1d head, 16x16 RGB input): forward, cross-entropy, backward, SGD. Variants run in
this process, interleaved A B B A after a warm-up, each timed over rounds of `--steps` steps;
the table gives the median and minimum ms per step over the rounds and the ratio of medians.
Usage:

    .venv/bin/python benchmarks/bench_monitor.py [--batch 32] [--rounds 10] [--steps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from diagnose_example import make_net  # noqa: E402

import batchnorm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net = make_net(seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(args.batch, 3, 16, 16)
    y = torch.randint(10, (args.batch,))
    variants = {
        "no monitor": lambda: contextlib.nullcontext(),
        "monitor every=1": lambda: batchnorm.monitor(net),
        "monitor every=1, per_channel=False": lambda: batchnorm.monitor(net, per_channel=False),
        "monitor every=10": lambda: batchnorm.monitor(net, every=10),
    }

    def run(make) -> float:
        with make():
            start = time.perf_counter()
            for _ in range(args.steps):
                opt.zero_grad()
                nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
            return (time.perf_counter() - start) / args.steps * 1e3

    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for name in names:  # warm-up
        run(variants[name])
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]  # A B B A
        for name in order:
            times[name].append(run(variants[name]))
    base = statistics.median(times["no monitor"])
    print(f"torch {torch.__version__}, {platform.machine()}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, {args.rounds} rounds x {args.steps} steps")
    print("| variant | median ms/step | min ms/step | median / no monitor |")
    print("|---|---|---|---|")
    for name in names:
        med, low = statistics.median(times[name]), min(times[name])
        print(f"| {name} | {med:.2f} | {low:.2f} | {med / base:.3f} |")


if __name__ == "__main__":
    main()
