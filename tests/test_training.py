"""BN in training loops (batchnorm.training): deferred commits over micro-batches and repeated
forwards against one forward over the concatenated batch, checkpoint recomputation against the
run without checkpointing, EMA updates against a hand-computed reference and torch's
AveragedModel. float64 throughout: only rounding differs from the oracles."""

from __future__ import annotations

import copy
import datetime
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.checkpoint import checkpoint

import batchnorm
from batchnorm import functional as F

TOL = dict(rtol=1e-10, atol=1e-12)
D = torch.float64


def _state(layer) -> dict:
    """Everything a commit writes: running statistics and both counters."""
    return {
        "running_mean": layer.running_mean.clone(),
        "running_var": layer.running_var.clone(),
        "num_batches_tracked": int(layer.num_batches_tracked),
        "num_batches_skipped": int(layer.num_batches_skipped),
    }


def _assert_same_state(a, b):
    sa, sb = _state(a), _state(b)
    torch.testing.assert_close(sa.pop("running_mean"), sb.pop("running_mean"), **TOL)
    torch.testing.assert_close(sa.pop("running_var"), sb.pop("running_var"), **TOL)
    assert sa == sb


# One declaration of the deferral cases: (layer factory, micro-batch shapes, mask or not).
# Micro-batches are uneven on purpose: the merge must weigh them by their counts.
CASES = {
    "1d": (lambda: batchnorm.BatchNorm1d(5), [(3, 5), (7, 5), (6, 5)], False),
    "1d-sequence": (lambda: batchnorm.BatchNorm1d(4), [(2, 4, 3), (5, 4, 3)], False),
    "2d": (lambda: batchnorm.BatchNorm2d(3), [(2, 3, 4, 4), (5, 3, 4, 4), (1, 3, 4, 4)], False),
    "2d-paper": (
        lambda: batchnorm.BatchNorm2d(3, backward="paper"),
        [(4, 3, 2, 2), (3, 3, 2, 2)],
        False,
    ),
    "2d-momentum-None": (
        lambda: batchnorm.BatchNorm2d(3, momentum=None),
        [(4, 3, 3, 3), (2, 3, 3, 3), (6, 3, 3, 3)],
        False,
    ),
    "3d": (lambda: batchnorm.BatchNorm3d(2), [(2, 2, 2, 3, 3), (3, 2, 2, 3, 3)], False),
    "channels-last": (lambda: batchnorm.BatchNorm(4, axis=-1), [(3, 5, 4), (6, 5, 4)], False),
    "mask": (lambda: batchnorm.BatchNorm(4, axis=-1), [(3, 6, 4), (5, 6, 4), (2, 6, 4)], True),
    "ghost": (
        lambda: batchnorm.BatchNorm2d(3, virtual_batch_size=4),
        [(8, 3, 2, 2), (4, 3, 2, 2), (12, 3, 2, 2)],
        False,
    ),
    "renorm": (
        lambda: batchnorm.BatchRenorm2d(3, momentum=0.3),
        [(4, 3, 3, 3), (6, 3, 3, 3)],
        False,
    ),
    "act": (lambda: batchnorm.BatchNormAct2d(3), [(3, 3, 2, 2), (5, 3, 2, 2)], False),
}


def _data(shapes, masked, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=g, dtype=D) * 2 + 3 for s in shapes]
    masks = [torch.rand(s[:-1], generator=g) < 0.7 for s in shapes] if masked else None
    return xs, masks


def _layer(make, randomize):
    layer = randomize(make().to(D))
    if isinstance(layer, batchnorm.BatchRenorm2d):
        layer.r_max, layer.d_max = 1.5, 0.5  # active clipping: the running stats matter
    return layer


def _call(layer, x, mask):
    return layer(x) if mask is None else layer(x, mask=mask)


@pytest.mark.parametrize("case", list(CASES))
def test_accumulate_commits_one_forward_over_the_logical_batch(case, randomize):
    """Two logical steps of uneven micro-batches leave the running statistics and counters
    of two forwards over the concatenated micro-batches."""
    make, shapes, masked = CASES[case]
    deferred = _layer(make, randomize)
    oracle = copy.deepcopy(deferred)
    for step in range(2):
        xs, masks = _data(shapes, masked, seed=step)
        with batchnorm.accumulate(deferred):
            for i, x in enumerate(xs):
                _call(deferred, x, masks[i] if masked else None)
            _assert_same_state(deferred, oracle)  # nothing moves before the step ends
        _call(oracle, torch.cat(xs), torch.cat(masks) if masked else None)
        _assert_same_state(deferred, oracle)
    assert deferred._pending is None  # the with block ends the deferral


