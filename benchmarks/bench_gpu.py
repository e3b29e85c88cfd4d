"""One GPU, one run, every figure of issue 9: torch.nn vs ours, written to results/gpu/<card>.md.

Sections (each timed interleaved, implementations in rotating order after a warm-up):
  layer      one BN layer per shape/layout/dtype: eager wall time per call (host + GPU, many
             calls between synchronizations) and GPU kernel time per call (torch.profiler,
             sum of device kernels), forward and forward+backward; torch.nn, our layer as
             it is, and our Triton kernels.
  pairs      BN+ReLU and BN+add+ReLU: torch.nn's BatchNorm2d + ReLU(inplace) (+ add) vs the
             fused kernel (act(BN(x) + residual) in one layer).
  memory     peak memory of a BN-Inception training step (batch 128, bfloat16 autocast,
             channels_last): torch with ReLU and with LeakyReLU(0.01), the fused kernels, and
             the fused kernels with memory saving (In-Place ABN needs an invertible
             activation, so that model uses LeakyReLU(0.01), like the paper of In-Place ABN).
  inception  BN-Inception training throughput at batch 32 (float32) and 128 (bfloat16
             autocast, channels_last), eager and under torch.compile.
  sync       SyncBatchNorm smoke run: a world of one over NCCL (gloo on the CPU).

"ours" is our layer as it is (``backend="auto"``): the torch path, unless this card's compute
capability is in ``batchnorm.dispatch.MEASURED`` (this script's report, with gpu_check.py's,
is what puts it there). "ours triton" forces ``backend="triton"``; the fused rows use
``BatchNormAct2d`` and `batchnorm.fuse_activations`.

Usage:
    python benchmarks/bench_gpu.py                # on a CUDA machine, about 6-8 minutes
    python benchmarks/bench_gpu.py --dry-run      # anywhere: print the plan, run nothing
    python benchmarks/bench_gpu.py --smoke        # CPU, Triton interpreter, tiny sizes:
                                                  # runs every section to check the script
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import os
import platform
import re
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm.swap import rebuild

GOALS = """\
| goal (issue 9) | threshold |
|---|---|
| one BN layer, eager, forward+backward wall time, ours / torch | <= 1.05 on every row |
| fused BN+ReLU vs BatchNorm2d+ReLU, GPU kernel time fwd+bwd, bf16 channels_last | <= 0.8 |
| BN-Inception throughput, plain BN layers, ours / torch | >= 1.0 |
| BN-Inception throughput, batch 128 bf16 channels_last, fused, ours / torch | >= 1.05 |
| memory saving: peak memory of the batch-128 step, ours / torch | <= 0.75 |
| compiled BN-Inception step time, ours / torch | <= 1.05 |
"""


@dataclass(frozen=True)
class Plan:
    """What one run measures; FULL on a GPU, SMOKE on the CPU under the interpreter."""

    device: str
    # (label, shape, channels_last, dtype) of the single-layer rows
    layers: tuple = ()
    # (label, shape, channels_last, dtype) of the BN+ReLU / BN+add+ReLU rows
    pairs: tuple = ()
    # (label, batch, input size, bfloat16 autocast, channels_last) of the throughput rows
    inception: tuple = ()
    memory: tuple = (128, 224)  # (batch, input size) of the peak-memory step
    width: float = 1.0  # BN-Inception width multiplier
    classes: int = 1000
    calls: int = 100  # calls between two synchronizations (wall time)
    rounds: int = 5  # interleaved rounds; the median is reported
    profile_iters: int = 20
    steps: int = 10  # training steps per timed round
    warmup: int = 2  # untimed calls (training steps) before timing; compilation happens here
    compile: bool = True
    budget_s: float = 450.0  # sections that would start later are skipped
    sections: tuple = ("layer", "pairs", "memory", "inception", "sync")


F32, BF16 = torch.float32, torch.bfloat16
FULL = Plan(
    device="cuda",
    layers=(
        ("(32,64,56,56)", (32, 64, 56, 56), False, F32),
        ("(32,64,56,56) channels_last", (32, 64, 56, 56), True, F32),
        ("(32,64,56,56) channels_last bf16", (32, 64, 56, 56), True, BF16),
        ("(128,256,28,28) channels_last bf16", (128, 256, 28, 28), True, BF16),
        ("(32,1024,7,7)", (32, 1024, 7, 7), False, F32),
        ("(256,1024)", (256, 1024), False, F32),
        ("(60,100)", (60, 100), False, F32),
    ),
    pairs=(
        ("(32,64,56,56) channels_last bf16", (32, 64, 56, 56), True, BF16),
        ("(128,256,28,28) channels_last bf16", (128, 256, 28, 28), True, BF16),
        ("(32,64,56,56) float32", (32, 64, 56, 56), False, F32),
    ),
    inception=(
        ("batch 32 float32", 32, 224, False, False),
        ("batch 128 bf16 channels_last", 128, 224, True, True),
    ),
)
SMOKE = Plan(
    device="cpu",
    layers=(("(4,3,5,5)", (4, 3, 5, 5), False, F32), ("(6,5) bf16", (6, 5), False, BF16)),
    pairs=(("(4,3,5,5) channels_last", (4, 3, 5, 5), True, F32),),
    inception=(("batch 2 bf16 channels_last", 2, 32, True, True),),
    memory=(2, 32),
    width=0.125,
    classes=10,
    calls=1,
    rounds=1,
    profile_iters=1,
    steps=1,
    warmup=0,
    compile=False,
    budget_s=float("inf"),
)


def triton_layer(bn: nn.Module, **settings) -> nn.Module:
    """Our layer (``BatchNormAct2d`` where an ``activation`` is given) with a copy of ``bn``'s
    configuration and state, on the Triton kernels (``backend="triton"``)."""
    fused = "activation" in settings
    if isinstance(bn, nn.BatchNorm1d):
        cls = batchnorm.BatchNormAct1d if fused else batchnorm.BatchNorm1d
    else:
        cls = batchnorm.BatchNormAct2d if fused else batchnorm.BatchNorm2d
    return rebuild(copy.deepcopy(bn), cls, backend="triton", **settings)


def kernel_model(model: nn.Module, fuse: bool, memory_saving=False) -> nn.Module:
    """Our layers on the kernels in place of torch's (`batchnorm.convert`, then
    ``backend="triton"``); with ``fuse``, each BN -> ReLU/LeakyReLU pair becomes one fused
    layer (`batchnorm.fuse_activations`; memory saving for LeakyReLU pairs if asked)."""
    model = batchnorm.convert(model, to="batchnorm")
    if fuse:
        model, _ = batchnorm.fuse_activations(model, memory_saving=memory_saving)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.backend = "triton"
    return model


def leaky(model: nn.Module) -> nn.Module:
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for name, m in seq._modules.items():
            if isinstance(m, nn.ReLU):
                seq._modules[name] = nn.LeakyReLU(0.01, inplace=True)
    return model


@dataclass
class Report:
    plan: Plan
    lines: list = field(default_factory=list)
    goals: list = field(default_factory=list)  # (goal, value, threshold text, met)
    start: float = field(default_factory=time.perf_counter)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.start > self.plan.budget_s

    def table(self, header, rows):
        self.lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]

    def goal(self, what, value, threshold, met):
        self.goals.append((what, f"{value:.3f}", threshold, "yes" if met else "NO"))


def timer(plan: Plan):
    cuda = plan.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def wall(fns: dict, calls: int | None = None) -> dict:
        """Seconds per call: median over rounds of ``calls`` calls between synchronizations,
        implementations in rotating order so drift hits all alike."""
        calls = calls or plan.calls
        for fn in fns.values():
            for _ in range(plan.warmup):
                fn()
        samples = {k: [] for k in fns}
        names = list(fns)
        for r in range(plan.rounds):
            for k in names[r % len(names) :] + names[: r % len(names)]:
                sync()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fns[k]()
                sync()
                samples[k].append((time.perf_counter() - t0) / calls)
        return {k: statistics.median(v) for k, v in samples.items()}

    def kernels(fn) -> float | None:
        """GPU kernel time per call in seconds (sum of the device's kernel durations)."""
        if not cuda:
            return None
        fn()
        sync()
        acts = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(plan.profile_iters):
                fn()
            sync()
        device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return sum(e.device_time_total for e in device) * 1e-6 / plan.profile_iters

    return wall, kernels, sync


def us(t):
    return "n/a" if t is None else f"{t * 1e6:.1f}"


def ratio(a, b):
    return None if a is None or b is None else a / b


def fmt(r):
    return "n/a" if r is None else f"{r:.3f}"


def call(module, x, backward, residual=None, grad=None):
    def fwd():
        with torch.no_grad():
            module(x) if residual is None else module(x, residual)

    def fwd_bwd():
        x.grad = None
        out = module(x) if residual is None else module(x, residual)
        out.backward(grad)

    return fwd_bwd if backward else fwd


def section_layer(plan, report, wall, kernels):
    rows = []
    worst = {"ours": 0.0, "ours triton": 0.0}
    for label, shape, channels_last, dtype in plan.layers:
        c = shape[1]
        torch_cls = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d
        ours_cls = batchnorm.BatchNorm2d if len(shape) == 4 else batchnorm.BatchNorm1d
        layers = {"torch": torch_cls(c), "ours": ours_cls(c)}
        layers["ours triton"] = triton_layer(layers["torch"])
        x = torch.randn(shape, device=plan.device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.randn_like(x)
        for mode in ("forward", "forward+backward"):
            xs = x.detach().clone().requires_grad_(mode != "forward")
            fns = {
                k: call(m.to(plan.device), xs, mode != "forward", grad=grad)
                for k, m in layers.items()
            }
            t = wall(fns)
            k = {name: kernels(fn) for name, fn in fns.items()}
            rows.append(
                [label, mode]
                + [us(t[n]) for n in fns]
                + [fmt(ratio(t["ours"], t["torch"])), fmt(ratio(t["ours triton"], t["torch"]))]
                + [us(k[n]) for n in fns]
                + [fmt(ratio(k["ours triton"], k["torch"]))]
            )
            if mode != "forward":
                for name in worst:
                    worst[name] = max(worst[name], t[name] / t["torch"])
    report.lines += [
        "",
        "## One BN layer (eager)",
        "",
        "Wall: microseconds per call, calls queued back to back between "
        "synchronizations (host + GPU). Kernels: GPU kernel time per call.",
    ]
    report.table(
        [
            "shape",
            "pass",
            "torch wall",
            "ours wall",
            "triton wall",
            "ours/torch",
            "triton/torch",
            "torch kernels",
            "ours kernels",
            "triton kernels",
            "triton/torch kernels",
        ],
        rows,
    )
    for name, w in worst.items():
        report.goal(f"one layer fwd+bwd wall, {name}/torch, worst row", w, "<= 1.05", w <= 1.05)


def section_pairs(plan, report, wall, kernels):
    rows = []
    for label, shape, channels_last, dtype in plan.pairs:
        c = shape[1]
        x = torch.randn(shape, device=plan.device, dtype=dtype)
        r = torch.randn(shape, device=plan.device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            r = r.contiguous(memory_format=torch.channels_last)
        grad = torch.randn_like(x)
        bn = nn.BatchNorm2d(c).to(plan.device)
        relu = nn.ReLU(inplace=True)

        def torch_pair(x, residual=None, bn=bn, relu=relu):
            y = bn(x)
            if residual is not None:
                y += residual
            return relu(y)

        fused = triton_layer(bn, activation="relu")
        for pair, res in (("BN+ReLU", None), ("BN+add+ReLU", r)):
            for mode in ("forward", "forward+backward"):
                xs = x.detach().clone().requires_grad_(mode != "forward")
                fns = {
                    "torch": call(torch_pair, xs, mode != "forward", res, grad),
                    "fused": call(fused, xs, mode != "forward", res, grad),
                }
                t = wall(fns)
                k = {n: kernels(fn) for n, fn in fns.items()}
                kr = ratio(k["fused"], k["torch"])
                rows.append(
                    [
                        label,
                        pair,
                        mode,
                        us(t["torch"]),
                        us(t["fused"]),
                        fmt(ratio(t["fused"], t["torch"])),
                        us(k["torch"]),
                        us(k["fused"]),
                        fmt(kr),
                    ]
                )
                if (
                    mode != "forward"
                    and pair == "BN+ReLU"
                    and dtype == BF16
                    and channels_last
                    and kr is not None
                ):
                    report.goal(f"fused BN+ReLU kernels fwd+bwd {label}", kr, "<= 0.8", kr <= 0.8)
    report.lines += [
        "",
        "## Fused BN + activation (eager)",
        "",
        "torch: BatchNorm2d, (+= residual), ReLU(inplace=True); fused: one "
        "`BatchNormAct2d(backend='triton')` layer. Microseconds per call.",
    ]
    report.table(
        [
            "shape",
            "pair",
            "pass",
            "torch wall",
            "fused wall",
            "fused/torch",
            "torch kernels",
            "fused kernels",
            "fused/torch kernels",
        ],
        rows,
    )


def inception(plan, bn_layer=nn.BatchNorm2d, channels_last=False):
    from batchnorm.reproduce.models.inception import build_inception

    torch.manual_seed(0)
    model = build_inception(
        "bn_inception", num_classes=plan.classes, width=plan.width, bn_layer=bn_layer
    ).to(plan.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def train_step(model, batch, size, amp, channels_last, device, classes):
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(fn=model):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(fn(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def section_memory(plan, report, wall, kernels):
    if plan.device != "cuda":
        report.lines += ["", "## Peak memory", "", "skipped: peak memory is read on CUDA only"]
        return
    batch, size = plan.memory
    models = {
        "torch (ReLU)": lambda: inception(plan, channels_last=True),
        "torch (LeakyReLU 0.01)": lambda: leaky(inception(plan, channels_last=True)),
        "fused (ReLU)": lambda: kernel_model(inception(plan, channels_last=True), fuse=True),
        "fused memory saving (LeakyReLU 0.01)": lambda: kernel_model(
            leaky(inception(plan, channels_last=True)), fuse=True, memory_saving=True
        ),
    }
    peaks = {}
    for name, build in models.items():
        model = build()
        step = train_step(model, batch, size, True, True, plan.device, plan.classes)
        step()  # optimizer state allocated
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated()
        del model, step
        torch.cuda.empty_cache()
    base = peaks["torch (ReLU)"]
    report.lines += [
        "",
        f"## Peak memory of one training step (batch {batch}, {size}x{size}, "
        "bfloat16 autocast, channels_last)",
    ]
    report.table(
        ["model", "peak MiB", "/ torch (ReLU)"],
        [[n, f"{p / 2**20:.0f}", f"{p / base:.3f}"] for n, p in peaks.items()],
    )
    r = peaks["fused memory saving (LeakyReLU 0.01)"] / base
    report.goal("memory saving peak / torch (ReLU), batch 128 step", r, "<= 0.75", r <= 0.75)


def section_inception(plan, report, wall, kernels):
    rows = []
    for label, batch, size, amp, channels_last in plan.inception:
        builds = {
            "torch": lambda cl=channels_last: inception(plan, nn.BatchNorm2d, cl),
            "ours": lambda cl=channels_last: inception(plan, batchnorm.BatchNorm2d, cl),
            "ours triton": lambda cl=channels_last: kernel_model(
                inception(plan, channels_last=cl), fuse=False
            ),
            "ours fused": lambda cl=channels_last: kernel_model(
                inception(plan, channels_last=cl), fuse=True
            ),
        }
        modes = ["eager"] + (["compiled"] if plan.compile else [])
        for mode in modes:
            if report.over_budget():
                rows.append([label, mode, "skipped: past the time budget", "", ""])
                continue
            names = list(builds) if mode == "eager" else ["torch", "ours"]
            steps = {}
            for name in names:
                model = builds[name]()
                step = train_step(model, batch, size, amp, channels_last, plan.device, plan.classes)
                if mode == "compiled":
                    fn = torch.compile(model)
                    step = functools.partial(step, fn)
                step()  # compilation, cuDNN autotuning, optimizer state
                steps[name] = step
            t = wall(steps, calls=plan.steps)
            ips = {n: batch / s for n, s in t.items()}
            for n in names:
                rows.append([label, mode, n, f"{ips[n]:.1f}", fmt(ips[n] / ips["torch"])])
            if mode == "eager":
                for n in ("ours", "ours triton"):
                    rr = ips[n] / ips["torch"]
                    report.goal(
                        f"BN-Inception {label} eager, {n}/torch throughput", rr, ">= 1.0", rr >= 1.0
                    )
                if amp and channels_last:
                    rr = ips["ours fused"] / ips["torch"]
                    report.goal(
                        f"BN-Inception {label} eager, fused/torch throughput",
                        rr,
                        ">= 1.05",
                        rr >= 1.05,
                    )
            else:
                rr = t["ours"] / t["torch"]
                report.goal(
                    f"BN-Inception {label} compiled, ours/torch step time",
                    rr,
                    "<= 1.05",
                    rr <= 1.05,
                )
            del steps
    report.lines += [
        "",
        f"## BN-Inception training throughput (width {plan.width}, "
        f"{plan.steps} steps per round, median of {plan.rounds} rounds)",
        "",
        "Compiled rows: torch.compile of the whole model; the Triton kernels are "
        "not registered with torch.compile, so only the torch paths are compiled.",
    ]
    report.table(["config", "mode", "BN", "images/s", "/ torch"], rows)


def section_sync(plan, report, wall, kernels):
    import torch.distributed as dist

    cuda = plan.device == "cuda"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    try:
        shape = (32, 64, 28, 28) if cuda else (4, 3, 5, 5)
        x = torch.randn(shape, device=plan.device)
        grad = torch.randn_like(x)
        layers = {"ours": batchnorm.SyncBatchNorm(shape[1]).to(plan.device)}
        if cuda:
            layers["torch"] = nn.SyncBatchNorm(shape[1]).to(plan.device)
        outs = {}
        for name, layer in layers.items():
            xs = x.clone().requires_grad_()
            y = layer(xs)
            y.backward(grad)
            outs[name] = (y.detach(), xs.grad)
        ref = F.batch_norm(x, None, None, training=True)
        err = (outs["ours"][0] - ref).abs().max().item()
        xs = x.clone().requires_grad_()
        t = wall({n: call(m, xs, True, grad=grad) for n, m in layers.items()})
        backend = dist.get_backend()
    finally:
        dist.destroy_process_group()
    report.lines += [
        "",
        f"## SyncBatchNorm smoke run (world of one, {backend})",
        "",
        f"shape {shape}: max |ours - F.batch_norm| = {err:.2e}; forward+backward "
        + ", ".join(f"{n} {us(s)} us" for n, s in t.items())
        + (f"; ours/torch {t['ours'] / t['torch']:.3f}" if "torch" in t else ""),
    ]


SECTIONS = {
    "layer": section_layer,
    "pairs": section_pairs,
    "memory": section_memory,
    "inception": section_inception,
    "sync": section_sync,
}


def card_name(plan: Plan) -> str:
    if plan.device != "cuda":
        return "cpu-interpreter-smoke"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def header(plan: Plan, argv) -> list[str]:
    from batchnorm.reproduce import provenance

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    git = provenance.git_state()
    device = torch.cuda.get_device_name() if plan.device == "cuda" else "CPU (Triton interpreter)"
    return [
        f"# bench_gpu: {device}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- command: python benchmarks/bench_gpu.py {' '.join(argv)}".rstrip(),
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, "
        f"python {platform.python_version()}",
        f"- git {git['revision']}{' (dirty)' if git['dirty'] else ''}",
        f"- plan: {plan.rounds} rounds, {plan.calls} calls per round, medians",
    ]


def parse(argv):
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    p.add_argument("--out", default=None, help="folder of the report (results/gpu on a GPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--budget", type=float, default=None, help="seconds; later sections skip")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    mode.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny")
    args = p.parse_args(argv)
    sections = tuple(s for s in args.sections.split(",") if s)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {list(SECTIONS)}")
    plan = SMOKE if args.smoke else FULL
    changes = {"sections": sections}
    if args.no_compile:
        changes["compile"] = False
    if args.budget is not None:
        changes["budget_s"] = args.budget
    plan = Plan(**{**plan.__dict__, **changes})
    return args, plan


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, plan = parse(argv)
    if args.dry_run:
        print(f"plan for {plan.device}, sections {', '.join(plan.sections)}:")
        rows = {"layer": plan.layers, "pairs": plan.pairs, "inception": plan.inception}
        for name in plan.sections:
            what = "; ".join(r[0] for r in rows.get(name, ()))
            if name == "memory":
                what = "BN-Inception step, batch {}, {}x{}".format(*plan.memory, plan.memory[1])
            print(f"  {name}: {what or 'world of one'}")
        print(
            f"compile: {plan.compile}, budget {plan.budget_s:.0f} s, report -> "
            f"{args.out or 'results/gpu'}/<card>.md"
        )
        return 0
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels import Triton
    elif not torch.cuda.is_available():
        print("bench_gpu needs a CUDA device (or --smoke / --dry-run)", file=sys.stderr)
        return 2
    if plan.device == "cuda":
        torch.backends.cudnn.benchmark = True
    report = Report(plan)
    wall, kernels, _ = timer(plan)
    start = report.start
    for name in plan.sections:
        if report.over_budget():
            report.lines += ["", f"## {name}: skipped, past the {plan.budget_s:.0f} s budget"]
            continue
        SECTIONS[name](plan, report, wall, kernels)
        print(f"{name}: done at {time.perf_counter() - start:.0f} s", file=sys.stderr)
    lines = header(plan, argv) + [f"- total time: {time.perf_counter() - start:.0f} s"]
    if plan.device != "cuda":
        lines += [
            "",
            "SMOKE RUN on the CPU under the Triton interpreter: it checks that the "
            "script runs; its numbers measure nothing.",
        ]
    lines += report.lines + ["", "## Goals", "", GOALS.rstrip()]
    lines += ["", "| measured | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {w} | {v} | {t} | {m} |" for w, v, t, m in report.goals]
    text = "\n".join(lines) + "\n"
    out = args.out or ("results/gpu" if plan.device == "cuda" else "/tmp/bench_gpu_smoke")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, card_name(plan) + ".md")
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
