"""batchnorm.diagnose and batchnorm.monitor: each scenario is built by hand and must give the
right kind of problem on the right layer and nothing else; measurements are checked against
float64 statistics of the concatenated data, recalibrate's own output and torch.quantile."""

from __future__ import annotations

import ast
import copy
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.diagnose import KINDS, Thresholds, diagnose, monitor

pytestmark = pytest.mark.usefixtures("one_thread")

# Layer names in `convnet()`: ours, torch.nn's, ours.
CONV_BN, TORCH_BN, HEAD_BN = "1", "4", "9"


def convnet(seed: int = 0) -> nn.Sequential:
    """Conv -> our BN2d -> ReLU -> Conv -> torch's BN2d -> ReLU -> Flatten -> Linear -> our BN1d.

    The head's BN1d sees one value per channel per example (m = batch size); the conv BNs
    see batch x 36 values, so with tiny batches only the head is noisy.
    """
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        batchnorm.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(8 * 36, 6),
        batchnorm.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )


def batches(n: int = 12, size: int = 32, seed: int = 1, scale: float = 1.0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            scale * (torch.randn(size, 3, 6, 6, generator=g) * 2 + 0.5),
            torch.randint(3, (size,), generator=g),
        )
        for _ in range(n)
    ]


def healthy(data=None, seed: int = 0) -> nn.Sequential:
    model = convnet(seed)
    batchnorm.recalibrate(model, data if data is not None else batches(), progress=False)
    return model.eval()


def found(report) -> list[tuple[str, str]]:
    return sorted((p.layer, p.kind) for p in report.problems)


def snapshot(model: nn.Module):
    buffers = {k: v.clone() for k, v in model.named_buffers()}  # num_batches_skipped included
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    return buffers, params, modes


def assert_same(model: nn.Module, snap) -> None:
    buffers, params, modes = snap
    now = dict(model.named_buffers())
    assert now.keys() == buffers.keys()
    for k, v in buffers.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), params[k]), k
    assert [m.training for m in model.modules()] == modes


# --------------------------------------------------------------------------------------------
# diagnose: scenarios
# --------------------------------------------------------------------------------------------