@pytest.mark.parametrize("case", list(CASES))
def test_accumulate_keeps_outputs_and_gradients(case, randomize):
    """Normalization stays per micro-batch: outputs and gradients equal the loop without it."""
    make, shapes, masked = CASES[case]
    a = _layer(make, randomize)
    b = copy.deepcopy(a)
    xs, masks = _data(shapes, masked, seed=3)
    xa = [x.clone().requires_grad_() for x in xs]
    xb = [x.clone().requires_grad_() for x in xs]
    weights = [torch.randn(x.shape, dtype=D) for x in xs]
    with batchnorm.accumulate(a):
        for i, x in enumerate(xa):
            (_call(a, x, masks[i] if masked else None) * weights[i]).sum().backward()
    outputs_b = []
    for i, x in enumerate(xb):
        # b commits each forward; Batch Renorm's output then reads moved statistics, so
        # compare it only on the first micro-batch (the others differ by design).
        y = _call(b, x, masks[i] if masked else None)
        (y * weights[i]).sum().backward()
        outputs_b.append(y)
    first_only = isinstance(a, batchnorm.BatchRenorm2d)
    for i, (x_a, x_b) in enumerate(zip(xa, xb, strict=True)):
        if first_only and i > 0:
            break
        torch.testing.assert_close(x_a.grad, x_b.grad, **TOL)
    if not first_only:
        torch.testing.assert_close(a.weight.grad, b.weight.grad, **TOL)
        torch.testing.assert_close(a.bias.grad, b.bias.grad, **TOL)


def test_accumulate_nonfinite_micro_batch_skips_the_whole_step_counted_once():
    layer = batchnorm.BatchNorm1d(3).to(D)
    before = _state(layer)
    xs = [torch.randn(4, 3, dtype=D) for _ in range(3)]
    xs[1][2, 1] = float("nan")
    with batchnorm.accumulate(layer):
        for x in xs:
            layer(x)
    after = _state(layer)
    torch.testing.assert_close(after["running_mean"], before["running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(after["running_var"], before["running_var"], rtol=0, atol=0)
    assert (after["num_batches_tracked"], after["num_batches_skipped"]) == (0, 1)
    xs[1][2, 1] = float("inf")
    with batchnorm.accumulate(layer):
        for x in xs:
            layer(x)
    assert (int(layer.num_batches_tracked), int(layer.num_batches_skipped)) == (0, 2)
    # A clean step afterwards commits normally.
    oracle = copy.deepcopy(layer)
    good = [torch.randn(4, 3, dtype=D) for _ in range(2)]
    with batchnorm.accumulate(layer):
        for x in good:
            layer(x)
    oracle(torch.cat(good))
    _assert_same_state(layer, oracle)


def test_accumulate_step_and_steps_commit_per_logical_step(randomize):
    """`.step()` next to optimizer.step(), and steps=k counting the model's forwards, give the
    commits of one forward per logical step; a remainder commits on exit."""
    net = nn.Sequential(nn.Linear(4, 6), batchnorm.BatchNorm1d(6, momentum=None)).to(D)
    randomize(net[1])
    by_step, by_steps, oracle = copy.deepcopy(net), copy.deepcopy(net), copy.deepcopy(net)
    micro = list(torch.randn(10 * 3, 4, dtype=D).chunk(10))
    acc = batchnorm.accumulate(by_step)
    for i, x in enumerate(micro):
        by_step(x)
        if (i + 1) % 4 == 0:
            acc.step()
    acc.close()
    with batchnorm.accumulate(by_steps, steps=4):
        for i, x in enumerate(micro):
            by_steps(x)
            if i == 5:  # an evaluation in between is not a micro-batch
                by_steps.eval()
                by_steps(x)
                by_steps.train()
    for group in (micro[0:4], micro[4:8], micro[8:10]):
        oracle(torch.cat(group))
    for deferred in (by_step, by_steps):
        _assert_same_state(deferred[1], oracle[1])
        assert int(deferred[1].num_batches_tracked) == 3
    # After close the layer commits each forward again.
    by_step(micro[0])
    oracle(micro[0])
    _assert_same_state(by_step[1], oracle[1])


def test_repeated_forwards_gan_discriminator(randomize):
    """A discriminator called on real and fake batches in one step: today each call commits
    (two momentum steps); inside accumulate the step commits once, as D(cat(real, fake))."""
    disc = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), nn.LeakyReLU(0.2)).to(D)
    randomize(disc[1])
    real, fake = torch.randn(6, 3, 5, 5, dtype=D), torch.randn(6, 3, 5, 5, dtype=D) + 1
    once, oracle, each = copy.deepcopy(disc), copy.deepcopy(disc), copy.deepcopy(disc)
    with batchnorm.accumulate(once):
        (once(real).mean() - once(fake).mean()).backward()
    oracle(torch.cat([real, fake]))
    _assert_same_state(once[1], oracle[1])
    each(real), each(fake)  # the documented default: two commits
    assert int(each[1].num_batches_tracked) == 2
    assert not torch.allclose(each[1].running_var, oracle[1].running_var)


