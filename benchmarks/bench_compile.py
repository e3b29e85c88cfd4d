"""One conv-BN-ReLU training step, eager and under torch.compile: ours vs torch.nn.

Eager BN on a GPU is launch-bound, and our layer launches a few more small kernels than
torch's (the pure core's copies and the non-finite guard); torch.compile fuses them. Both
variants are timed interleaved in A B B A order after warm-up (compilation excluded),
median of rounds of ``--steps`` synchronized steps.

Usage: python benchmarks/bench_compile.py [--device cuda] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import batchnorm


def model(bn_cls, device):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(64, 64, 3, padding=1, bias=False), bn_cls(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), bn_cls(64), nn.ReLU(),
    ).to(device)  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.randn(args.batch, 64, args.size, args.size, device=device)
    print(f"# torch {torch.__version__}, {device}, input {tuple(x.shape)}")
    print("# command: python " + " ".join(sys.argv))
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    print("| mode | torch.nn (ms/step) | ours (ms/step) | ours / torch |")
    print("|---|---|---|---|")
    for mode in modes:
        steps = {}
        for name, cls in (("torch", nn.BatchNorm2d), ("ours", batchnorm.BatchNorm2d)):
            net = model(cls, device)
            fn = torch.compile(net) if mode == "compiled" else net

            def step(fn=fn, net=net):
                net.zero_grad(set_to_none=True)
                fn(x).sum().backward()

            for _ in range(3):  # warm-up, compilation included
                step()
            steps[name] = step
        samples = {k: [] for k in steps}
        for r in range(args.rounds):
            for k in list(steps) if r % 2 == 0 else list(steps)[::-1]:
                sync()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    steps[k]()
                sync()
                samples[k].append((time.perf_counter() - t0) / args.steps * 1e3)
        t = {k: statistics.median(v) for k, v in samples.items()}
        print(
            f"| {mode} | {t['torch']:.3f} | {t['ours']:.3f} | {t['ours'] / t['torch']:.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