def test_healthy_recalibrated_model_has_no_problems():
    data = batches()
    model = healthy(data)
    report = diagnose(model, data, progress=False)
    assert report.problems == []
    assert list(report.layers) == [CONV_BN, TORCH_BN, HEAD_BN]
    for d in report.layers.values():
        # Same data, same estimator as recalibrate: the population is the running statistics.
        torch.testing.assert_close(d.population_mean, d.running_mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(d.population_var, d.running_var, rtol=1e-5, atol=1e-6)
        assert d.stale_max < 1e-3 and d.batches == len(data)
    assert "no problems found" in str(report)


def test_running_statistics_shifted_by_hand_on_one_layer():
    data = batches()
    model = healthy(data)
    bn = model[int(TORCH_BN)]
    with torch.no_grad():
        bn.running_mean[2] += 0.6 * bn.running_var[2].sqrt()  # one channel, 0.6 std
    report = diagnose(model, data, progress=False)
    assert found(report) == [(TORCH_BN, "stale_statistics")]
    d = report.layers[TORCH_BN]
    assert d.mean_shift[2].item() == pytest.approx(0.6, abs=2e-3)
    assert report.problems[0].numbers["channels"] == [2]
    assert report.problems[0].severity == pytest.approx(d.stale_max / 0.25)
    assert "batchnorm.recalibrate(model, loader)" in report.problems[0].message
    # The layers after it are measured under batch statistics, so they stay clean.
    assert report.layers[HEAD_BN].stale_max < 1e-3


def test_eval_data_with_a_different_scale():
    data = batches()
    model = healthy(data)
    shifted = [(3 * x, y) for x, y in data]
    report = diagnose(model, shifted, progress=False)
    assert found(report) == [(CONV_BN, "stale_statistics")]
    # conv(3x) = 3 conv_w(x) + b: the population variance grows 9x, the running one does not.
    ratio = report.layers[CONV_BN].var_ratio
    assert torch.allclose(ratio, torch.full_like(ratio, 1 / 9), rtol=1e-3)
    assert report.output_gap > 0.2
    # Recalibrating on the new data is the fix the message names.
    batchnorm.recalibrate(model, shifted, progress=False)
    assert diagnose(model, shifted, progress=False).problems == []


def test_layer_trained_with_tiny_batches():
    data = batches(n=40, size=4)
    model = convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for x, y in data:  # really trained with batches of 4
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    batchnorm.recalibrate(model, data, progress=False)
    report = diagnose(model, data, progress=False)
    assert found(report) == [(HEAD_BN, "small_batch")]
    d = report.layers[HEAD_BN]
    assert d.values_per_channel == 4
    assert d.noise > 0.35 and report.layers[CONV_BN].noise < 0.2
    # The same model measured with batches of 64 is not noisy (the threshold is about m).
    big = [(torch.cat([x for x, _ in data[i : i + 16]]), None) for i in range(0, 40, 16)][:2]
    batchnorm.recalibrate(model, big, progress=False)
    assert found(diagnose(model, big, progress=False)) == []


def test_zeroed_gamma_is_a_dead_channel():
    data = batches()
    model = convnet()
    with torch.no_grad():
        model[int(TORCH_BN)].weight[[1, 5]] = 0
    batchnorm.recalibrate(model, data, progress=False)
    report = diagnose(model, data, progress=False)
    assert found(report) == [(TORCH_BN, "dead_channels")]
    assert report.problems[0].numbers["channels"] == [1, 5]
    assert report.layers[TORCH_BN].dead_gamma.nonzero().flatten().tolist() == [1, 5]


def test_constant_input_is_a_dead_channel_and_tiny_input_is_eps_dominated():
    data = batches()
    model = convnet()
    with torch.no_grad():
        model[0].weight[3] = 0  # channel 3 of the first conv: a constant (its bias)
        model[0].bias[3] = 0.7
        model[0].weight[6] *= 1e-4  # channel 6: variance ~1e-8, far below eps = 1e-5
    batchnorm.recalibrate(model, data, progress=False)
    report = diagnose(model, data, progress=False)
    assert found(report) == [(CONV_BN, "dead_channels"), (CONV_BN, "eps_dominated")]
    d = report.layers[CONV_BN]
    assert d.dead_input.nonzero().flatten().tolist() == [3]
    assert d.eps_dominated.nonzero().flatten().tolist() == [6]
    assert 1e-6 * d.eps < d.population_var[6] < d.eps


def test_nan_batch_skipped_by_one_layer():
    data = batches()
    model = healthy(data)
    model.train()
    model[int(HEAD_BN)](torch.full((8, 6), float("nan")))  # a NaN batch reaches this layer only
    model.eval()
    report = diagnose(model, data, progress=False)
    assert found(report) == [(HEAD_BN, "skipped_batches")]
    assert report.problems[0].numbers["num_batches_skipped"] == 1


def test_nan_batch_through_torch_and_our_layers():
    # Ours skip the batch and count it; torch's BN2d is poisoned: stale with infinite severity.
    data = batches()
    model = healthy(data)
    model.train()
    model(torch.full((4, 3, 6, 6), float("nan")))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eval pass of a poisoned model is NaN
        report = diagnose(model, data, progress=False)
    assert found(report) == [
        (CONV_BN, "skipped_batches"),
        (TORCH_BN, "stale_statistics"),
        (HEAD_BN, "skipped_batches"),
    ]
    assert report.problems[0].layer == TORCH_BN and report.problems[0].severity == float("inf")
    json.dumps(report.to_dict(), allow_nan=False)


def test_small_mismatches_in_many_layers_add_up_to_a_train_eval_gap():
    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layers += [nn.Linear(16, 16), batchnorm.BatchNorm1d(16), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(16, 4))
    data = [torch.randn(256, 16) for _ in range(8)]
    batchnorm.recalibrate(model, data, progress=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, batchnorm.BatchNorm1d):
                m.running_mean += 0.15 * m.running_var.sqrt()  # 0.15 std: under 0.25 each
    report = diagnose(model.eval(), data, progress=False)
    assert found(report) == [("", "train_eval_gap")]
    assert all(d.stale_max < 0.25 for d in report.layers.values())
    assert report.accumulated_stale == pytest.approx(0.15 * 8**0.5, rel=0.05)
    assert "(model)" in str(report.problems[0])


def test_frozen_and_sync_layers():
    data = batches()
    model = healthy(data)
    model[int(TORCH_BN)] = nn.SyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(model[int(TORCH_BN)])
    )[0]
    model[int(HEAD_BN)] = batchnorm.FrozenBatchNorm.from_batchnorm(model[int(HEAD_BN)])
    assert diagnose(model, data, progress=False).problems == []
    with torch.no_grad():
        model[int(HEAD_BN)].running_var *= 4
    report = diagnose(model, data, progress=False)
    assert found(report) == [(HEAD_BN, "stale_statistics")]
    d = report.layers[HEAD_BN]
    assert d.mode == "frozen" and d.gap == 0.0
    assert "unfreeze" in report.problems[0].message
    assert report.layers[TORCH_BN].type == "SyncBatchNorm"


