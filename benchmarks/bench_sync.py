"""Cost of synchronized BN statistics (Sec. 3 across processes): SyncBatchNorm vs plain BN.

Spawns W gloo ranks on 127.0.0.1, each with its own batch, and times training steps
(forward + backward) in three parts, all in one run:

1. A lone BN layer at the main shape (default (16, 64, 28, 28) per rank): our BatchNorm2d,
   torch.nn's, our SyncBatchNorm, the FLOOR (our BatchNorm2d plus the two exchanges
   SyncBatchNorm cannot avoid, at the same points of the step, through the same collective
   code, and nothing else: no implementation of synchronized BN can be faster than plain BN
   plus its two collectives, unless it overlaps them with compute), and the two collectives
   alone, back to back (an all_gather of 2C + 1 float64 in forward, one of 2C values in
   backward, as SyncBatchNorm makes them on gloo).
2. The same lone layer over a sweep of shapes (batch sizes at the main shape's C, H, W, then
   a few other C and H x W): plain BN, SyncBatchNorm and the floor, to see where the ratio
   crosses a target.
3. A small conv net's training step (3 blocks of 3x3 conv + BN + ReLU, pooling, a linear
   head, cross-entropy, SGD step) with our BatchNorm2d and the same net converted with
   ``SyncBatchNorm.convert_sync_batchnorm``: the cost a user sees per model step.

Rows of a part are timed interleaved (A B C, then C B A) after a warm-up; each sample is the
mean over a batch of steps, started after a barrier, and the tables give rank 0's median
sample (``--stat min``: the fastest). Running on the same CPU cores, the ranks also compete
with each other: that is part of the measured cost. On a machine shared with other jobs,
``--clock cpu`` times each rank's CPU time instead of the elapsed time (waiting for a peer
costs no CPU time, polling does), and the load average printed before and after each run
says how quiet the machine was.

Run it from the repository root with PYTHONPATH=. to time the working tree's package.

Usage: python benchmarks/bench_sync.py [--shape 16 64 28 28] [--world-size 2] [--threads 1]
       [--rounds 15] [--steps 10] [--quick] [--clock wall|cpu] [--stat median|min] [--local]
       [--sweep N,C,H,W ...] [--no-sweep] [--no-net]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import batchnorm
from batchnorm.collectives import _gather_rows

ROWS = [
    "batchnorm.BatchNorm2d",
    "torch.nn.BatchNorm2d",
    "batchnorm.SyncBatchNorm",
    "floor: BatchNorm2d + the 2 collectives",
    "the 2 collectives alone",
]
SWEEP_ROWS = ["batchnorm.BatchNorm2d", "batchnorm.SyncBatchNorm", "floor"]
NET_ROWS = ["net, batchnorm.BatchNorm2d", "net, batchnorm.SyncBatchNorm"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ExchangeInBackward(torch.autograd.Function):
    """Identity whose backward makes SyncBatchNorm's backward exchange (2C values)."""

    @staticmethod
    def forward(ctx, y, sums):
        ctx.sums = sums
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        _gather_rows(ctx.sums, None, None, "floor's backward exchange")
        return grad, None


class _Floor(nn.Module):
    """Plain BN plus SyncBatchNorm's two exchanges at the same points, and nothing else."""

    def __init__(self, c: int):
        super().__init__()
        self.bn = batchnorm.BatchNorm2d(c)
        self.packed = torch.zeros(2 * c + 1, dtype=torch.float64)  # [n, mu, M2]
        self.sums = torch.zeros(2 * c)  # [sum dl/dy, sum dl/dy * xhat]

    def forward(self, x):
        y = self.bn(x)
        _gather_rows(self.packed, None, None, "floor's forward exchange")
        return _ExchangeInBackward.apply(y, self.sums)


def _collectives(c: int):
    """SyncBatchNorm's two exchanges of a step, back to back, without the layer."""
    packed, sums = torch.zeros(2 * c + 1, dtype=torch.float64), torch.zeros(2 * c)

    def collectives():
        _gather_rows(packed, None, None, "forward exchange")
        _gather_rows(sums, None, None, "backward exchange")

    return collectives


