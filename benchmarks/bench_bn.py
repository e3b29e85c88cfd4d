"""Speed and dispatched operations of batchnorm.BatchNorm2d/1d against torch.nn, one process.

Timing: ours and torch's are timed interleaved in A B B A order after a warm-up. Large tensors
(memory-bound) are timed call by call, small ones in batches of 20 calls (short batches find
the quiet moments of a shared machine); the ratio is taken on the minimum over rounds (noise
only ever adds time), and on the median for comparison with older tables. A plain copy of the
input timed the same way gives the memory floor: forward reads the input twice and writes once
(~1.5 copies), forward + backward about 4.

Dispatch counts: the torch operations (aten ops reaching the dispatcher, counted by a
TorchDispatchMode) of one training forward, and of forward + backward, after a warm-up call.
Every operation our native path dispatches beyond torch.nn's has a reason:

- ``cat``: a (2C,) backup of running_mean and running_var, taken before torch's kernel
  updates them in place, so that a non-finite batch can be rolled back (the guard);
- ``max`` and ``_local_scalar_dense`` (its read-back): the guard itself, whether the new
  running variance is finite (a NaN/Inf batch must not poison the running statistics).

With ``momentum=None`` one more ``_local_scalar_dense`` reads k back for 1/k (torch reads it
too, in Python, without dispatching). Ours calls ``native_batch_norm`` directly, which is what
torch.batch_norm dispatches to on the CPU, so torch's composite layer and its ``empty`` are
not among ours: a training forward is 5 operations against torch.nn's 3. The paper path
dispatches the paper's equations as separate torch ops (statistics, normalize, the compact
backward) plus the commit step's rule.

Usage: python benchmarks/bench_bn.py [--quick] [--threads N] [--repeat R] [--only LABEL]
       [--clock wall|thread] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import batchnorm

CASES = [  # (label, shape, channels_last)
    ("(32,64,56,56)", (32, 64, 56, 56), False),
    ("(32,64,56,56) channels_last", (32, 64, 56, 56), True),
    ("(256,1024)", (256, 1024), False),
    ("(60,100)", (60, 100), False),
]
LAYERS = ("torch", "native", "paper")


def make_layer(kind: str, shape, device="cpu") -> torch.nn.Module:
    c = shape[1]
    if kind == "torch":
        return (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(c, device=device)
    cls = batchnorm.BatchNorm2d if len(shape) == 4 else batchnorm.BatchNorm1d
    return cls(c, backward=kind, device=device)


def step_fn(layer, x, mode: str):
    if mode == "copy":
        return lambda: x.clone()
    if mode == "forward":
        return lambda: layer(x)
    grad = torch.randn_like(x)

    def fwd_bwd():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    return fwd_bwd


class OpCounter(TorchDispatchMode):
    """Records the name of every aten operation dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> list[str]:
    fn()  # warm-up: first-call allocations are not the steady state
    with OpCounter() as counter:
        fn()
    return counter.ops


def extra_ops(ours: list[str], theirs: list[str]) -> str:
    """The operations ours dispatches beyond torch's (multiset difference), by name."""
    extra = collections.Counter(ours) - collections.Counter(theirs)
    return ", ".join(f"{n} x{k}" if k > 1 else n for n, k in sorted(extra.items())) or "-"


def time_interleaved(
    fns: dict, large: bool, rounds: int, sync=lambda: None, clock=time.perf_counter
) -> dict:
    """Time each fn in A B ... B A order: per round one call (large) or a batch of 20.

    Returns {name: list of per-call seconds, one per round}. ``sync`` waits for queued
    device work (torch.cuda.synchronize on a GPU).
    """
    calls = 1 if large else 20
    for fn in fns.values():
        for _ in range(3 if large else 50):
            fn()
    sync()
    samples = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            fn = fns[k]
            t0 = clock()
            for _ in range(calls):
                fn()
            sync()
            samples[k].append((clock() - t0) / calls)
    return samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--repeat", type=int, default=1, help="whole measurements per case (min over all)"
    )
    parser.add_argument("--only", default="", help="run the cases whose label contains this")
    parser.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="wall time, or this thread's CPU time (with --threads 1: immune to the waits of "
        "a shared machine, where a 2-thread kernel waits for its second thread)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        print(f"# device: {torch.cuda.get_device_name(device)}")
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cpus, {platform.processor() or platform.machine()}, "
        f"python {platform.python_version()}"
    )
    print("# command: python " + " ".join(sys.argv))
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    header = (
        "| shape | pass | torch.nn (us) | ours native (us) | ratio (min) | ratio (median) "
        "| ours paper (us) | ratio (min) | copy floor (us) | torch / copy |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    counts = []
    for label, shape, channels_last in CASES:
        if args.only not in label:
            continue
        # On a GPU every call is short: always time batches of calls.
        large = torch.Size(shape).numel() > 1 << 20 and device.type == "cpu"
        rounds = (6 if args.quick else 24) if large else (15 if args.quick else 60)
        x = torch.randn(shape, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for mode in ("forward", "forward+backward"):
            xs = x.detach().clone().requires_grad_(mode != "forward")
            layers = {k: make_layer(k, shape, device=device) for k in LAYERS}
            fns = {k: step_fn(m, xs, mode) for k, m in layers.items()}
            ops = {k: count_ops(fns[k]) for k in LAYERS}
            counts.append((label, mode, ops))
            fns["copy"] = step_fn(None, x, "copy")
            samples = {k: [] for k in fns}
            for _ in range(args.repeat):
                for k, v in time_interleaved(fns, large, rounds, sync, clock).items():
                    samples[k].extend(v)
            us = {k: min(v) * 1e6 for k, v in samples.items()}
            med = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
            print(
                f"| {label} | {mode} | {us['torch']:.1f} | {us['native']:.1f} | "
                f"{us['native'] / us['torch']:.3f} | {med['native'] / med['torch']:.3f} | "
                f"{us['paper']:.1f} | {us['paper'] / us['torch']:.3f} | {us['copy']:.1f} | "
                f"{us['torch'] / us['copy']:.2f} |"
            )
    print()
    print("# torch operations dispatched per call (training mode, after a warm-up call)")
    print("| shape | pass | torch.nn | ours native | ours paper | native beyond torch.nn |")
    print("|---|---|---|---|---|---|")
    for label, mode, ops in counts:
        print(
            f"| {label} | {mode} | {len(ops['torch'])} | {len(ops['native'])} | "
            f"{len(ops['paper'])} | {extra_ops(ops['native'], ops['torch'])} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
