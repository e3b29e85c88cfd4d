"""SyncBatchNorm (Sec. 3 across processes): 2 gloo ranks on 127.0.0.1 against one process.

The oracle is torch.nn.BatchNorm*d in float64 on the concatenated batch, in each rank.
Spawning costs seconds, so one launch per device runs every check of CHECKS (the dead-rank
one last, as it breaks the groups) and reports each check's errors, which one test per check
then asserts. Only 127.0.0.1 is used: the store's address, and gloo's interface is loopback.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import batchnorm
from batchnorm import SyncBatchNorm

WORLD = 2
# (name, per-rank batch sizes, shape after N, momentum); C = shape[0]
CASES = [
    ("2x16 (N,C,H,W)", (16, 16), (3, 4, 4), 0.1),
    ("20+12 (N,C,H,W)", (20, 12), (3, 4, 4), 0.3),
    ("32+0 (N,C,H,W)", (32, 0), (3, 4, 4), 0.1),
    ("0+32 (N,C,H,W)", (0, 32), (3, 4, 4), 0.1),
    ("5+3 (N,C) cumulative", (5, 3), (6,), None),
    ("2+3 (N,C,D,H,W)", (2, 3), (2, 3, 2, 2), 0.1),
]
STEPS = 3
TOL = dict(rtol=1e-10, atol=1e-12)  # float64 throughout: only rounding differs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, port: int, pg_timeout: float = 30.0) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # gloo would otherwise pick the address the host name resolves to.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo0" if sys.platform == "darwin" else "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=pg_timeout),
    )


def _launch(fn, *args, deadline: float = 40.0) -> None:
    """Run fn(rank, port, *args) on WORLD spawned processes; fail on error or past deadline."""
    ctx = mp.start_processes(
        fn, args=(_free_port(), *args), nprocs=WORLD, join=False, start_method="spawn"
    )
    end = time.monotonic() + deadline
    while not ctx.join(timeout=max(0.1, end - time.monotonic())):  # raises if a rank failed
        if time.monotonic() >= end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed test did not finish within {deadline} s")


def _oracle(shape: tuple) -> type:
    return {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm2d}.get(
        len(shape), torch.nn.BatchNorm3d
    )


def _pair(shape, momentum, device):
    """(SyncBatchNorm, torch oracle) in float64 with the same random gamma and beta."""
    c = shape[0]
    sync = SyncBatchNorm(c, momentum=momentum, device=device, dtype=torch.float64)
    ref = _oracle(shape)(c, momentum=momentum, device=device, dtype=torch.float64)
    with torch.no_grad():
        sync.weight.copy_(torch.rand(c, dtype=torch.float64) + 0.5)
        sync.bias.copy_(torch.randn(c, dtype=torch.float64))  # CPU generator: same on any device
        ref.weight.copy_(sync.weight)
        ref.bias.copy_(sync.bias)
    return sync, ref


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _check_case(rank, sizes, shape, momentum, device):
    """STEPS training steps on rank's slice vs the oracle on all of it; then eval."""
    torch.manual_seed(0)  # the same data, gamma and beta on every rank
    sync, ref = _pair(shape, momentum, device)
    start, n = sum(sizes[:rank]), sizes[rank]
    for _ in range(STEPS):
        x_all = (torch.randn(sum(sizes), *shape, dtype=torch.float64) * 3 + 1).to(device)
        g_all = torch.randn_like(x_all)  # dl/dy for the loss sum(y * g)
        x_ref = x_all.clone().requires_grad_()
        y_ref = ref(x_ref)
        (y_ref * g_all).sum().backward()
        x = x_all[start : start + n].clone().requires_grad_()
        y = sync(x)
        (y * g_all[start : start + n]).sum().backward()

        torch.testing.assert_close(y, y_ref[start : start + n].detach(), **TOL)
        # Input gradients: exactly single-process BN's for loss = sum over ranks.
        torch.testing.assert_close(x.grad, x_ref.grad[start : start + n], **TOL)
        # gamma/beta gradients are each rank's local sums: their sum over ranks is the oracle's.
        torch.testing.assert_close(_sum_over_ranks(sync.weight.grad), ref.weight.grad, **TOL)
        torch.testing.assert_close(_sum_over_ranks(sync.bias.grad), ref.bias.grad, **TOL)
        sync.zero_grad()
        ref.zero_grad()
    torch.testing.assert_close(sync.running_mean, ref.running_mean, **TOL)
    torch.testing.assert_close(sync.running_var, ref.running_var, **TOL)
    assert int(sync.num_batches_tracked) == int(ref.num_batches_tracked) == STEPS
    # Eval: population statistics, no communication, same as the oracle.
    sync.eval()
    ref.eval()
    x = torch.randn(3, *shape, dtype=torch.float64, device=device)
    torch.testing.assert_close(sync(x), ref(x), **TOL)