def _layer_steps(shape, names) -> dict:
    """One closure per row: a full training step of the lone layer (or the collectives)."""
    c = shape[1]
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    build = {
        "batchnorm.BatchNorm2d": lambda: batchnorm.BatchNorm2d(c),
        "torch.nn.BatchNorm2d": lambda: torch.nn.BatchNorm2d(c),
        "batchnorm.SyncBatchNorm": lambda: batchnorm.SyncBatchNorm(c),
        "floor": lambda: _Floor(c),
    }

    def train_step(layer):
        def step():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(grad)

        return step

    steps = {}
    for name in names:
        if name == "the 2 collectives alone":
            steps[name] = _collectives(c)
        else:
            steps[name] = train_step(build["floor" if name.startswith("floor") else name]())
    return steps


def _net_steps(batch: int) -> dict:
    """A model step (forward, loss, backward, SGD) of a small conv net, plain and synced."""
    x = torch.randn(batch, 3, 32, 32)
    target = torch.randint(0, 10, (batch,))

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), batchnorm.BatchNorm2d(cout),
                nn.ReLU()]  # fmt: skip

    def net():
        torch.manual_seed(0)  # the same weights on every rank and for both rows
        return nn.Sequential(
            *block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
        )  # fmt: skip

    def train_step(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step():
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), target).backward()
            opt.step()

        return step

    plain = net()
    synced = batchnorm.SyncBatchNorm.convert_sync_batchnorm(net())
    return {NET_ROWS[0]: train_step(plain), NET_ROWS[1]: train_step(synced)}


def _time(steps: dict, args, clock) -> dict:
    """Interleaved samples of every closure; the chosen statistic per row, in seconds."""
    for fn in steps.values():
        for _ in range(3):
            fn()
    names = list(steps)
    samples = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            dist.barrier()  # start every sample together, so no rank waits for a laggard
            t0 = clock()
            for _ in range(args.steps):
                steps[name]()
            samples[name].append((clock() - t0) / args.steps)
    stat = statistics.median if args.stat == "median" else min
    return {name: stat(v) for name, v in samples.items()}


def _worker(rank, port, args, queue):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo0" if sys.platform == "darwin" else "lo"
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=args.world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    if args.local:
        # The synchronized transform on a 1-rank group: its compute, collectives that move
        # nothing. (With world size 1 the layer would take the plain path.)
        import batchnorm.distributed

        batchnorm.distributed.group_size = lambda group: 2
    torch.manual_seed(rank)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    out = {"main": _time(_layer_steps(tuple(args.shape), ROWS), args, clock), "sweep": {}}
    for shape in args.sweep:
        out["sweep"][shape] = _time(_layer_steps(shape, SWEEP_ROWS), args, clock)
    if args.net:
        out["net"] = _time(_net_steps(args.shape[0]), args, clock)
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def _revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected N,C,H,W (4 positive integers), got {text!r}")
    return shape


