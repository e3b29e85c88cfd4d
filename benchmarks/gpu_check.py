"""On a CUDA device: our layers against torch.nn (outputs, gradients, running statistics),
the non-finite guard without host synchronization, and half-precision input, on both of our
paths: ``backend="triton"`` (the Triton kernels; ``"auto"`` takes them only on architectures in
``batchnorm.dispatch.MEASURED``, which this script and bench_gpu.py are the evidence for) and
``backend="torch"``; and BatchNormAct2d against torch.nn's BatchNorm2d + ReLU.

CI has no GPU, so this is run by hand where one is available:
    PYTHONPATH=. python benchmarks/gpu_check.py
It prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import batchnorm


def parity(
    ours_cls, torch_cls, shape, dtype, backward, channels_last=False, backend="torch", act=None
) -> float:
    torch.manual_seed(0)
    theirs = torch_cls(shape[1], device="cuda")
    ours = ours_cls(shape[1], device="cuda", backward=backward, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    if act is not None:  # ours is a BatchNormAct layer: compare with BN followed by act
        theirs = nn.Sequential(theirs, act)
    worst = 0.0
    for _ in range(3):
        x = (torch.randn(shape, device="cuda") * 2 + 1).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        g = torch.randn(shape, device="cuda", dtype=dtype)
        results = []
        for layer in (ours, theirs):
            xi = x.clone().requires_grad_()
            layer.zero_grad()
            y = layer(xi)
            y.backward(g)
            bn = layer[0] if isinstance(layer, nn.Sequential) else layer
            results.append([y.float(), xi.grad.float(), bn.weight.grad, bn.running_var])
        for a, b in zip(*results):
            worst = max(worst, ((a - b).abs().max() / (b.abs().max() + 1e-6)).item())
    return worst


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}")
    failures = 0
    cases = [
        (batchnorm.BatchNorm2d, nn.BatchNorm2d, (32, 64, 28, 28), False),
        (batchnorm.BatchNorm2d, nn.BatchNorm2d, (32, 64, 28, 28), True),
        (batchnorm.BatchNorm1d, nn.BatchNorm1d, (256, 1024), False),
    ]
    for ours_cls, torch_cls, shape, cl in cases:
        for dtype in (torch.float32, torch.bfloat16):
            paths = (("native", "triton"), ("native", "torch"), ("paper", "torch"))
            for backward, backend in paths:
                err = parity(ours_cls, torch_cls, shape, dtype, backward, cl, backend)
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                ok = err < tol
                failures += not ok
                print(
                    f"{'ok ' if ok else 'BAD'} parity {ours_cls.__name__}{shape} "
                    f"channels_last={cl} {dtype} {backward} backend={backend}: "
                    f"max rel err {err:.2e}"
                )
    for cl in (False, True):
        err = parity(
            batchnorm.BatchNormAct2d, nn.BatchNorm2d, (32, 64, 28, 28), torch.float32, "native",
            cl, "triton", nn.ReLU(),
        )  # fmt: skip
        ok = err < 1e-4
        failures += not ok
        mark = "ok " if ok else "BAD"
        print(f"{mark} parity BatchNormAct2d (relu) channels_last={cl}: max rel err {err:.2e}")
    # The guard keeps statistics on the device: no synchronization, same result.
    bn = batchnorm.BatchNorm2d(8, device="cuda", backend="triton")
    bn(torch.randn(4, 8, 5, 5, device="cuda"))
    before = bn.running_var.clone()
    x = torch.randn(4, 8, 5, 5, device="cuda")
    x[0, 3, 0, 0] = float("nan")
    torch.cuda.set_sync_debug_mode("error")  # any host synchronization raises
    try:
        bn(x)
        synced = False
    except RuntimeError:
        synced = True
    finally:
        torch.cuda.set_sync_debug_mode("default")
    guard_ok = (
        not synced
        and torch.equal(bn.running_var, before)
        and bn.num_batches_skipped.item() == 1
        and bn.num_batches_tracked.item() == 1
    )
    failures += not guard_ok
    print(
        f"{'ok ' if guard_ok else 'BAD'} non-finite guard on CUDA without synchronization "
        f"(synchronized={synced})"
    )
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