def _check_ddp(rank, device):
    """Under DDP (which averages gradients over ranks) gamma/beta grads are the oracle's / W."""
    torch.manual_seed(1)
    shape = (3, 4, 4)
    sync, ref = _pair(shape, 0.1, device)
    model = DistributedDataParallel(sync)
    x_all = torch.randn(2 * 16, *shape, dtype=torch.float64).to(device)
    g_all = torch.randn_like(x_all)
    x_ref = x_all.clone().requires_grad_()
    (ref(x_ref) * g_all).sum().backward()
    x = x_all[16 * rank : 16 * (rank + 1)].clone().requires_grad_()
    (model(x) * g_all[16 * rank : 16 * (rank + 1)]).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad[16 * rank : 16 * (rank + 1)], **TOL)
    torch.testing.assert_close(sync.weight.grad * WORLD, ref.weight.grad, **TOL)
    torch.testing.assert_close(sync.bias.grad * WORLD, ref.bias.grad, **TOL)
    torch.testing.assert_close(sync.running_var, ref.running_var, **TOL)


def _check_nonfinite(rank, device):
    """A NaN on rank 1 only: both ranks skip the running-statistics update."""
    sync = SyncBatchNorm(3, device=device, dtype=torch.float64)
    sync(torch.randn(4, 3, dtype=torch.float64, device=device))
    before = sync.running_mean.clone(), sync.running_var.clone()
    x = torch.randn(4, 3, dtype=torch.float64, device=device)
    if rank == 1:
        x[2, 1] = float("nan")
    y = sync(x)
    assert not torch.isfinite(y[:, 1]).any()  # the output stays non-finite, as in the core
    assert torch.equal(sync.running_mean, before[0]) and torch.equal(sync.running_var, before[1])
    assert int(sync.num_batches_tracked) == 1 and int(sync.num_batches_skipped) == 1


def _check_too_few_values(rank, device):
    """One value per channel over all ranks (1 + 0) raises on every rank, not just one."""
    sync = SyncBatchNorm(3, device=device, dtype=torch.float64)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sync(torch.randn(1 - rank, 3, dtype=torch.float64, device=device))


def _check_half(rank, device):
    """float16 input: float32 statistics merged, float16 output and gradient, as in float32."""
    torch.manual_seed(3)
    x_all = (torch.randn(8, 3, 2, 2) * 2 + 5).half().to(device)
    g_all = torch.randn(8, 3, 2, 2, device=device)
    mine = slice(4 * rank, 4 * (rank + 1))
    x = x_all[mine].clone().requires_grad_()
    x_ref = x_all.float().requires_grad_()
    sync = SyncBatchNorm(3, device=device)
    y = sync(x)
    (y.float() * g_all[mine]).sum().backward()
    y_ref = torch.nn.BatchNorm2d(3, device=device)(x_ref)
    (y_ref * g_all).sum().backward()
    assert y.dtype == x.grad.dtype == torch.float16 and sync.running_var.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref[mine].detach(), rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(x.grad.float(), x_ref.grad[mine], rtol=1e-2, atol=1e-2)


def _check_convert(rank, device):
    """A converted torch model trains synchronized: both ranks end with equal buffers."""
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3)).to(device)
    net = SyncBatchNorm.convert_sync_batchnorm(net)
    torch.manual_seed(10 + rank)  # different data per rank
    net(torch.randn(4, 2, 3, 3).to(device))
    gathered = [torch.empty(3, device=device) for _ in range(WORLD)]
    dist.all_gather(gathered, net[1].running_mean)
    torch.testing.assert_close(gathered[0], gathered[1], rtol=0, atol=0)


