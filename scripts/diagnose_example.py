"""Worked example for docs/diagnose.md: two real BN failures, diagnosed, fixed, diagnosed clean.

A small conv net (three conv-BN-ReLU blocks, then Linear-BN1d-ReLU on the pooled features)
learns a synthetic 10-class image task (16x16 RGB: a smooth class pattern, a random gain and
shift, and noise; made here, no download).

A. Distribution shift. The net is trained with batches of 32 and evaluated on images from a
   "second camera" (lower contrast, brighter: x -> 0.4 x + 1.2). In training mode (batch
   statistics) it still classifies them; in eval mode it does not. `diagnose` on the new
   images names the layer, `recalibrate` on them (no labels needed) fixes it, `diagnose`
   is clean again.
B. Batches of 4. The same net trained with batches of 4: the head's BN1d then normalizes
   every value with the mean and variance of 4 examples. `diagnose` with the training batch
   size reports what that does, `recalibrate` removes what it can (stale running averages)
   and the report says what it cannot (the batch noise, which needs larger batches).

`monitor` watches the BN inputs during run A's training (Figure 1(b, c)-style panels).
Everything is written to --out (default results/diagnose/): report_*.txt (the printed
reports), numbers.json, mismatch.png (report.plot of A before the fix), monitor.png.
Runs in about a minute on 2 CPU cores:

    .venv/bin/python scripts/diagnose_example.py [--out results/diagnose] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

import batchnorm

CLASSES, SIZE = 10, 16


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Class patterns are fixed (seed 0); samples differ by gain, translation and noise.
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(CLASSES, 3, 4, 4, generator=g)
    patterns = nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear")
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(CLASSES, (n,), generator=g)
    gain = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
    x = gain * patterns[y] + 1.2 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    shifts = torch.randint(-3, 4, (n, 2), generator=g)
    x = torch.stack([xi.roll(tuple(s.tolist()), dims=(1, 2)) for xi, s in zip(x, shifts)])
    return x, y


def second_camera(x: torch.Tensor) -> torch.Tensor:
    return 0.4 * x + 1.2


def make_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)

    def block(i, o, stride):
        return [nn.Conv2d(i, o, 3, stride, 1, bias=False), batchnorm.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(
        *block(3, 16, 1), *block(16, 32, 2), *block(32, 32, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 64, bias=False), batchnorm.BatchNorm1d(64), nn.ReLU(),  # m = batch size
        nn.Linear(64, CLASSES),
    )


def batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x) - size + 1, size)]


def train(net, x, y, batch, steps, lr, mon_every=None):
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    net.train()
    mon = batchnorm.monitor(net, every=mon_every) if mon_every else None
    with mon if mon else _nothing():
        for step in range(steps):
            idx = torch.randint(len(x), (batch,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            for group in opt.param_groups:  # cosine decay to 0
                group["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.14159)))
            opt.step()
    net.eval()
    return mon


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def accuracy(net, x, y, mode="eval", batch=500):
    # mode "eval": running statistics; "train": each batch of `batch` normalized by itself.
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    if mode == "train":
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    hits = sum((net(xb).argmax(1) == yb).sum().item() for xb, yb in batches(x, y, batch))
    net.load_state_dict(saved)  # the training-mode passes moved the running statistics
    for m, t in modes:
        m.training = t
    return hits / (len(x) // batch * batch)


def summary(report) -> list[dict]:
    return [{"layer": p.layer, "kind": p.kind, "severity": round(p.severity, 3)}
            for p in report.problems]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/diagnose")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    numbers: dict = {}

    x_train, y_train = make_data(8000, seed=1)
    x_test, y_test = make_data(2000, seed=2)
    x_cam, y_cam = second_camera(x_test[:1000]), y_test[:1000]  # camera B: adapt on these
    x_cam_eval, y_cam_eval = second_camera(x_test[1000:]), y_test[1000:]  # and score on these

    # ---- A: distribution shift ---------------------------------------------------------
    net = make_net(seed=0)
    mon = train(net, x_train, y_train, batch=32, steps=600, lr=0.05, mon_every=10)
    mon.plot(out / "monitor.png", layers=mon.layers,
             titles=[f"input of BN layer {n!r} (all channels)" for n in mon.layers])
    camera = batches(x_cam, y_cam, 32)
    a = {
        "clean_eval": accuracy(net, x_test, y_test),
        "camera_b_eval": accuracy(net, x_cam_eval, y_cam_eval),
        "camera_b_train_mode": accuracy(net, x_cam_eval, y_cam_eval, mode="train"),
    }
    clean_report = batchnorm.diagnose(net, batches(x_train[:2000], y_train[:2000], 32),
                                      progress=False)
    before = batchnorm.diagnose(net, camera, progress=False)
    before.plot(out / "mismatch.png")
    batchnorm.recalibrate(net, camera, progress=False)
    after = batchnorm.diagnose(net, camera, progress=False)
    a["camera_b_eval_recalibrated"] = accuracy(net, x_cam_eval, y_cam_eval)
    a["clean_eval_after_recalibrating_on_b"] = accuracy(net, x_test, y_test)
    a["problems_training_data"] = summary(clean_report)
    a["problems_before"] = summary(before)
    a["problems_after"] = summary(after)
    a["output_gap_before"], a["output_gap_after"] = before.output_gap, after.output_gap
    numbers["A_distribution_shift"] = a
    (out / "report_A_training_data.txt").write_text(str(clean_report) + "\n")
    (out / "report_A_before.txt").write_text(str(before) + "\n")
    (out / "report_A_after.txt").write_text(str(after) + "\n")

    # ---- B: batches of 4 ---------------------------------------------------------------
    small = make_net(seed=0)
    train(small, x_train, y_train, batch=4, steps=1500, lr=0.01)
    b_data = batches(x_train[:2000], y_train[:2000], 4)
    b = {"eval": accuracy(small, x_test, y_test),
         "train_mode_batches_of_4": accuracy(small, x_test, y_test, mode="train", batch=4)}
    b_before = batchnorm.diagnose(small, b_data, progress=False)
    batchnorm.recalibrate(small, b_data, progress=False)
    b_after = batchnorm.diagnose(small, b_data, progress=False)
    b["eval_recalibrated"] = accuracy(small, x_test, y_test)
    b["problems_before"] = summary(b_before)
    b["problems_after"] = summary(b_after)
    numbers["B_batches_of_4"] = b
    (out / "report_B_before.txt").write_text(str(b_before) + "\n")
    (out / "report_B_after.txt").write_text(str(b_after) + "\n")

    numbers["provenance"] = {
        "command": "python scripts/diagnose_example.py " + " ".join(argv or []),
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                   f"{__import__('os').cpu_count()} cores",
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip(),
    }
    (out / "numbers.json").write_text(json.dumps(numbers, indent=1) + "\n")
    for part in ("A_distribution_shift", "B_batches_of_4"):
        print(part, json.dumps({k: v for k, v in numbers[part].items()
                                if not k.startswith("problems")}, indent=None))
    print(before)
    print(after)
    print(b_before)
    print(f"{numbers['provenance']['seconds']} s; written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