def test_accumulate_exception_discards_and_stops_deferring():
    layer = batchnorm.BatchNorm1d(3).to(D)
    with pytest.raises(KeyError), batchnorm.accumulate(layer):
        layer(torch.randn(4, 3, dtype=D))
        raise KeyError("interrupted step")
    assert int(layer.num_batches_tracked) == 0 and layer._pending is None
    layer(torch.randn(4, 3, dtype=D))
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("ghost", [None, 2])
def test_diagnose_and_recalibrate_inside_an_open_accumulate_are_not_micro_batches(ghost):
    # Before: the passes' forwards (training mode, to record batch statistics) handed their
    # statistics to the pending step, so the commit merged diagnose's batches with the
    # micro-batches. Now the deferral is suspended during a pass.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), batchnorm.BatchNorm1d(3, virtual_batch_size=ghost))
    model = model.to(D)
    ref = copy.deepcopy(model)
    micro = [torch.randn(4, 4, dtype=D) for _ in range(2)]
    other = [torch.randn(8, 4, dtype=D) * 3 + 2 for _ in range(3)]
    with batchnorm.accumulate(model) as acc:
        model(micro[0])
        batchnorm.diagnose(model, other)
        model(micro[1])
        acc.step()
        assert model[1]._pending is not None  # still deferring after the pass
    with batchnorm.accumulate(ref) as acc:
        for x in micro:
            ref(x)
        acc.step()
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var)
    assert int(model[1].num_batches_tracked) == int(ref[1].num_batches_tracked) == 1
    with batchnorm.accumulate(model):
        model(micro[0])
        batchnorm.recalibrate(model, other)  # sets the population statistics of `other`
        expected = copy.deepcopy(model)  # a copy commits each forward (no pending step)
    # The step at exit commits micro[0] alone, on top of the recalibrated statistics.
    expected(micro[0])
    torch.testing.assert_close(model[1].running_mean, expected[1].running_mean)
    torch.testing.assert_close(model[1].running_var, expected[1].running_var)
    assert int(model[1].num_batches_tracked) == int(expected[1].num_batches_tracked)


def test_accumulate_refusals():
    with pytest.raises(TypeError, match="batchnorm.convert"):
        batchnorm.accumulate(nn.Sequential(nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="no BN layer with running statistics"):
        batchnorm.accumulate(nn.Sequential(batchnorm.BatchNorm1d(3, track_running_stats=False)))
    with pytest.raises(ValueError, match="steps must be a positive int"):
        batchnorm.accumulate(batchnorm.BatchNorm1d(3), steps=0)
    layer = batchnorm.BatchNorm1d(3)
    with batchnorm.accumulate(layer), pytest.raises(RuntimeError, match="already defer"):
        batchnorm.accumulate(layer)
    acc = batchnorm.accumulate(layer)
    acc.close()
    with pytest.raises(RuntimeError, match="closed"):
        acc.step()


def test_accumulate_takes_the_transform_path_not_the_fused_kernel(monkeypatch):
    """torch's kernel commits in place; while deferring it must not run (the transform does)."""
    layer = batchnorm.BatchNorm2d(3)
    calls = []
    real = torch.native_batch_norm

    def spy(*args, **kwargs):
        calls.append(args[3] is not None)  # running_mean passed: the kernel would commit
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "native_batch_norm", spy)
    with batchnorm.accumulate(layer):
        layer(torch.randn(4, 3, 2, 2))
    assert True not in calls
    layer(torch.randn(4, 3, 2, 2))
    assert calls[-1] is True  # outside, the fast path is back