def _check_mask(rank, device):
    """Issue 8, defect 13: forward(x, mask=...) over 2 ranks, NaN padding on both, equals
    single-process BN (float64) of the valid positions of the concatenated batch."""
    torch.manual_seed(4)
    sizes, length, c = (3, 2), 5, 3
    sync, ref = _pair((c, length), 0.2, device)
    x_all = torch.randn(5, c, length, dtype=torch.float64, device=device) * 2 + 1
    lengths = torch.tensor([5, 1, 3, 4, 2])
    mask_all = (torch.arange(length)[None, :] < lengths[:, None]).to(device)  # (N, L)
    x_all.transpose(1, 2)[~mask_all] = float("nan")
    g_all = torch.randn_like(x_all)
    valid_all = x_all.transpose(1, 2)[mask_all].clone().requires_grad_()  # (K, C)
    y_ref = ref(valid_all)
    (y_ref * g_all.transpose(1, 2)[mask_all]).sum().backward()
    start, n = sum(sizes[:rank]), sizes[rank]
    x = x_all[start : start + n].clone().requires_grad_()
    mask = mask_all[start : start + n]
    y = sync(x, mask=mask)
    keep = mask[:, None, :].expand_as(y)
    (torch.where(keep, y, 0) * g_all[start : start + n]).sum().backward()
    # The rank's valid positions are a contiguous run of the oracle's rows.
    before = int(mask_all[:start].sum())
    mine = slice(before, before + int(mask.sum()))
    torch.testing.assert_close(y.transpose(1, 2)[mask], y_ref[mine].detach(), **TOL)
    torch.testing.assert_close(x.grad.transpose(1, 2)[mask], valid_all.grad[mine], **TOL)
    assert torch.all(x.grad.transpose(1, 2)[~mask] == 0)
    torch.testing.assert_close(_sum_over_ranks(sync.weight.grad), ref.weight.grad, **TOL)
    torch.testing.assert_close(_sum_over_ranks(sync.bias.grad), ref.bias.grad, **TOL)
    torch.testing.assert_close(sync.running_mean, ref.running_mean, **TOL)
    torch.testing.assert_close(sync.running_var, ref.running_var, **TOL)


def _check_all_empty(rank, device):
    """Issue 8, defect 8: N = 0 on every rank is an empty output; nothing moves anywhere.
    Issue 15: so is a mask that selects nothing on any rank (output gamma * x + beta, no
    gradient to gamma and beta from the padding)."""
    sync = SyncBatchNorm(3, device=device, dtype=torch.float64)
    x = torch.randn(0, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    y = sync(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(sync.running_var, torch.ones_like(sync.running_var))
    assert int(sync.num_batches_tracked) == 0 and int(sync.num_batches_skipped) == 0
    sync.zero_grad()
    x = torch.randn(2 + rank, 3, 2, dtype=torch.float64, device=device)
    y = sync(x, mask=torch.zeros(2 + rank, 2, dtype=torch.bool, device=device))
    y.sum().backward()
    torch.testing.assert_close(y, sync.weight[:, None] * x + sync.bias[:, None])
    assert torch.equal(sync.weight.grad, torch.zeros_like(sync.weight))
    assert torch.equal(sync.running_var, torch.ones_like(sync.running_var))
    assert int(sync.num_batches_tracked) == 0 and int(sync.num_batches_skipped) == 0


def _check_collectives(rank, device):
    """Item 6 of issue 17: one collective per training forward and one per backward, whatever
    the per-rank batch sizes (here 6 and 0): all_gathers on gloo, where they are faster than
    all_reduce for a BN layer's few values."""
    calls = []
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "broadcast")}

    def counting(name):
        def call(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)

        return call

    sync = SyncBatchNorm(3, device=device)
    x = torch.randn(6 if rank == 0 else 0, 3, 2, 2, device=device, requires_grad=True)
    try:
        for name in originals:
            setattr(dist, name, counting(name))
        y = sync(x)
        forward = list(calls)
        y.sum().backward()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    assert forward == ["all_gather"], forward
    assert calls == ["all_gather", "all_gather"], calls