# --------------------------------------------------------------------------------------------
# diagnose: measurements, invariants, output
# --------------------------------------------------------------------------------------------


def test_model_unchanged_afterwards():
    data = batches()
    model = convnet()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data[:3]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model[int(HEAD_BN)](torch.full((8, 6), float("nan")))  # num_batches_skipped = 1
    model[1].eval()  # mixed modes must come back as they were
    model[6].eval()
    snap = snapshot(model)
    diagnose(model, data, progress=False)
    assert_same(model, snap)
    # Also when a batch fails halfway through.
    bad = data[:2] + [(torch.randn(4, 5, 6, 6), None)]
    with pytest.raises(RuntimeError):
        diagnose(model, bad, progress=False)
    assert_same(model, snap)


def test_population_statistics_against_float64_oracle():
    data = batches(n=5, size=7)
    data[-1] = (data[-1][0][:3], None)  # an uneven last batch
    model = convnet()
    report = diagnose(model, data, progress=False, estimator="pooled")
    conv = copy.deepcopy(model[0]).double()
    with torch.no_grad():
        h = torch.cat([conv(x.double()) for x, _ in data])  # the first BN's input
    mean = h.mean((0, 2, 3))
    var = h.var((0, 2, 3), unbiased=True)
    d = report.layers[CONV_BN]
    torch.testing.assert_close(d.population_mean, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d.population_var, var, rtol=1e-5, atol=1e-6)
    # Algorithm 2: the mean over batches of mu_B and of m/(m-1) sigma2_B.
    d2 = diagnose(model, data, progress=False).layers[CONV_BN]
    mus = torch.stack([conv(x.double()).mean((0, 2, 3)) for x, _ in data])
    vs = torch.stack([conv(x.double()).var((0, 2, 3), unbiased=True) for x, _ in data])
    torch.testing.assert_close(d2.population_mean, mus.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d2.population_var, vs.mean(0), rtol=1e-5, atol=1e-6)
    # The RMS spread of the batch means, in population std.
    spread = ((mus - mus.mean(0)) ** 2).mean(0).sqrt() / (vs.mean(0) + 1e-5).sqrt()
    torch.testing.assert_close(d2.batch_mean_spread, spread, rtol=1e-4, atol=1e-7)


