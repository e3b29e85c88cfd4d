"""SyncBatchNorm (Sec. 3 across processes): 2 gloo ranks on 127.0.0.1 against one process.

The oracle is torch.nn.BatchNorm*d in float64 on the concatenated batch, in each rank.
Spawning costs seconds, so one launch runs every equivalence case; the dead-rank cases need a
launch each. Only 127.0.0.1 is used: the store's address, and gloo's interface is loopback.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time

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
    """float16 input: float32 statistics merged, float16 output, same as the float32 result."""
    torch.manual_seed(3)
    x_all = (torch.randn(8, 3, 2, 2) * 2 + 5).half().to(device)
    sync = SyncBatchNorm(3, device=device)
    y = sync(x_all[4 * rank : 4 * (rank + 1)])
    ref = torch.nn.BatchNorm2d(3, device=device)(x_all.float())[4 * rank : 4 * (rank + 1)]
    assert y.dtype == torch.float16 and sync.running_var.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref, rtol=1e-3, atol=2e-3)


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


def _equivalence_worker(rank, port, device):
    _init(rank, port)
    try:
        for name, sizes, shape, momentum in CASES:
            try:
                _check_case(rank, sizes, shape, momentum, device)
            except AssertionError as err:
                raise AssertionError(f"case {name!r}, rank {rank}: {err}") from err
        for check in (_check_ddp, _check_nonfinite, _check_too_few_values, _check_half):
            check(rank, device)
        _check_convert(rank, device)
    finally:
        dist.destroy_process_group()


def test_sync_equals_single_process_bn():
    _launch(_equivalence_worker, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sync_equals_single_process_bn_cuda():
    # Both ranks share one GPU, so gloo carries the CUDA tensors (NCCL needs a GPU per rank);
    # this still runs the device-side paths: no read-back of counts, tensor-valued guards.
    _launch(_equivalence_worker, "cuda")


def _dead_rank_worker(rank, port, how, pg_timeout, layer_timeout, limit, done):
    """Rank 1 exits or stalls before the first collective; rank 0 must raise within limit."""
    _init(rank, port, pg_timeout)
    if rank == 1:
        if how == "stalls":  # alive, never joining, until rank 0 is done
            done.wait(limit + 3)
        os._exit(0)
    sync = SyncBatchNorm(3, timeout=layer_timeout)
    t0 = time.monotonic()
    try:
        sync(torch.randn(4, 3))
    except RuntimeError as err:
        elapsed = time.monotonic() - t0
        assert "SyncBatchNorm" in str(err) and "all_gather" in str(err), str(err)
        assert elapsed < limit, f"raised after {elapsed:.1f} s, limit {limit} s"
    else:
        raise AssertionError("forward succeeded although rank 1 never joined")
    finally:
        done.set()
    # The group is broken: skip its teardown, which could wait for the dead peer.
    os._exit(0)


@pytest.mark.parametrize(
    "how, pg_timeout, layer_timeout, limit",
    [
        ("exits", 3.0, None, 6.0),  # the peer's connection closes: fails at once
        ("stalls", 2.0, None, 6.0),  # alive but absent: the process group's timeout
        ("stalls", 60.0, 1.0, 5.0),  # SyncBatchNorm(timeout=1) beats a long group timeout
    ],
)
def test_dead_rank_raises_instead_of_hanging(how, pg_timeout, layer_timeout, limit):
    done = mp.get_context("spawn").Event()
    _launch(_dead_rank_worker, how, pg_timeout, layer_timeout, limit, done)


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
    ],
    ids=["torch.BatchNorm1d", "torch.BatchNorm2d", "ours.BatchNorm2d", "ours.BatchNorm3d"],
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
    with pytest.raises(ValueError, match="channel axis 1"):
        SyncBatchNorm.convert_sync_batchnorm(batchnorm.BatchNorm(4, axis=-1))