# ---------------------------------------------------------------------------------------------
# SyncBatchNorm: 2 gloo ranks on 127.0.0.1, each accumulating uneven micro-batches


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank, port, shapes, path):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo0" if sys.platform == "darwin" else "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=30),
    )  # fmt: skip
    try:
        layer = batchnorm.SyncBatchNorm(3, momentum=None).to(D)
        g = torch.Generator().manual_seed(0)
        data = [[torch.randn(s, generator=g, dtype=D) + r for s in shapes[r]] for r in range(2)]
        with batchnorm.accumulate(layer):
            for x in data[rank]:
                layer(x)
        if rank == 0:
            torch.save({"state": _state(layer), "data": data}, path)
    finally:
        dist.destroy_process_group()


def test_accumulate_sync_batchnorm_two_ranks(tmp_path):
    """Each rank's forward already merges over ranks; deferral merges the forwards: the
    commit equals one process's forward over every rank's every micro-batch."""
    shapes = [[(2, 3, 2, 2), (5, 3, 2, 2)], [(3, 3, 2, 2), (0, 3, 2, 2)]]
    path = tmp_path / "rank0.pt"
    ctx = mp.start_processes(
        _sync_worker, args=(_free_port(), shapes, str(path)), nprocs=2, join=False,
        start_method="spawn",
    )  # fmt: skip
    end = time.monotonic() + 60
    while not ctx.join(timeout=max(0.1, end - time.monotonic())):
        if time.monotonic() >= end:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed test did not finish within 60 s")
    got = torch.load(path)
    oracle = batchnorm.BatchNorm2d(3, momentum=None).to(D)
    oracle(torch.cat([x for rank in got["data"] for x in rank]))
    state = got["state"]
    torch.testing.assert_close(state["running_mean"], oracle.running_mean, **TOL)
    torch.testing.assert_close(state["running_var"], oracle.running_var, **TOL)
    assert (state["num_batches_tracked"], state["num_batches_skipped"]) == (1, 0)


# ---------------------------------------------------------------------------------------------
# checkpoint recomputation


def _block(ours: bool, momentum):
    bn = batchnorm.BatchNorm2d if ours else nn.BatchNorm2d
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), bn(4, momentum=momentum), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), bn(4, momentum=momentum),
    ).to(D)  # fmt: skip


def _train(net, xs, use_checkpoint, reentrant):
    grads = []
    for x in xs:
        x = x.clone().requires_grad_()
        y = checkpoint(net, x, use_reentrant=reentrant) if use_checkpoint else net(x)
        (y * torch.arange(y.numel(), dtype=D).reshape(y.shape).sin()).sum().backward()
        grads.append(x.grad)
    return grads


