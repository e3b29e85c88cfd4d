"""BN-Inception training throughput (Sec. 4.2): our BatchNorm2d vs torch.nn.BatchNorm2d.

Two copies of the same network (same initial weights), one with `batchnorm.BatchNorm2d` and
one with `torch.nn.BatchNorm2d`, take full training steps (forward, cross-entropy, backward,
momentum SGD) on the same random batch, interleaved in A B B A order after a warm-up, so
drift in machine load hits both alike. Reported: images/s per round (median and min/max over
rounds) and the ratio ours/torch. On CUDA every timed region ends with
torch.cuda.synchronize(), since kernels run asynchronously.

Usage:
    python benchmarks/bench_inception.py                      # CPU: reduced input, see flags
    python benchmarks/bench_inception.py --device cuda        # full 224, batch 32
    python benchmarks/bench_inception.py --device cuda --channels-last --amp
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import batchnorm
from batchnorm.reproduce import provenance
from batchnorm.reproduce.models.inception import build_inception, parameter_count


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make(bn_layer, args, device):
    torch.manual_seed(0)  # identical initial weights for both BN implementations
    model = build_inception(
        "bn_inception", num_classes=args.classes, width=args.width, bn_layer=bn_layer
    ).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.045, momentum=0.9, weight_decay=4e-5)
    return model, optimizer


def step(model, optimizer, x, y, amp: bool, device):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_steps(model, optimizer, x, y, steps, amp, device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(model, optimizer, x, y, amp, device)
    _sync(device)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32, help="per-replica batch of the paper")
    p.add_argument("--size", type=int, default=None, help="input side (224 on CUDA, 96 on CPU)")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=None, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=4, help="A B B A rounds (x2 timings each)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its algorithms
    size = args.size or (224 if cuda else 96)
    steps = args.steps or (20 if cuda else 2)
    x = torch.randn(args.batch, 3, size, size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    impls = {
        "ours": make(batchnorm.BatchNorm2d, args, device),
        "torch": make(torch.nn.BatchNorm2d, args, device),
    }
    for model, optimizer in impls.values():
        time_steps(model, optimizer, x, y, args.warmup, args.amp, device)
    rates: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(args.rounds):
        for name in ("ours", "torch", "torch", "ours"):
            seconds = time_steps(*impls[name], x, y, steps, args.amp, device)
            rates[name].append(steps * args.batch / seconds)
    summary = {
        name: {
            "images_per_s_median": statistics.median(r),
            "min": min(r),
            "max": max(r),
            "rounds": len(r),
        }
        for name, r in rates.items()
    }
    ratio = summary["ours"]["images_per_s_median"] / summary["torch"]["images_per_s_median"]
    setup = {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "git": provenance.git_state(),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "input": size,
        "width": args.width,
        "parameters": parameter_count(impls["ours"][0]),
        "steps_per_round": steps,
        "channels_last": args.channels_last,
        "amp_bf16": args.amp,
    }
    print(json.dumps(setup))
    for name, s in summary.items():
        print(
            f"{name:>6}: {s['images_per_s_median']:8.1f} images/s (median of {s['rounds']}, "
            f"min {s['min']:.1f}, max {s['max']:.1f})"
        )
    print(f"ours/torch throughput: {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "results": summary, "ratio": ratio}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
