"""Speed of batchnorm.BatchNorm2d/1d against torch.nn in one process (issue 2's table).

Ours and torch's are timed interleaved in A B B A order after a warm-up. Large tensors
(memory-bound) report the minimum over single runs, since noise only ever adds time; small
ones time batches of calls and report the median batch. A plain copy of the input timed the
same way gives the memory floor: forward reads the input twice and writes once (~1.5 copies),
forward + backward about 4.

Usage: python benchmarks/bench_bn.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

import batchnorm

CASES = [  # (label, shape, channels_last)
    ("(32,64,56,56)", (32, 64, 56, 56), False),
    ("(32,64,56,56) channels_last", (32, 64, 56, 56), True),
    ("(256,1024)", (256, 1024), False),
    ("(60,100)", (60, 100), False),
]


def make_layer(kind: str, shape, backward: str = "native", device="cpu") -> torch.nn.Module:
    c = shape[1]
    if kind == "torch":
        return (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(c, device=device)
    cls = batchnorm.BatchNorm2d if len(shape) == 4 else batchnorm.BatchNorm1d
    return cls(c, backward=backward, device=device)


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


def time_interleaved(fns: dict, large: bool, rounds: int, sync=lambda: None) -> dict:
    """Time each fn in A B ... B A order; min over single calls (large) or median of batches.

    ``sync`` waits for queued device work (torch.cuda.synchronize on a GPU).
    """
    calls = 1 if large else 200
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
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            samples[k].append((time.perf_counter() - t0) / calls)
    pick = min if large else statistics.median
    return {k: pick(v) for k, v in samples.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
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
    header = (
        "| shape | pass | torch.nn (us) | ours native (us) | ratio | ours paper (us) | ratio "
        "| copy floor (us) | torch / copy |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for label, shape, channels_last in CASES:
        # On a GPU every call is short: always time batches of calls.
        large = torch.Size(shape).numel() > 1 << 20 and device.type == "cpu"
        rounds = (6 if args.quick else 24) if large else (5 if args.quick else 15)
        x = torch.randn(shape, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for mode in ("forward", "forward+backward"):
            xs = x.detach().clone().requires_grad_(mode != "forward")
            layers = {
                "torch": make_layer("torch", shape, device=device),
                "native": make_layer("ours", shape, device=device),
                "paper": make_layer("ours", shape, backward="paper", device=device),
            }
            fns = {k: step_fn(m, xs, mode) for k, m in layers.items()}
            fns["copy"] = step_fn(None, x, "copy")
            t = time_interleaved(fns, large, rounds, sync)
            us = {k: v * 1e6 for k, v in t.items()}
            print(
                f"| {label} | {mode} | {us['torch']:.1f} | {us['native']:.1f} | "
                f"{us['native'] / us['torch']:.3f} | {us['paper']:.1f} | "
                f"{us['paper'] / us['torch']:.3f} | {us['copy']:.1f} | "
                f"{us['torch'] / us['copy']:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