def test_layer_gap_and_noise_against_direct_computation():
    data = batches(n=4, size=6)
    model = convnet()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 3)
    d = diagnose(model, data, progress=False).layers[CONV_BN]
    eps, rm, rv = 1e-5, model[1].running_mean.double(), model[1].running_var.double()
    gaps, noises = [], []
    with torch.no_grad():
        hs = [model[0](x).double() for x, _ in data]
    pm, pv = d.population_mean.view(1, -1, 1, 1), d.population_var.view(1, -1, 1, 1)
    for h in hs:
        mu = h.mean((0, 2, 3), keepdim=True)
        var = h.var((0, 2, 3), unbiased=False, keepdim=True)
        xb = (h - mu) / (var + eps).sqrt()
        xr = (h - rm.view(1, -1, 1, 1)) / (rv.view(1, -1, 1, 1) + eps).sqrt()
        xp = (h - pm) / (pv + eps).sqrt()
        gaps.append(((xb - xr) ** 2).mean((0, 2, 3)))
        noises.append(((xb - xp) ** 2).mean((0, 2, 3)))
    assert d.gap == pytest.approx(torch.stack(gaps).mean().sqrt().item(), rel=1e-6)
    assert d.noise == pytest.approx(torch.stack(noises).mean().sqrt().item(), rel=1e-6)


def test_output_gap_against_direct_computation():
    data = batches(n=3)
    model = convnet()
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
    report = diagnose(model, data, progress=False)
    batch_stats = copy.deepcopy(model).eval()
    for i in (1, 4, 9):
        batch_stats[i].train()  # BN layers on batch statistics, dropout off
    with torch.no_grad():
        yt = torch.cat([batch_stats(x).double() for x, _ in data])
        ye = torch.cat([model.eval()(x).double() for x, _ in data])
    gap = ((ye - yt) ** 2).mean().sqrt() / yt.std(unbiased=False)
    assert report.output_gap == pytest.approx(gap.item(), rel=1e-5)
    agree = (ye.argmax(1) == yt.argmax(1)).double().mean().item()
    assert report.output_agreement == pytest.approx(agree)


def test_report_outputs(tmp_path):
    data = batches()
    model = healthy(data)
    with torch.no_grad():
        model[int(TORCH_BN)].running_var *= 5
    report = diagnose(model, data, progress=False)
    text = str(report)
    for name in (CONV_BN, TORCH_BN, HEAD_BN):
        assert any(line.startswith(name + " ") for line in text.splitlines())
    assert "stale_statistics" in text
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["problems"][0]["kind"] == "stale_statistics" and d["problems"][0]["layer"] == "4"
    assert len(d["layers"]["4"]["mean_shift"]) == 8
    assert {p.kind for p in report.problems} <= set(KINDS)
    path = tmp_path / "mismatch.png"
    report.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_thresholds_are_arguments():
    data = batches()
    model = healthy(data)
    with torch.no_grad():
        model[int(TORCH_BN)].running_mean += 0.1 * model[int(TORCH_BN)].running_var.sqrt()
    assert diagnose(model, data, progress=False).problems == []
    strict = diagnose(model, data, progress=False, thresholds=Thresholds(stale=0.05))
    assert found(strict) == [(TORCH_BN, "stale_statistics")]


def test_bad_input_is_refused_clearly():
    model = convnet()
    with pytest.raises(TypeError, match="iterable of batches"):
        diagnose(model, torch.randn(4, 3, 6, 6), progress=False)
    with pytest.raises(ValueError, match="no batch"):
        diagnose(model, [], progress=False)
    with pytest.raises(ValueError, match="no BN layer"):
        diagnose(nn.Linear(3, 3), [torch.randn(4, 3)], progress=False)
    with pytest.raises(ValueError, match="estimator"):
        diagnose(model, batches(1), progress=False, estimator="ema")
    with pytest.raises(ValueError, match="batches"):
        diagnose(model, batches(1), batches=0, progress=False)
    with pytest.raises(TypeError, match="first element"):
        diagnose(model, [["a"]], progress=False)


def test_top_level_names_and_import_without_matplotlib():
    assert batchnorm.diagnose is diagnose and batchnorm.monitor is monitor
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import torch, batchnorm\n"
        "m = torch.nn.Sequential(torch.nn.Linear(3, 4), batchnorm.BatchNorm1d(4))\n"
        "r = batchnorm.diagnose(m, [torch.randn(8, 3)], progress=False)\n"
        "print(len(str(r)) > 0)\n"
        "try:\n"
        "    r.plot('unused.png')\n"
        "except ImportError as e:\n"
        "    print('pip install matplotlib' in str(e))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


