"""Cost of synchronized BN statistics (Sec. 3 across processes): SyncBatchNorm vs plain BN.

Spawns W gloo ranks on 127.0.0.1, each with its own (N, C, H, W) batch, and times one
training step of a lone BN layer (forward + backward) for: our BatchNorm2d, torch.nn's, our
SyncBatchNorm, and the two collectives SyncBatchNorm adds on gloo, alone (an all_gather of
2C + 1 float64 in forward and one of 2C values in backward, per layer and step). Layers are timed
interleaved (A B C D, then D C B A) after a warm-up; each sample is the mean over a batch of steps,
started after a barrier, and the table reports rank 0's median sample. Running on the same
CPU cores, the ranks also compete with each other: that is part of the measured cost.
On a machine shared with other jobs, ``--clock cpu`` times each rank's CPU time instead of
the elapsed time (waiting for a peer costs no CPU time, spinning does).

The last line gives SyncBatchNorm's step time over plain BN's, both measured in this run.
Run it from the repository root with PYTHONPATH=. to time the working tree's package.

Usage: python benchmarks/bench_sync.py [--shape 16 64 28 28] [--world-size 2] [--threads 1]
       [--rounds 15] [--steps 10] [--quick] [--clock wall|cpu] [--stat median|min] [--local]
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

import batchnorm

ROWS = ["batchnorm.BatchNorm2d", "torch.nn.BatchNorm2d", "batchnorm.SyncBatchNorm", "collectives"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(shape) -> dict:
    """One closure per row: a full training step of the layer (or the collectives alone)."""
    c = shape[1]
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    layers = {
        "batchnorm.BatchNorm2d": batchnorm.BatchNorm2d(c),
        "torch.nn.BatchNorm2d": torch.nn.BatchNorm2d(c),
        "batchnorm.SyncBatchNorm": batchnorm.SyncBatchNorm(c),
    }

    def train_step(layer):
        def step():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(grad)

        return step

    steps = {name: train_step(layer) for name, layer in layers.items()}
    packed = torch.zeros(2 * c + 1, dtype=torch.float64)
    sums = torch.zeros(2 * c)
    world = dist.get_world_size()
    gathered = [torch.empty_like(packed) for _ in range(world)]
    gathered_sums = [torch.empty_like(sums) for _ in range(world)]

    def collectives():
        dist.all_gather(gathered, packed)
        dist.all_gather(gathered_sums, sums)

    steps["collectives"] = collectives
    return steps


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
    steps = _steps(tuple(args.shape))
    for fn in steps.values():
        for _ in range(3):
            fn()
    samples = {name: [] for name in ROWS}
    for r in range(args.rounds):
        for name in ROWS if r % 2 == 0 else ROWS[::-1]:
            dist.barrier()  # start every sample together, so no rank waits for a laggard
            t0 = clock()
            for _ in range(args.steps):
                steps[name]()
            samples[name].append((clock() - t0) / args.steps)
    if rank == 0:
        stat = statistics.median if args.stat == "median" else min
        queue.put({name: stat(v) for name, v in samples.items()})
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
    args = parser.parse_args(argv)
    if args.local:
        args.world_size = 1
    if args.quick:
        args.rounds, args.steps = 3, 3

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _worker,
        args=(_free_port(), args, queue),
        nprocs=args.world_size,
        start_method="spawn",
    )
    medians = queue.get()

    command = "python benchmarks/bench_sync.py " + " ".join(argv if argv else sys.argv[1:])
    print(f"command: {command.strip()}")
    print(
        f"batchnorm from {os.path.dirname(batchnorm.__file__)}, "
        f"torch {torch.__version__}, {platform.machine()} {platform.processor() or ''}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, git {_revision()}"
    )
    print(
        f"{args.world_size} gloo ranks on 127.0.0.1, {args.threads} thread(s) each, input "
        f"{tuple(args.shape)} per rank, float32; median of {args.rounds} samples of "
        f"{args.steps} steps (forward + backward), rank 0, {args.clock} clock, {args.stat}"
        + (", synchronized path forced on one process (--local)" if args.local else "")
    )
    base = medians["batchnorm.BatchNorm2d"]
    print()
    print("| layer | ms / step | vs batchnorm.BatchNorm2d |")
    print("|---|---:|---:|")
    for name in ROWS:
        print(f"| {name} | {medians[name] * 1e3:.3f} | {medians[name] / base:.2f}x |")
    sync = medians["batchnorm.SyncBatchNorm"]
    print()
    print(
        f"SyncBatchNorm / plain BN per step: {sync / base:.2f}x (batchnorm.BatchNorm2d), "
        f"{sync / medians['torch.nn.BatchNorm2d']:.2f}x (torch.nn.BatchNorm2d)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
