"""BN in distributed training loops (issue 17, item 5): 2 gloo ranks on 127.0.0.1.

DistributedDataParallel with ``broadcast_buffers`` both ways and two forwards per step,
FSDP2 ``fully_shard`` with a bf16 mixed-precision policy, `batchnorm.sync_buffers`, and
`recalibrate`/`diagnose` pooled over ranks. Each oracle is one process: torch.nn's BN fed
the batches in float64, or `recalibrate`/`diagnose` over the concatenated batches. One
launch runs every check of CHECKS (as tests/test_distributed.py does); one test per check
asserts its errors.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import WORLD, _init, _launch
from torch.nn.parallel import DistributedDataParallel

import batchnorm
from batchnorm import SyncBatchNorm

TOL = dict(rtol=1e-10, atol=1e-12)
STEPS = 2


def _batches(seed: int, sizes, shape=(3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=g, dtype=torch.float64) * 2 + 1 for n in sizes]


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t.contiguous())
    return out


def _ddp_case(rank, layer_cls, broadcast):
    """Two forwards per step (a GAN discriminator on real and fake data), one backward of
    both losses (pytorch#22095: DDP's buffer broadcast between the two forwards), STEPS steps.

    Each rank feeds its own data; the oracle is torch's BN fed the same batches in one
    process. Plain BN with ``broadcast_buffers=True``: every forward starts from rank 0's
    buffers, so rank 0 ends with the statistics of its own batches, and rank 1 with rank 0's
    before the last forward, moved by its own last batch. Without broadcast each rank follows
    its own batches. SyncBatchNorm: the statistics of the concatenated batch of every forward,
    identical on every rank, either way."""
    torch.manual_seed(0)
    layer = layer_cls(3, momentum=0.3, dtype=torch.float64)
    with warnings.catch_warnings():  # torch 2.13 deprecates the name for forward_sync_buffers
        warnings.simplefilter("ignore", FutureWarning)
        model = DistributedDataParallel(torch.nn.Sequential(layer), broadcast_buffers=broadcast)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = {r: _batches(10 + r, [4] * (2 * STEPS)) for r in range(WORLD)}
    for step in range(STEPS):
        real, fake = data[rank][2 * step], data[rank][2 * step + 1]
        loss = model(real).square().mean() + model(fake).abs().mean()
        opt.zero_grad()
        loss.backward()  # raised "modified by an inplace operation" in pytorch#22095
        opt.step()

    def oracle(batches, start=None):
        ref = torch.nn.BatchNorm2d(3, momentum=0.3, dtype=torch.float64)
        if start is not None:
            ref.load_state_dict(start.state_dict())
        for x in batches:
            ref(x)
        return ref

    if layer_cls is SyncBatchNorm:
        ref = oracle([torch.cat([data[r][i] for r in range(WORLD)]) for i in range(2 * STEPS)])
    elif not broadcast:
        ref = oracle(data[rank])
    elif rank == 0:
        ref = oracle(data[0])
    else:
        ref = oracle(data[rank][-1:], start=oracle(data[0][:-1]))
    torch.testing.assert_close(layer.running_mean, ref.running_mean, **TOL)
    torch.testing.assert_close(layer.running_var, ref.running_var, **TOL)
    if layer_cls is SyncBatchNorm:
        a, b = _gather(layer.running_var)
        assert torch.equal(a, b)


def _fsdp_case(rank, layer_cls):
    """FSDP2 fully_shard with MixedPrecisionPolicy(param_dtype=bf16): the BN layer gets bf16
    input and bf16 gamma/beta; its running buffers stay float32 and move by float32
    statistics of that bf16 input (torch.nn.BatchNorm2d in float32 on it is the oracle)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 1), layer_cls(3), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(27, 2),
    )  # fmt: skip
    bn = net[1]
    ref = torch.nn.BatchNorm2d(3)
    seen = []
    bn.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    fully_shard(net, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.manual_seed(20 + rank)
    for _ in range(STEPS):
        out = net(torch.randn(4, 2, 3, 3))
        assert out.dtype == torch.bfloat16
        opt.zero_grad()
        out.float().square().mean().backward()
        opt.step()
        x = seen[-1]
        assert x.dtype == torch.bfloat16
        if layer_cls is SyncBatchNorm:
            x = torch.cat(_gather(x))
        ref(x.float())
    assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-6, atol=1e-7)