class _Replicated(torch.autograd.Function):
    """A value every rank holds alike, used by each rank's part: identity forward (and
    tangent); the gradient is the sum of every rank's part's (`_SumOfParts`)."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return _SumOfParts.apply(grad)

    @staticmethod
    def jvp(ctx, tangent):
        return tangent.view_as(tangent)


class _SumOfParts(torch.autograd.Function):
    """Every rank's part summed into one value every rank holds: all_reduce forward (and
    tangent); the gradient of each part is the replicated gradient (`_Replicated`)."""

    @staticmethod
    def forward(ctx, t):
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _Replicated.apply(grad)

    @staticmethod
    def jvp(ctx, tangent):
        return _SumOfParts.apply(tangent)


def _global_function(rank, sizes, sync):
    """f(x_all, gamma, beta) = SyncBatchNorm over the concatenated batch, one function that
    every rank computes alike: gradcheck's perturbations (made on every rank in lockstep)
    and its analytic derivatives (of every order) are then those of one process. Inputs
    enter as `_Replicated`, each rank normalizes its slice, and the slices are summed into
    the full output (`_SumOfParts`)."""
    start, n = sum(sizes[:rank]), sizes[rank]

    def f(x_all, weight, bias):
        sync.weight, sync.bias = _Replicated.apply(weight), _Replicated.apply(bias)
        y = sync(_Replicated.apply(x_all)[start : start + n])
        zeros = torch.zeros_like(x_all)
        return _SumOfParts.apply(torch.cat([zeros[:start], y, zeros[start + n :]]))

    return f


def _check_gradgradcheck(rank, device):
    """Issue 15 item 6: gradcheck (backward and forward mode) and gradgradcheck of the
    synchronized layer over 2 ranks, float64, as one function of the concatenated batch."""
    torch.manual_seed(5)
    c, sizes = 2, (2, 2)  # equal sizes: gradcheck perturbs each input element in lockstep
    sync = SyncBatchNorm(c, device=device, dtype=torch.float64)
    del sync.weight, sync.bias  # set per call by _global_function
    f = _global_function(rank, sizes, sync)
    x = torch.randn(sum(sizes), c, 3, dtype=torch.float64, device=device, requires_grad=True)
    w = (torch.rand(c, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    b = torch.randn(c, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, w, b), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def _check_double_backward_oracle(rank, device):
    """Double backward over uneven and empty ranks equals torch's BN on the concatenated
    batch: d/dx of sum(h * dl/dx) for l = sum(y * g), and the same for gamma."""
    torch.manual_seed(6)
    shape = (3, 2, 2)
    for sizes in ((5, 3), (6, 0)):
        sync, ref = _pair(shape, 0.1, device)
        x_all = torch.randn(sum(sizes), *shape, dtype=torch.float64, device=device) * 2 + 1
        g_all, h_all = torch.randn_like(x_all), torch.randn_like(x_all)
        x_ref = x_all.clone().requires_grad_()
        (gx,) = torch.autograd.grad((ref(x_ref) * g_all).sum(), x_ref, create_graph=True)
        (gx * h_all).sum().backward()
        start, n = sum(sizes[:rank]), sizes[rank]
        mine = slice(start, start + n)
        x = x_all[mine].clone().requires_grad_()
        (gx_mine,) = torch.autograd.grad((sync(x) * g_all[mine]).sum(), x, create_graph=True)
        torch.testing.assert_close(gx_mine, gx[mine].detach(), **TOL)
        (gx_mine * h_all[mine]).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad[mine], **TOL)
        torch.testing.assert_close(_sum_over_ranks(sync.weight.grad), ref.weight.grad, **TOL)


def _check_forward_ad_oracle(rank, device):
    """Forward-mode AD (dual tensors) over ranks 4 + 2 equals torch's BN's jvp on the
    concatenated batch."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(7)
    shape, sizes = (3, 2), (4, 2)
    sync, ref = _pair(shape, 0.1, device)
    x_all = torch.randn(sum(sizes), *shape, dtype=torch.float64, device=device)
    t_all = torch.randn_like(x_all)
    with fwAD.dual_level():
        y_ref = fwAD.unpack_dual(ref(fwAD.make_dual(x_all, t_all))).tangent
        mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        out = fwAD.unpack_dual(sync(fwAD.make_dual(x_all[mine], t_all[mine])))
    torch.testing.assert_close(out.tangent, y_ref[mine], **TOL)
    torch.testing.assert_close(sync.running_var, ref.running_var, **TOL)


