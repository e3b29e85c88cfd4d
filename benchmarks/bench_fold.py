"""Eval-mode inference time of a ResNet-18-style net, BN folded vs not (Alg. 2, step 3; issue 5).

Three variants of one network with the same weights and statistics, timed interleaved in one
process (A B C C B A ... after a warm-up) so drifting load on a shared machine hits each
alike: our BatchNorm2d in eval mode, torch.nn.BatchNorm2d in eval mode, and `fold`ed (every BN
merged into the preceding conv). Reported per variant: the minimum of the single-forward times
(noise only ever adds time; method in docs/speed.md) and the median, each with its ratio.

The net is ResNet-18's layout (BasicBlocks [2, 2, 2, 2], widths 64-512) with the CIFAR stem
(one 3x3 conv, no max-pool), so 32x32 inputs are meaningful and a run stays short.

With ``--model bn_inception`` the same comparison runs on Sec. 4.2's BN-Inception (69 BN
layers) at 224x224, about 4x the multiply-adds of the default; not run for the README here.

Usage: python benchmarks/bench_fold.py [--model resnet18|bn_inception] [--batch 32]
       [--size 32] [--reps 12] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import batchnorm


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU, conv3x3-BN, + identity (or a 1x1 conv-BN projection), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = batchnorm.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = batchnorm.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), batchnorm.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


def resnet18(num_classes: int = 10, width: int = 64) -> nn.Sequential:
    """ResNet-18 (He et al. 2016) with a CIFAR stem; 20 BN layers, all foldable."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        batchnorm.BatchNorm2d(width),
        nn.ReLU(),
    ]
    cin = width
    for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
        stride = 1 if i == 0 else 2
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def randomize_stats(model: nn.Module) -> nn.Module:
    """Non-trivial statistics and gamma/beta, as after training (identity BN would flatter)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--model",
        choices=["resnet18", "bn_inception"],
        default="resnet18",
        help="bn_inception: Sec. 4.2's network (reproduce.models.inception), ImageNet stem",
    )
    parser.add_argument("--size", type=int, default=None, help="input H = W (32; 224)")
    parser.add_argument("--reps", type=int, default=12, help="timed rounds per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.model == "bn_inception":
        from batchnorm.reproduce.models.inception import build_inception

        def build():
            return build_inception("bn_inception")

        args.size = args.size or 224
        label = "BN-Inception (Sec. 4.2)"
    else:
        build, label = resnet18, "ResNet-18-style"
        args.size = args.size or 32
    ours = randomize_stats(build()).eval()
    torch_bn = batchnorm.convert(build(), to="torch").eval()
    torch_bn.load_state_dict(ours.state_dict())
    folded, report = batchnorm.fold(ours)
    x = torch.randn(args.batch, 3, args.size, args.size)

    variants = {"ours (BN, eval)": ours, "torch.nn (BN, eval)": torch_bn, "folded": folded}
    with torch.inference_mode():
        ref = ours(x)
        errs = {k: ((m(x) - ref).abs().max() / ref.abs().max()).item() for k, m in variants.items()}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(2):  # warm-up: allocator, oneDNN primitive caches
            for m in variants.values():
                m(x)
        order = list(variants)
        for r in range(args.reps):
            for k in order if r % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                variants[k](x)
                times[k].append(time.perf_counter() - t0)

    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, python "
        f"{platform.python_version()}, {platform.machine()} {platform.processor() or ''}".rstrip()
    )
    print(f"git {git_revision()}; {len(report.folded)} BN folded, {len(report.skipped)} left")
    print(
        f"{label}, input ({args.batch}, 3, {args.size}, {args.size}), eval mode, "
        f"{args.reps} interleaved forwards per variant\n"
    )
    base = "ours (BN, eval)"
    print("| variant | min ms | min vs ours | median ms | median vs ours | max rel. err. |")
    print("|---|---|---|---|---|---|")
    for k in variants:
        print(
            f"| {k} | {best[k] * 1e3:.0f} | {best[k] / best[base]:.3f} | {med[k] * 1e3:.0f} "
            f"| {med[k] / med[base]:.3f} | {errs[k]:.1e} |"
        )


if __name__ == "__main__":
    main()