def _check_sync_buffers_average(rank):
    """sync_buffers(model, "average") after plain-BN training with momentum=None equals one
    process fed every rank's batches (torch's BN: the running statistics of all W*k batches),
    for ours and torch's layers, uneven per-rank batch sizes."""
    sizes = {0: [5, 7, 4], 1: [6, 3, 8]}
    layers = [torch.nn.BatchNorm2d(3, momentum=None, dtype=torch.float64),
              batchnorm.BatchNorm2d(3, momentum=None, dtype=torch.float64)]  # fmt: skip
    model = torch.nn.Sequential(*layers)
    for x in _batches(30 + rank, sizes[rank]):
        layers[0](x)
        layers[1](x)
    assert batchnorm.sync_buffers(model, "average", dist.group.WORLD) == 2
    ref = torch.nn.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    for r in range(WORLD):
        for x in _batches(30 + r, sizes[r]):
            ref(x)
    for layer in layers:
        torch.testing.assert_close(layer.running_mean, ref.running_mean, **TOL)
        torch.testing.assert_close(layer.running_var, ref.running_var, **TOL)


def _check_sync_buffers_broadcast(rank):
    """sync_buffers(model, "broadcast") gives every rank rank 0's buffers, counters too."""
    layer = batchnorm.BatchNorm1d(4)
    for x in _batches(40 + rank, [5] * (rank + 1), shape=(4,)):
        layer(x.float())
    expected = [_gather(t)[0] for t in (layer.running_mean, layer.running_var)]
    batchnorm.sync_buffers(torch.nn.Sequential(layer), "broadcast")
    assert torch.equal(layer.running_mean, expected[0])
    assert torch.equal(layer.running_var, expected[1])
    assert int(layer.num_batches_tracked) == 1


def _model():
    torch.manual_seed(3)  # the same weights on every rank
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        batchnorm.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(64, 5),
        torch.nn.BatchNorm1d(5),
    ).double()  # fmt: skip


# Rank 0: three batches; rank 1: two, and one of a single sample (skipped, as in one process).
SHARDS = {0: [6, 4, 5], 1: [7, 1, 3]}


def _check_recalibrate(rank):
    """recalibrate(process_group=WORLD) on each rank's shard equals recalibrate over the
    concatenated shards in one process, both estimators, on every rank (fvcore#152)."""
    everything = [x for r in range(WORLD) for x in _batches(50 + r, SHARDS[r])]
    mine = _batches(50 + rank, SHARDS[rank])
    for estimator in ("algorithm2", "pooled"):
        model, ref = _model(), _model()
        with pytest.warns(UserWarning, match="skipped 1 batch"):
            used = batchnorm.recalibrate(
                model, mine, estimator=estimator, progress=False, process_group=dist.group.WORLD
            )
        with pytest.warns(UserWarning, match="skipped 1 batch"):
            expected = batchnorm.recalibrate(ref, everything, estimator=estimator, progress=False)
        assert used == expected == 5
        for a, b in zip(model.buffers(), ref.buffers(), strict=True):
            torch.testing.assert_close(a, b, **TOL)


def _check_diagnose(rank):
    """diagnose(process_group=WORLD) reports, on every rank, what one process reports over
    the concatenated shards: per-layer statistics, the output gap and the problems."""
    everything = [x for r in range(WORLD) for x in _batches(60 + r, SHARDS[r])]
    mine = _batches(60 + rank, SHARDS[rank])
    model = _model()
    with torch.no_grad():
        model[1].running_mean.add_(1.5)  # a stale layer, for a problem to report
    with pytest.warns(UserWarning, match="skipped 1 batch"):
        report = batchnorm.diagnose(
            copy.deepcopy(model), mine, progress=False, process_group=dist.group.WORLD
        )
    with pytest.warns(UserWarning, match="skipped 1 batch"):
        expected = batchnorm.diagnose(model, everything, progress=False)
    got, want = report.to_dict(), expected.to_dict()
    assert got.keys() == want.keys()
    _assert_close_tree(got, want)
    assert [p.kind for p in report.problems] == [p.kind for p in expected.problems]


def _assert_close_tree(a, b, path="report"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_close_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12, nan_ok=True), path
    else:
        assert a == b, path


