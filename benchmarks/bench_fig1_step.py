"""Per-step time of the Figure 1 training loop (Sec. 4.1) against the idiomatic eager loop.

The reference is what one would write first: nn.Sequential with torch.nn.BatchNorm1d,
torch.optim.SGD, cross-entropy, the training set preloaded as one tensor and indexed per
step. Ours is `batchnorm reproduce fig1`'s loop: `StackedMLP.sgd_step` (hand-fused forward and
backward around `batchnorm.functional.batch_norm`, one foreach SGD update). Both run in this
process on random data of MNIST's shape, interleaved A B B A, each timed over batches of
steps; the table gives the median ms/step and ratios. Usage:

    .venv/bin/python benchmarks/bench_fig1_step.py [--threads N] [--rounds 10] [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

from batchnorm.models.mlp import MLP, SIZES, StackedMLP

N_TRAIN, BATCH, LR = 60_000, 60, 0.5


def idiomatic(bn: bool, x_train, y_train):
    layers: list[nn.Module] = []
    for i, o in zip(SIZES[:-2], SIZES[1:-1]):
        layers += [nn.Linear(i, o, bias=not bn), *([nn.BatchNorm1d(o)] if bn else []),
                   nn.Sigmoid()]
    net = nn.Sequential(*layers, nn.Linear(SIZES[-2], SIZES[-1]))
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        idx = torch.randint(N_TRAIN, (BATCH,))
        opt.zero_grad()
        loss_fn(net(x_train[idx]), y_train[idx]).backward()
        opt.step()
    return step


def ours(kinds: tuple[bool, ...], x_train, onehot):
    nets = [StackedMLP.from_modules([MLP(bn)]) for bn in kinds]

    def step():
        idx = torch.randint(N_TRAIN, (BATCH,))
        x = x_train.index_select(0, idx).view(1, BATCH, -1)
        y = onehot.index_select(0, idx).view(1, BATCH, -1)
        for net in nets:
            net.sgd_step(x, y, LR)
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--rounds", type=int, default=10, help="A B B A rounds")
    parser.add_argument("--steps", type=int, default=200, help="steps per timed batch")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x_train = torch.rand(N_TRAIN, SIZES[0])
    y_train = torch.randint(10, (N_TRAIN,))
    onehot = nn.functional.one_hot(y_train, 10).float()
    pairs = {  # name -> (ours, reference)
        "BN net": (ours((True,), x_train, onehot), idiomatic(True, x_train, y_train)),
        "baseline net": (ours((False,), x_train, onehot), idiomatic(False, x_train, y_train)),
    }
    times: dict[str, list[float]] = {}
    for name, fns in pairs.items():
        for fn in fns:
            for _ in range(50):  # warm-up
                fn()
        for r in range(args.rounds):
            for label, fn in zip(("ours", "eager") if r % 2 == 0 else ("eager", "ours"),
                                 fns if r % 2 == 0 else fns[::-1]):
                tick = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times.setdefault(f"{name}|{label}", []).append(
                    (time.perf_counter() - tick) / args.steps * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"# Figure 1 training step, median of {args.rounds} batches of {args.steps} steps")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("command: .venv/bin/python " + " ".join(sys.argv))
    print()
    print("| net | idiomatic eager ms/step | ours ms/step | speed-up |")
    print("|---|---|---|---|")
    for name in pairs:
        e, o = med[f"{name}|eager"], med[f"{name}|ours"]
        print(f"| {name} | {e:.3f} | {o:.3f} | {e / o:.2f}x |")
    e = med["BN net|eager"] + med["baseline net|eager"]
    o = med["BN net|ours"] + med["baseline net|ours"]
    print(f"| both nets (one Figure 1 step) | {e:.3f} | {o:.3f} | {e / o:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