# --------------------------------------------------------------------------------------------
# monitor
# --------------------------------------------------------------------------------------------


def test_monitor_records_at_the_right_steps():
    model = convnet()
    data = batches(n=10, size=8)
    with monitor(model, every=3) as mon:
        for i, (x, _) in enumerate(data):
            model.train()
            model(x)
            if i % 2:
                model.eval()
                model(x)  # eval passes are neither counted nor recorded
    assert mon.step == 10
    assert set(mon.history) == {CONV_BN, TORCH_BN, HEAD_BN}
    for records in mon.history.values():
        assert [r["step"] for r in records] == [0, 3, 6, 9]


def test_monitor_percentiles_are_ordered_and_exact_when_not_sampled():
    model = convnet()
    captured = []
    model[int(HEAD_BN)].register_forward_pre_hook(lambda m, a: captured.append(a[0].clone()))
    model.train()
    with monitor(model, percentiles=(85, 15, 50)) as mon:  # any order, recorded ascending
        for x, _ in batches(n=3, size=16):
            model(x)
    assert mon.percentiles == (15.0, 50.0, 85.0)
    q = torch.tensor([0.15, 0.5, 0.85])
    for record, x in zip(mon.history[HEAD_BN], captured):
        torch.testing.assert_close(record["percentiles"], torch.quantile(x.reshape(-1), q))
        torch.testing.assert_close(record["per_channel"], torch.quantile(x, q, dim=0))
    for records in mon.history.values():
        for r in records:
            assert (r["percentiles"].diff() >= 0).all()
            assert (r["per_channel"].diff(dim=0) >= 0).all()


def test_monitor_samples_large_inputs_without_touching_the_global_rng():
    model = convnet()
    model.train()
    x = torch.randn(64, 3, 6, 6)  # 64 * 36 = 2304 values per channel at the conv BNs
    state = torch.get_rng_state()
    with monitor(model, max_values=500, layers=[CONV_BN]) as mon:
        model[6].p = 0.0  # no dropout: the forward itself draws no random numbers
        model(x)
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        h = model[0](x)
    exact = torch.quantile(h.transpose(0, 1).reshape(8, -1), torch.tensor([0.15, 0.5, 0.85]), dim=1)
    got = mon.history[CONV_BN][0]["per_channel"]
    assert got.shape == (3, 8)
    # 500 samples: the standard error of a percentile is a few percent of the spread.
    assert ((got - exact).abs() / h.std()).max() < 0.25