def _default_sweep(main: list[int]) -> list[tuple[int, ...]]:
    n, c, h, w = main
    batches = [(b, c, h, w) for b in (2, 4, 8, 32, 64) if b != n]
    others = [(n, 256, 14, 14), (n, 512, 7, 7), (n, 32, 56, 56)]
    return sorted(batches, key=lambda s: s[0]) + others


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[16, 64, 28, 28], help="per rank")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--rounds", type=int, default=15, help="samples per row")
    parser.add_argument("--steps", type=int, default=10, help="steps per sample")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 3 steps (smoke run)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: the rank's CPU time (all its threads, gloo's "
        "included), which time-slicing on a loaded machine does not inflate",
    )
    parser.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="per row, the median sample or the fastest (min is steadier on a loaded machine)",
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help="one process, SyncBatchNorm's synchronized path forced on: its compute alone",
    )
    parser.add_argument(
        "--sweep",
        type=_shape,
        nargs="*",
        default=None,
        metavar="N,C,H,W",
        help="shapes (per rank) for the sweep table; default: batch sizes 2-64 at the main "
        "shape's C, H, W, then C x HxW of 256 x 14x14, 512 x 7x7, 32 x 56x56",
    )
    parser.add_argument("--no-sweep", action="store_true", help="skip the sweep table")
    parser.add_argument("--no-net", action="store_true", help="skip the conv-net step")
    args = parser.parse_args(argv)
    if args.local:
        args.world_size = 1
    if args.quick:
        args.rounds, args.steps = 3, 3
    if args.no_sweep:
        args.sweep = []
    elif args.sweep is None:
        args.sweep = _default_sweep(args.shape)
    args.net = not args.no_net

    load_before = os.getloadavg()[0]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _worker,
        args=(_free_port(), args, queue),
        nprocs=args.world_size,
        start_method="spawn",
    )
    out = queue.get()

    command = "python benchmarks/bench_sync.py " + " ".join(argv if argv else sys.argv[1:])
    print(f"command: {command.strip()}")
    print(
        f"batchnorm from {os.path.dirname(batchnorm.__file__)}, "
        f"torch {torch.__version__}, {platform.machine()} {platform.processor() or ''}, "
        f"{os.cpu_count()} CPUs, load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after, git {_revision()}"
    )
    print(
        f"{args.world_size} gloo ranks on 127.0.0.1, {args.threads} thread(s) each, float32; "
        f"{args.stat} of {args.rounds} samples of {args.steps} training steps (forward + "
        f"backward), rank 0, {args.clock} clock"
        + (", synchronized path forced on one process (--local)" if args.local else "")
    )
    main_rows = out["main"]
    base = main_rows["batchnorm.BatchNorm2d"]
    print()
    print(f"Lone BN layer, input {tuple(args.shape)} per rank:")
    print()
    print("| row | ms / step | vs batchnorm.BatchNorm2d |")
    print("|---|---:|---:|")
    for name in ROWS:
        print(f"| {name} | {main_rows[name] * 1e3:.3f} | {main_rows[name] / base:.2f}x |")
    if out["sweep"]:
        print()
        print("Lone BN layer over shapes (per rank):")
        print()
        print("| shape | BatchNorm2d ms | SyncBatchNorm ms | Sync / plain | floor / plain |")
        print("|---|---:|---:|---:|---:|")
        rows = dict(out["sweep"])
        rows[tuple(args.shape)] = {
            "batchnorm.BatchNorm2d": base,
            "batchnorm.SyncBatchNorm": main_rows["batchnorm.SyncBatchNorm"],
            "floor": main_rows[ROWS[3]],
        }
        for shape in sorted(rows, key=lambda s: (s[1], s[2], s[0])):
            r = rows[shape]
            plain, sync = r["batchnorm.BatchNorm2d"], r["batchnorm.SyncBatchNorm"]
            print(
                f"| {shape} | {plain * 1e3:.3f} | {sync * 1e3:.3f} | {sync / plain:.2f}x | "
                f"{r['floor'] / plain:.2f}x |"
            )
    if "net" in out:
        plain, sync = (out["net"][name] for name in NET_ROWS)
        print()
        print(
            f"Conv net step (3 x conv3x3+BN+ReLU, 32-64-128 channels, input "
            f"({args.shape[0]}, 3, 32, 32) per rank, cross-entropy, SGD): "
            f"BatchNorm2d {plain * 1e3:.2f} ms, SyncBatchNorm {sync * 1e3:.2f} ms, "
            f"{sync / plain:.2f}x"
        )
    sync = main_rows["batchnorm.SyncBatchNorm"]
    print()
    print(
        f"floor (plain BN + the 2 collectives) / plain BN: {main_rows[ROWS[3]] / base:.2f}x; "
        f"SyncBatchNorm / floor: {sync / main_rows[ROWS[3]]:.2f}x"
    )
    print(
        f"SyncBatchNorm / plain BN per step (lone layer {tuple(args.shape)}): "
        f"{sync / base:.2f}x (batchnorm.BatchNorm2d), "
        f"{sync / main_rows['torch.nn.BatchNorm2d']:.2f}x (torch.nn.BatchNorm2d)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
