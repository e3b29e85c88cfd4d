"""Per-step time of the Figure 1 training loop (Sec. 4.1) against the idiomatic eager loop.

The reference is what one would write first: nn.Sequential with torch.nn.BatchNorm1d,
torch.optim.SGD, cross-entropy, the training set preloaded as one tensor and indexed per
step. Ours is `batchnorm reproduce fig1`'s loop: `StackedMLP.sgd_step` (hand-fused forward and
backward around `batchnorm.functional.batch_norm`, one foreach SGD update), both nets one
after the other, or in two threads (``parallel_nets``). All run in this process on random
data of MNIST's shape, interleaved A B B A, each timed over batches of steps; the table gives
the median ms per step. The floor is the arithmetic every loop must do: the first layer's
x @ W1 and x^T @ dl/da1 (the other layers are 8x smaller). Usage:

    .venv/bin/python benchmarks/bench_fig1_step.py [--threads N] [--rounds 10] [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from batchnorm.reproduce import provenance
from batchnorm.reproduce.models.mlp import MLP, SIZES, StackedMLP

N_TRAIN, BATCH, LR = 60_000, 60, 0.5
SEEDS = 3  # `--seeds 3`: one StackedMLP per net trains all three


def idiomatic(bn: bool, x_train, y_train):
    layers: list[nn.Module] = []
    for i, o in zip(SIZES[:-2], SIZES[1:-1]):
        layers += [nn.Linear(i, o, bias=not bn), *([nn.BatchNorm1d(o)] if bn else []),
                   nn.Sigmoid()]
    net = nn.Sequential(*layers, nn.Linear(SIZES[-2], SIZES[-1]))
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()

    def steps(k: int) -> None:
        for _ in range(k):
            idx = torch.randint(N_TRAIN, (BATCH,))
            opt.zero_grad()
            loss_fn(net(x_train[idx]), y_train[idx]).backward()
            opt.step()
    return steps


def ours(bn: bool, x_train, onehot, seeds: int = 1):
    net = StackedMLP.from_modules([MLP(bn) for _ in range(seeds)])

    def steps(k: int) -> None:
        for _ in range(k):
            idx = torch.randint(N_TRAIN, (seeds * BATCH,))
            x = x_train.index_select(0, idx).view(seeds, BATCH, -1)
            y = onehot.index_select(0, idx).view(seeds, BATCH, -1)
            net.sgd_step(x, y, LR)
    return steps


def floor(x_train):
    w, d = torch.randn(SIZES[0], SIZES[1]), torch.randn(BATCH, SIZES[1])

    def steps(k: int) -> None:
        for _ in range(k):
            x = x_train[:BATCH]
            torch.mm(x, w)
            torch.mm(x.t(), d)
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--rounds", type=int, default=10, help="A B B A rounds")
    parser.add_argument("--steps", type=int, default=200, help="steps per timed batch")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    x_train = torch.rand(N_TRAIN, SIZES[0])
    y_train = torch.randint(10, (N_TRAIN,))
    onehot = nn.functional.one_hot(y_train, 10).float()
    eager = {bn: idiomatic(bn, x_train, y_train) for bn in (True, False)}
    fast = {bn: ours(bn, x_train, onehot) for bn in (True, False)}
    stacked = {bn: ours(bn, x_train, onehot, SEEDS) for bn in (True, False)}
    pool = ThreadPoolExecutor(max_workers=2)

    def two_threads(fns):  # as fig1 with parallel_nets: one torch thread per net
        def steps(k: int) -> None:
            torch.set_num_threads(1)
            for job in [pool.submit(fns[bn], k) for bn in (True, False)]:
                job.result()
            torch.set_num_threads(threads)
        return steps

    fns = {
        "eager BN": eager[True], "ours BN": fast[True],
        "eager baseline": eager[False], "ours baseline": fast[False],
        "ours both, two threads": two_threads(fast), "floor": floor(x_train),
        "ours both, seeds stacked, two threads": two_threads(stacked),
    }
    for fn in fns.values():
        fn(50)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(args.rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            tick = time.perf_counter()
            fns[name](args.steps)
            times[name].append((time.perf_counter() - tick) / args.steps * 1e3)
    pool.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"# Figure 1 training step: median ms/step over {args.rounds} batches of "
          f"{args.steps} steps")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{threads} torch threads")
    git = provenance.git_state()
    print(f"git {git['revision']}{' (dirty)' if git['dirty'] else ''}; "
          "command: .venv/bin/python " + " ".join(sys.argv))
    print()
    print("| what | idiomatic eager | ours | speed-up |")
    print("|---|---|---|---|")
    for name, e, o in (("BN net", med["eager BN"], med["ours BN"]),
                       ("baseline net", med["eager baseline"], med["ours baseline"])):
        print(f"| {name} | {e:.3f} | {o:.3f} | {e / o:.2f}x |")
    both_eager = med["eager BN"] + med["eager baseline"]
    both = med["ours BN"] + med["ours baseline"]
    print(f"| both nets, one after the other | {both_eager:.3f} | {both:.3f} | "
          f"{both_eager / both:.2f}x |")
    par = med["ours both, two threads"]
    print(f"| both nets, two threads (parallel_nets) | {both_eager:.3f} | {par:.3f} | "
          f"{both_eager / par:.2f}x |")
    per_seed = med["ours both, seeds stacked, two threads"] / SEEDS
    print(f"| both nets, {SEEDS} seeds stacked, two threads, per seed | {both_eager:.3f} | "
          f"{per_seed:.3f} | {both_eager / per_seed:.2f}x |")
    print(f"| floor: first-layer matmuls of one net | | {med['floor']:.3f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