def test_monitor_any_module_and_plot(tmp_path):
    model = convnet()
    model.train()
    with monitor(model, layers=["2", "3", HEAD_BN], every=2) as mon:
        for x, _ in batches(n=6, size=8):
            model(x)
    # The ReLU's input is the BN output: zero mean per channel; the next conv's input is >= 0.
    low, _, high = mon.history["2"][0]["percentiles"]
    assert low < 0 < high
    assert (mon.history["3"][0]["per_channel"] >= 0).all()
    path = tmp_path / "fig1bc.png"
    mon.plot(path, layers=["2", HEAD_BN], channel=1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mon.plot(tmp_path / "pooled.png")
    d = json.loads(json.dumps(mon.to_dict(), allow_nan=False))
    assert [r["step"] for r in d["history"][HEAD_BN]] == [0, 2, 4]
    with pytest.raises(ValueError, match="no module named"):
        monitor(model, layers=["nope"])
    with pytest.raises(ValueError, match="every"):
        monitor(model, every=0)
    with pytest.raises(ValueError, match="percentiles"):
        monitor(model, percentiles=(50, 120))


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_monitor_removes_hooks_on_exit_and_on_exception():
    model = convnet()
    assert hook_count(model) == 0
    with monitor(model) as mon:
        assert hook_count(model) > 0 and mon.active
        model(torch.randn(4, 3, 6, 6))
    assert hook_count(model) == 0 and not mon.active
    with pytest.raises(ZeroDivisionError):
        with monitor(model) as mon:
            model(torch.randn(4, 3, 6, 6))
            raise ZeroDivisionError("inside the block")
    assert hook_count(model) == 0
    assert len(mon.history[CONV_BN]) == 1  # the history survives
    # After exit, forwards are not recorded.
    model(torch.randn(4, 3, 6, 6))
    assert len(mon.history[CONV_BN]) == 1


def test_docs_problem_table_has_one_row_per_rule():
    # The rules are data (batchnorm/diagnose/problems.py); docs/diagnose.md explains each.
    from batchnorm.diagnose.problems import RULES

    doc = (Path(__file__).resolve().parents[1] / "docs" / "diagnose.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| ", doc, re.M)
    assert sorted(rows) == sorted(KINDS) and tuple(RULES) == KINDS
    assert all(r.when and r.severity and r.message for r in RULES.values())


def test_docs_python_blocks_run(tmp_path, monkeypatch):
    doc = Path(__file__).resolve().parents[1] / "docs" / "diagnose.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)  # blocks that save figures write here
    namespace: dict = {}
    for index, block in enumerate(blocks):
        exec(compile(block, f"docs/diagnose.md python block {index}", "exec"), namespace)


# --------------------------------------------------------------------------------------------
# Layering: the library never imports its own root; diagnose's modules import one way
# --------------------------------------------------------------------------------------------

PACKAGE = Path(batchnorm.__file__).resolve().parent
SUBMODULES = {p.stem for p in PACKAGE.glob("*.py")} | {
    p.parent.name for p in PACKAGE.glob("*/__init__.py")}


def root_imports(source: str, package: str) -> list[int]:
    """Lines of ``source`` (a module of ``package``) that import the root `batchnorm` itself:
    ``import batchnorm`` (also inside a function) or ``from batchnorm import X`` (or the
    relative form) where X is not one of its submodules."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name == "batchnorm" for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # from .. import x, relative to the module's package
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{anchor}.{module}" if module else anchor
            if module == "batchnorm" and any(a.name not in SUBMODULES for a in node.names):
                lines.append(node.lineno)
    return lines


def test_the_root_import_check_finds_root_imports():
    # The check below must be able to fail: what diagnose.py did (import batchnorm inside a
    # function for batchnorm.FrozenBatchNorm), a top-level name, the relative form.
    assert root_imports("def f():\n    import batchnorm\n", "batchnorm") == [2]
    assert root_imports("from batchnorm import FrozenBatchNorm\n", "batchnorm") == [1]
    assert root_imports("from .. import recalibrate\n", "batchnorm.diagnose") == [1]
    assert root_imports("import batchnorm.functional\nfrom batchnorm import functional as F\n"
                        "from batchnorm.frozen import FrozenBatchNorm\n"
                        "from . import report\n", "batchnorm.diagnose") == []


def test_library_modules_never_import_the_package_root():
    """Issue 18: the library's modules import the modules they need, never `batchnorm` itself
    (its __init__ imports them all: a module importing it runs back up). The reproduction
    wing (batchnorm/reproduce/) is a user of the library and imports its public names;
    __init__.py and __main__.py are the root."""
    offenders, checked = [], 0
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if parts[0] == "reproduce" or parts in (("__init__.py",), ("__main__.py",)):
            continue
        package = ".".join(("batchnorm", *parts[:-1]))
        checked += 1
        offenders += [f"{'/'.join(parts)}:{n}" for n in root_imports(path.read_text(), package)]
    assert checked >= 15 and offenders == []


def test_diagnose_modules_import_one_way():
    # report <- problems <- measure <- monitor: each module imports only those before it.
    order = ["report", "problems", "measure", "monitor"]
    for k, name in enumerate(order):
        tree = ast.parse((PACKAGE / "diagnose" / f"{name}.py").read_text())
        imported = {node.module.rpartition(".")[2] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module
                    and node.module.startswith("batchnorm.diagnose.")}
        assert imported <= set(order[:k]), (name, imported)
    assert set(order) <= {p.stem for p in (PACKAGE / "diagnose").glob("*.py")}