def _check_dead_rank(rank, device, short, spare):
    """Rank 1 first stalls (alive, never joining), then exits; rank 0 must never hang.

    Three groups over the same two ranks, one per way of failing: the default group's
    timeout (10 s) is longer than the layer's ``timeout`` (1 s), which must end the first
    wait; ``short``'s own 2 s timeout ends the second; ``spare`` fails when rank 1 exits.
    Must run last: it leaves every group broken.
    """
    if rank == 1:
        # Stall until rank 0 has timed out twice; a barrier would need this dead rank.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not os.path.exists(short.flag):
            time.sleep(0.05)
        return
    try:
        _expect_failure(None, layer_timeout=1.0, limit=4.0)  # SyncBatchNorm(timeout=1)
        _expect_failure(short.group, layer_timeout=None, limit=5.0)  # the group's timeout
    finally:
        open(short.flag, "w").close()
    # Rank 1 is exiting now: the collective fails when its connection closes.
    _expect_failure(spare, layer_timeout=None, limit=5.0)


def _expect_failure(group, layer_timeout, limit):
    """A SyncBatchNorm forward over ``group`` must raise a clear RuntimeError within limit."""
    sync = SyncBatchNorm(3, process_group=group, timeout=layer_timeout)
    t0 = time.monotonic()
    try:
        sync(torch.randn(4, 3))
    except RuntimeError as err:
        elapsed = time.monotonic() - t0
        assert "SyncBatchNorm" in str(err) and "all_gather" in str(err), str(err)
        assert elapsed < limit, f"raised after {elapsed:.1f} s, limit {limit} s"
    else:
        raise AssertionError("forward succeeded although rank 1 never joined")


CHECKS = [name for name, *_ in CASES] + [
    "ddp", "nonfinite", "too_few_values", "half", "convert", "mask", "all_empty",
    "collectives", "gradgradcheck", "double_backward", "forward_ad", "dead_rank",
]  # fmt: skip


class _Short(NamedTuple):
    group: object
    flag: str  # a file rank 0 creates once rank 1 may stop stalling


def _worker(rank, port, device, flag, results):
    """Every check of CHECKS on this rank; reports {check: error or None} to ``results``."""
    _init(rank, port, pg_timeout=10.0)
    short = _Short(dist.new_group(timeout=datetime.timedelta(seconds=2)), flag)
    spare = dist.new_group()
    checks = {name: (_check_case, case) for name, *case in CASES}
    checks.update(
        ddp=(_check_ddp, ()),
        nonfinite=(_check_nonfinite, ()),
        too_few_values=(_check_too_few_values, ()),
        half=(_check_half, ()),
        convert=(_check_convert, ()),
        mask=(_check_mask, ()),
        all_empty=(_check_all_empty, ()),
        collectives=(_check_collectives, ()),
        gradgradcheck=(_check_gradgradcheck, ()),
        double_backward=(_check_double_backward_oracle, ()),
        forward_ad=(_check_forward_ad_oracle, ()),
        dead_rank=(_check_dead_rank, (short, spare)),
    )
    report = {}
    for name in CHECKS:
        fn, extra = checks[name]
        try:
            if fn is _check_case:
                fn(rank, *extra, device)
            else:
                fn(rank, device, *extra)
            report[name] = None
        except Exception as err:  # reported to the parent, test by test
            # Truncated: the pipe holds ~64 KiB until the parent reads it after join.
            report[name] = f"rank {rank}: {type(err).__name__}: {err}"[:2000]
    results.put(report)  # SimpleQueue: written before returning, so os._exit loses nothing
    # The groups are broken now: skip their teardown, which could wait for the dead peer.
    os._exit(0)