def _assert_same_run(a, b, grads_a, grads_b):
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, **TOL)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, **TOL)
    for ma, mb in zip(a.modules(), b.modules(), strict=True):
        if isinstance(ma, nn.modules.batchnorm._BatchNorm):
            torch.testing.assert_close(ma.running_mean, mb.running_mean, **TOL)
            torch.testing.assert_close(ma.running_var, mb.running_var, **TOL)
            assert int(ma.num_batches_tracked) == int(mb.num_batches_tracked) == 3


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("ours", [True, False], ids=["ours", "torch.nn"])
def test_checkpoint_commits_once_per_real_forward(ours, momentum, reentrant):
    """Under torch.utils.checkpoint (reentrant and not) running statistics, counters and
    gradients equal the run without checkpointing: ours by themselves, torch.nn's layers
    inside checkpoint_safe."""
    torch.manual_seed(0)
    plain = _block(ours, momentum)
    ckpt = copy.deepcopy(plain)
    xs = [torch.randn(4, 3, 5, 5, dtype=D) + 1 for _ in range(3)]
    grads_plain = _train(plain, xs, False, reentrant)
    with batchnorm.checkpoint_safe(ckpt):
        grads_ckpt = _train(ckpt, xs, True, reentrant)
    _assert_same_run(plain, ckpt, grads_plain, grads_ckpt)
    assert all(not h for h in (ckpt[1]._forward_pre_hooks, ckpt[1]._forward_hooks))


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_torch_nn_without_the_helper_commits_twice(reentrant):
    """What checkpoint_safe fixes (pytorch#96136): torch.nn's layer commits the recompute."""
    torch.manual_seed(0)
    plain = _block(False, 0.1)
    ckpt = copy.deepcopy(plain)
    xs = [torch.randn(4, 3, 5, 5, dtype=D) + 1]
    _train(plain, xs, False, reentrant)
    _train(ckpt, xs, True, reentrant)
    assert not torch.allclose(plain[1].running_mean, ckpt[1].running_mean)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_batch_renorm_inside_accumulate(reentrant, randomize):
    """Batch Renorm reads the running statistics: inside accumulate the recomputation sees
    the same ones as the real forward, so the checkpointed run equals the plain one."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchRenorm2d(4, momentum=0.3)).to(D)
    randomize(plain[1])
    plain[1].r_max, plain[1].d_max = 1.2, 0.2
    ckpt = copy.deepcopy(plain)
    xs = [torch.randn(4, 3, 5, 5, dtype=D) + 1 for _ in range(3)]
    grads_plain = _train(plain, xs, False, reentrant)
    grads_ckpt = []
    for x in xs:
        with batchnorm.accumulate(ckpt):
            grads_ckpt += _train(ckpt, [x], True, reentrant)
    _assert_same_run(plain, ckpt, grads_plain, grads_ckpt)


def test_accumulate_with_checkpoint_does_not_merge_the_recompute(randomize):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4)).to(D)
    randomize(net[1])
    oracle = copy.deepcopy(net)
    xs = [torch.randn(3, 3, 5, 5, dtype=D) for _ in range(2)]
    with batchnorm.accumulate(net):
        _train(net, xs, True, False)
    oracle(torch.cat(xs))
    _assert_same_state(net[1], oracle[1])


# ---------------------------------------------------------------------------------------------
# EMA models and target networks


def _net(ours: bool):
    bn = batchnorm.BatchNorm1d if ours else nn.BatchNorm1d
    return nn.Sequential(nn.Linear(4, 6), bn(6), nn.ReLU(), nn.Linear(6, 2)).to(D)


def _train_steps(net, steps, seed=0):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(16, 4, generator=g, dtype=D) * 3 + 2).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("buffers", ["copy", "ema"])
@pytest.mark.parametrize("ours", [True, False], ids=["ours", "torch.nn"])
def test_ema_update_against_a_hand_reference(ours, buffers):
    torch.manual_seed(0)
    net = _net(ours)
    ema = copy.deepcopy(net)
    ref = {k: v.clone() for k, v in ema.state_dict().items()}
    decay = 0.9
    for step in range(4):
        _train_steps(net, 1, seed=step)
        batchnorm.ema_update(ema, net, decay, buffers)
        for k, v in net.state_dict().items():
            averaged = "weight" in k or "bias" in k
            averaged |= buffers == "ema" and ("running_mean" in k or "running_var" in k)
            ref[k] = decay * ref[k] + (1 - decay) * v if averaged else v.clone()
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, ref[k], **TOL)
    assert int(ema[1].num_batches_tracked) == int(net[1].num_batches_tracked) == 4


@pytest.mark.parametrize("ours", [True, False], ids=["ours", "torch.nn"])
def test_ema_update_matches_averaged_model(ours):
    """torch's AveragedModel with get_ema_multi_avg_fn: use_buffers=False is our "copy";
    use_buffers=True averages the float buffers as our "ema" does (it also averages the
    integer counter, which we copy instead)."""
    torch.manual_seed(0)
    net = _net(ours)
    for buffers, use_buffers in (("copy", False), ("ema", True)):
        ema = copy.deepcopy(net)
        swa = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=use_buffers)
        swa.update_parameters(net)  # AveragedModel's first update copies
        for step in range(3):
            _train_steps(net, 1, seed=10 + step)
            batchnorm.ema_update(ema, net, 0.8, buffers)
            swa.update_parameters(net)
        for (k, a), b in zip(ema.state_dict().items(), swa.module.state_dict().values()):
            if k.endswith("num_batches_tracked"):
                assert int(a) == int(net[1].num_batches_tracked)
                continue
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("ours", [True, False], ids=["ours", "torch.nn"])
def test_ema_update_recalibrate_equals_recalibrating_the_ema(ours):
    torch.manual_seed(0)
    net = _net(ours)
    ema = copy.deepcopy(net)
    _train_steps(net, 3)
    batches = [torch.randn(8, 4, dtype=D) for _ in range(3)]
    oracle = copy.deepcopy(ema)
    batchnorm.ema_update(ema, net, 0.5, "recalibrate", batches=batches)
    batchnorm.ema_update(oracle, net, 0.5, "copy")
    batchnorm.recalibrate(oracle, batches, progress=False)
    for a, b in zip(ema.state_dict().values(), oracle.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, **TOL)
    # Population statistics of the averaged weights: the first BN's input is Linear(x).
    h = torch.cat([ema[0](x) for x in batches]).detach()
    stats = [F.batch_stats(ema[0](x).detach(), 1) for x in batches]
    expected_mean = torch.stack([s.mean for s in stats]).mean(0)
    torch.testing.assert_close(ema[1].running_mean, expected_mean, **TOL)
    assert h.shape == (24, 6)


@pytest.mark.parametrize("ours", [True, False], ids=["ours", "torch.nn"])
def test_ema_missing_bn_buffers_regression(ours):
    """ignite#2590: an EMA of the parameters alone keeps the copy's initial running
    statistics (0 and 1), so its eval mode normalizes with the wrong statistics. With
    ema_update the buffers follow, and a decay-0 update is the model itself (a target
    network's hard update) in eval mode."""
    torch.manual_seed(0)
    net = _net(ours)
    ema = copy.deepcopy(net)
    _train_steps(net, 5)
    params_only = copy.deepcopy(ema)
    with torch.no_grad():
        for p_ema, p in zip(params_only.parameters(), net.parameters(), strict=True):
            p_ema.lerp_(p, 0.5)
    assert torch.equal(params_only[1].running_mean, torch.zeros(6, dtype=D))  # the bug
    for buffers in ("copy", "ema"):
        target = copy.deepcopy(ema)
        batchnorm.ema_update(target, net, 0.0, buffers)
        x = torch.randn(10, 4, dtype=D)
        net.eval(), target.eval()
        torch.testing.assert_close(target(x), net(x), **TOL)
        net.train()
        assert not torch.equal(target[1].running_mean, torch.zeros(6, dtype=D))


def test_ema_update_refusals():
    net = _net(True)
    with pytest.raises(ValueError, match="decay must be a number in"):
        batchnorm.ema_update(copy.deepcopy(net), net, 1.5)
    with pytest.raises(ValueError, match="buffers must be one of"):
        batchnorm.ema_update(copy.deepcopy(net), net, 0.9, "average")
    with pytest.raises(ValueError, match="needs batches"):
        batchnorm.ema_update(copy.deepcopy(net), net, 0.9, "recalibrate")
    other = nn.Sequential(nn.Linear(4, 6), batchnorm.BatchNorm1d(6)).to(D)
    with pytest.raises(ValueError, match="parameters differ"):
        batchnorm.ema_update(other, net, 0.9)
    wide = _net(True)
    wide[3] = nn.Linear(6, 3).to(D)
    before = copy.deepcopy(wide.state_dict())
    with pytest.raises(ValueError, match="has shape"):
        batchnorm.ema_update(wide, net, 0.9)
    for k, v in wide.state_dict().items():  # refused before anything was written
        assert torch.equal(v, before[k])


def test_a_copy_made_while_accumulating_commits_each_forward():
    """copy.deepcopy (an EMA model made inside the step) or a pickle of a deferring layer is
    not part of the accumulate: it commits each forward."""
    net = nn.Sequential(nn.Linear(3, 4), batchnorm.BatchNorm1d(4)).to(D)
    with batchnorm.accumulate(net):
        net(torch.randn(5, 3, dtype=D))
        twin = copy.deepcopy(net)
        twin(torch.randn(5, 3, dtype=D))
        assert int(twin[1].num_batches_tracked) == 1
    assert int(net[1].num_batches_tracked) == 1


def test_accumulate_under_torch_compile(randomize):
    """A compiled model defers too (dynamo guards on the pending slot and recompiles)."""
    net = nn.Sequential(nn.Linear(4, 6), batchnorm.BatchNorm1d(6)).to(D)
    randomize(net[1])
    oracle = copy.deepcopy(net)
    compiled = torch.compile(net, backend="eager")
    xs = [torch.randn(n, 4, dtype=D) for n in (3, 8, 5)]
    compiled(xs[0]), oracle(xs[0])
    with batchnorm.accumulate(net):
        for x in xs:
            compiled(x)
    oracle(torch.cat(xs))
    _assert_same_state(net[1], oracle[1])