CHECKS = {
    "ddp ours broadcast_buffers=True": lambda r: _ddp_case(r, batchnorm.BatchNorm2d, True),
    "ddp ours broadcast_buffers=False": lambda r: _ddp_case(r, batchnorm.BatchNorm2d, False),
    "ddp torch broadcast_buffers=True": lambda r: _ddp_case(r, torch.nn.BatchNorm2d, True),
    "ddp sync broadcast_buffers=True": lambda r: _ddp_case(r, SyncBatchNorm, True),
    "ddp sync broadcast_buffers=False": lambda r: _ddp_case(r, SyncBatchNorm, False),
    "fsdp2 bf16 ours": lambda r: _fsdp_case(r, batchnorm.BatchNorm2d),
    "fsdp2 bf16 sync": lambda r: _fsdp_case(r, SyncBatchNorm),
    "sync_buffers average": _check_sync_buffers_average,
    "sync_buffers broadcast": _check_sync_buffers_broadcast,
    "recalibrate process_group": _check_recalibrate,
    "diagnose process_group": _check_diagnose,
}


def _worker(rank, port, results):
    _init(rank, port, pg_timeout=20.0)
    report = {}
    for name, check in CHECKS.items():
        try:
            check(rank)
            report[name] = None
        except (Exception, pytest.fail.Exception) as err:  # reported to the parent, test by test
            report[name] = f"rank {rank}: {type(err).__name__}: {err}"[:2000]
        dist.barrier()  # a check that failed on one rank must not desynchronize the next
    results.put(report)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    _launch(_worker, queue, deadline=90.0)
    reports = [queue.get() for _ in range(WORLD) if not queue.empty()]
    merged = {name: [r[name] for r in reports if r[name]] for name in CHECKS}
    if len(reports) < WORLD:
        for errors in merged.values():
            errors.append(f"only {len(reports)} of {WORLD} ranks reported")
    return merged


@pytest.mark.parametrize("check", list(CHECKS))
def test_two_ranks(check, results):
    assert not results[check], "\n".join(results[check])


def test_sync_buffers_refuses_unknown_mode():
    with pytest.raises(ValueError, match=r"mode must be one of \['average', 'broadcast'\]"):
        batchnorm.sync_buffers(torch.nn.BatchNorm1d(3), "mean")


def test_sync_buffers_without_process_group_does_nothing():
    layer = torch.nn.BatchNorm1d(3)
    layer(torch.randn(4, 3))
    before = layer.running_mean.clone()
    assert batchnorm.sync_buffers(layer, "average") == 0
    assert torch.equal(layer.running_mean, before)


def test_recalibrate_process_group_needs_initialized_distributed():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        batchnorm.recalibrate(
            torch.nn.BatchNorm1d(3), [torch.randn(4, 3)], progress=False, process_group=object()
        )


def _accelerate_worker(rank, port, results):
    """HF Accelerate on 2 CPU processes: our SyncBatchNorm through `accelerator.prepare`
    trains 2 steps; its running statistics are identical on both ranks and equal torch's BN
    fed the concatenated BN input of both ranks (captured by a hook)."""
    import os

    from accelerate import Accelerator

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
    )  # fmt: skip
    try:
        torch.set_num_threads(1)
        accelerator = Accelerator(cpu=True)
        assert accelerator.num_processes == WORLD, accelerator.state
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(27, 2),
        )  # fmt: skip
        net = SyncBatchNorm.convert_sync_batchnorm(net)
        bn = net[1]
        seen = []
        bn.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
        g = torch.Generator().manual_seed(7)
        data = torch.utils.data.TensorDataset(torch.randn(32, 2, 3, 3, generator=g))
        loader = torch.utils.data.DataLoader(data, batch_size=8)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        model, opt, loader = accelerator.prepare(net, opt, loader)
        ref = torch.nn.BatchNorm2d(3)
        for step, (x,) in enumerate(loader):
            if step == 2:
                break
            loss = model(x).square().mean()
            opt.zero_grad()
            accelerator.backward(loss)
            opt.step()
            ref(torch.cat(_gather(seen[-1])))
        assert type(accelerator.unwrap_model(model)[1]) is SyncBatchNorm
        a, b = _gather(bn.running_mean)
        assert torch.equal(a, b)
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-6, atol=1e-7)
        results.put(None)
    except Exception as err:
        results.put(f"rank {rank}: {type(err).__name__}: {err}"[:2000])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_accelerate_trains_sync_batchnorm_on_two_cpu_processes():
    """A trainer users run (issue 17, item 5): HF Accelerate, 2 CPU processes, gloo."""
    import accelerate  # noqa: F401  (a dev dependency: a missing install fails here, not skips)
    queue = mp.get_context("spawn").SimpleQueue()
    _launch(_accelerate_worker, queue, deadline=90.0)
    errors = [e for e in (queue.get() for _ in range(WORLD)) if e]
    assert not errors, "\n".join(errors)