def _run_all(device, tmp_path_factory) -> dict:
    """One launch of WORLD ranks running every check; {check: [errors]}."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    flag = str(tmp_path_factory.mktemp("sync") / "rank0_done")
    _launch(_worker, device, flag, results)
    reports = [results.get() for _ in range(WORLD) if not results.empty()]
    merged = {name: [r[name] for r in reports if r[name]] for name in CHECKS}
    if len(reports) < WORLD:
        for errors in merged.values():
            errors.append(f"only {len(reports)} of {WORLD} ranks reported")
    return merged


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory):
    return _run_all("cpu", tmp_path_factory)


@pytest.fixture(scope="module")
def cuda_results(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    # Both ranks share one GPU, so gloo carries the CUDA tensors (NCCL needs a GPU per rank);
    # this still runs the device-side paths: no read-back of counts, tensor-valued guards.
    return _run_all("cuda", tmp_path_factory)


@pytest.mark.parametrize("check", CHECKS)
def test_two_ranks_cpu(check, cpu_results):
    """SyncBatchNorm on 2 gloo ranks equals one process on the concatenated batch."""
    assert not cpu_results[check], "\n".join(cpu_results[check])


@pytest.mark.parametrize("check", CHECKS)
def test_two_ranks_cuda(check, cuda_results):
    assert not cuda_results[check], "\n".join(cuda_results[check])


def test_without_process_group_it_is_plain_bn():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    sync = SyncBatchNorm(3, dtype=torch.float64)
    ref = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    torch.testing.assert_close(sync(x), ref(x), **TOL)
    torch.testing.assert_close(sync.running_var, ref.running_var, **TOL)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (torch.nn.BatchNorm1d(4, momentum=0.2), (5, 4)),
        (torch.nn.BatchNorm2d(4, eps=1e-3, affine=False), (5, 4, 2, 2)),
        (batchnorm.BatchNorm2d(4, backward="paper"), (5, 4, 2, 2)),
        (batchnorm.BatchNorm3d(4, momentum=None, track_running_stats=False), (5, 4, 2, 2, 2)),
        (torch.nn.SyncBatchNorm(4, momentum=0.3), (5, 4, 2, 2)),
    ],
    ids=[
        "torch.BatchNorm1d",
        "torch.BatchNorm2d",
        "ours.BatchNorm2d",
        "ours.BatchNorm3d",
        "torch.SyncBatchNorm",
    ],
)
def test_convert_round_trip(layer, shape):
    """Parameters stay the same objects, buffers, hyper-parameters and mode carry over."""
    layer.train()
    layer(torch.randn(shape))
    layer.eval()
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(layer))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    params = list(net.parameters())
    net = SyncBatchNorm.convert_sync_batchnorm(net)
    sync = net[1][0]
    assert type(sync) is SyncBatchNorm and not sync.training
    assert (sync.eps, sync.momentum, sync.affine) == (layer.eps, layer.momentum, layer.affine)
    assert all(a is b for a, b in zip(net.parameters(), params, strict=True))  # shared
    back = SyncBatchNorm.revert_sync_batchnorm(net)
    assert type(back[1][0]) is type(layer) and not back[1][0].training
    assert getattr(back[1][0], "backward", None) == getattr(layer, "backward", None)
    assert all(a is b for a, b in zip(back.parameters(), params, strict=True))
    for key, value in back.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_convert_refuses_other_channel_axis():
    with pytest.raises(ValueError, match="channel axis other than 1"):
        SyncBatchNorm.convert_sync_batchnorm(batchnorm.BatchNorm(4, axis=-1))


@pytest.mark.parametrize(
    "layer",
    [batchnorm.BatchNorm2d(4, virtual_batch_size=2), batchnorm.BatchRenorm2d(4)],
    ids=["ghost", "renorm"],
)
def test_convert_refuses_transforms_sync_bn_does_not_implement(layer):
    with pytest.raises(ValueError, match="does not implement (Ghost BN|Batch Renormalization)"):
        SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(layer))
