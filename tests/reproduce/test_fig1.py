"""Figure 1 (Sec. 4.1): the fast stacked step against autograd, a short run, resume, the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from batchnorm.modules import BatchNorm1d
from batchnorm.reproduce import data, fig1
from batchnorm.reproduce.cli import main
from batchnorm.reproduce.models.mlp import MLP, StackedMLP
from batchnorm.reproduce.train import load_checkpoint

SMALL = dict(steps=60, batch_size=20, eval_every=20, checkpoint_every=20, seeds=2,
             population_batches=5, threads=1, parallel_nets=False)


def _synthetic(n_train: int = 600, n_test: int = 200) -> data.ImageDataset:
    g = torch.Generator().manual_seed(123)
    labels = torch.randint(10, (n_train + n_test,), generator=g)
    # Class-dependent blobs so that training moves the accuracy, plus noise.
    prototypes = torch.rand(10, 28, 28, generator=g)
    images = (prototypes[labels] * 200 + torch.rand(len(labels), 28, 28, generator=g) * 55)
    images = images.to(torch.uint8)
    return data.ImageDataset(name="mnist", train_images=images[:n_train],
                             train_labels=labels[:n_train], test_images=images[n_train:],
                             test_labels=labels[n_train:], source="synthetic (tests)")


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: one thread avoids OpenMP barriers, which crawl on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def synthetic_mnist(monkeypatch):
    dataset = _synthetic()
    monkeypatch.setattr(data, "load_mnist", lambda data_dir=None, **kwargs: dataset)
    return dataset


def _models(bn: bool, count: int, std: float = 0.1) -> list[MLP]:
    torch.manual_seed(0)
    models = [MLP(bn) for _ in range(count)]
    for model in models:
        for p in model.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, 0.0, std)
            elif p is not getattr(model.norms[0] if bn else None, "weight", None):
                torch.nn.init.normal_(p, 0.0, 0.1)  # non-trivial biases, gamma and beta
    return models


@pytest.mark.parametrize("bn", [True, False], ids=["bn", "baseline"])
def test_stacked_step_matches_module_with_autograd(bn):
    # Oracle: the plain nn.Module (our BatchNorm1d), autograd, torch.optim.SGD.
    models = _models(bn, 3)
    stack = StackedMLP.from_modules(models)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.3) for m in models]
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.rand(3, 60, 784, generator=g)
        y = torch.randint(10, (3, 60), generator=g)
        onehot = F.one_hot(y, 10).float()
        losses = stack.loss(x, onehot)
        if step == 0:  # gradients, unscaled, against autograd
            grads = copy.deepcopy(stack).gradients(x, onehot)
        for i, (model, opt) in enumerate(zip(models, optimizers)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[i]), y[i])
            loss.backward()
            torch.testing.assert_close(losses[i], loss.detach(), rtol=1e-5, atol=1e-6)
            if step == 0:
                ref = {k: v.grad for k, v in model.named_parameters()}
                ours = dict(zip(_param_names(model), [t[i] for t in grads]))
                for name, value in ref.items():
                    got = ours[name].t() if value.dim() == 2 else ours[name].reshape(-1)
                    torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-6, msg=name)
            opt.step()
        stack.sgd_step(x, onehot, 0.3)
    for i, model in enumerate(models):
        got = stack.to_module(i).state_dict()
        for name, value in model.state_dict().items():
            if value.is_floating_point():  # parameters and running statistics
                torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)


def _param_names(model: MLP) -> list[str]:
    # The names of StackedMLP.params, in its order.
    depth = len(model.hidden) + 1
    names = [f"hidden.{i}.weight" for i in range(depth - 1)] + ["out.weight", "out.bias"]
    if model.bn:
        names += [f"norms.{i}.weight" for i in range(depth - 1)]
        names += [f"norms.{i}.bias" for i in range(depth - 1)]
    else:
        names += [f"hidden.{i}.bias" for i in range(depth - 1)]
    return names


def test_stacked_evaluate_matches_module_in_eval_mode():
    models = _models(True, 2)
    for m in models:  # non-trivial population statistics
        for norm in m.norms:
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    stack = StackedMLP.from_modules(models)
    x = torch.rand(50, 784)
    logits, z = stack.evaluate(x)
    for i, m in enumerate(models):
        m.eval()
        ref = m.pre_activations(x)
        torch.testing.assert_close(logits[i], ref[-1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(z[i], ref[-2], rtol=1e-4, atol=1e-5)


def test_bn_net_uses_this_library_and_both_nets_start_equal():
    models = fig1.initial_models(fig1.Fig1Config(), seed=3)
    assert all(isinstance(n, BatchNorm1d) for n in models["bn"].norms)
    assert all(lin.bias is None for lin in models["bn"].hidden)
    for a, b in zip([*models["bn"].hidden, models["bn"].out],
                    [*models["baseline"].hidden, models["baseline"].out]):
        assert torch.equal(a.weight, b.weight)
    assert models["bn"].hidden[0].weight.std().item() == pytest.approx(0.04, rel=0.05)


def test_short_run_writes_everything_and_resume_is_exact(synthetic_mnist, tmp_path):
    config = fig1.Fig1Config(**SMALL)
    full = fig1.run(config, tmp_path / "full", progress=False, argv=["test"])
    # Interrupted after 40 of 60 steps, then resumed from the checkpoint.
    assert fig1.run(config, tmp_path / "cut", progress=False, stop_after=40) is None
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")  # weights_only=True
    assert state["step"] == 40
    resumed = fig1.run(config, tmp_path / "cut", resume=True, progress=False)
    for name in fig1.NETS:
        assert resumed[name] == full[name]  # exact: every accuracy and percentile bit-equal
    assert resumed["timing"]["resumed_from_step"] == 40
    # The two nets in two threads compute exactly what they compute one after the other.
    threaded = fig1.Fig1Config(**{**SMALL, "parallel_nets": True})
    parallel = fig1.run(threaded, tmp_path / "parallel", progress=False)
    for name in fig1.NETS:
        assert parallel[name] == full[name]

    seeds = full["bn"]["per_seed"]
    assert [r["seed"] for r in seeds] == [0, 1] and full["bn"]["seeds"] == [0, 1]
    steps = [row[0] for row in seeds[0]["test_accuracy"]]
    assert steps == [0, 20, 40, 60]
    assert all(len(row) == 4 for row in seeds[0]["percentiles"])
    assert 0.0 <= seeds[0]["final_accuracy_algorithm2"] <= 1.0
    # Training learns the synthetic classes.
    assert seeds[0]["test_accuracy"][-1][1] > 0.5


def test_cli_one_seed_schema_and_report(synthetic_mnist, tmp_path):
    out = tmp_path / "run"
    code = main(["reproduce", "fig1", "--steps", "40", "--batch-size", "20", "--eval-every",
                 "20", "--population-batches", "4", "--threads", "1", "--no-progress",
                 "--out", str(out)])
    assert code == 0
    for name in ("config.json", "summary.json", "report.md", "fig1.png", "checkpoint.pt"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for name in ("bn", "baseline"):
        net = summary[name]
        assert [row[0] for row in net["test_accuracy"]] == [0, 20, 40]
        assert all(len(row) == 2 for row in net["test_accuracy"])
        assert all(len(row) == 4 and row[1] <= row[2] <= row[3] for row in net["percentiles"])
        assert net["unit"] == fig1.Fig1Config().unit
    assert "final_accuracy_algorithm2" in summary["bn"]
    by_statistics = summary["bn"]["final_accuracy_by_statistics"]
    assert by_statistics["algorithm2"] == summary["bn"]["final_accuracy_algorithm2"]
    assert {"algorithm2", "pooled"} < set(by_statistics) and len(by_statistics) == 4
    assert all(0.0 <= v <= 1.0 for v in by_statistics.values())
    assert "each test batch's own statistics" in (out / "report.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["steps"] == 40 and config["seeds"] == [0]
    assert set(config["versions"]) == {"python", "torch", "numpy"}
    assert {"revision", "dirty"} <= set(config["git"]) and config["machine"]["torch_threads"] == 1
    report = (out / "report.md").read_text()
    assert "paper, with BN" in report and "Algorithm 2" in report and "95%" in report
    # --resume on a finished run folder reads its settings and rewrites the same numbers.
    assert main(["reproduce", "fig1", "--resume", str(out), "--no-progress"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["bn"] == summary["bn"] and again["baseline"] == summary["baseline"]


def test_report_checks_against_the_paper():
    # A run that reproduces the paper's table exactly passes every check.
    rows = {name: [[step, acc[k]] for step, acc in fig1.PAPER_ACCURACY.items()]
            for k, name in enumerate(fig1.NETS)}
    summary = {name: {"test_accuracy": rows[name], "percentiles": []} for name in fig1.NETS}
    checks = fig1._checks(summary, fig1.Fig1Config())
    assert len(checks) == 3 and all(ok for _, ok in checks)
    table = fig1.accuracy_table(summary, fig1.Fig1Config())
    assert table.count("yes") == 16 and "**no**" not in table
    rows["bn"][0][1] = 0.90  # BN below 95% at 5K fails its check
    assert not fig1._checks(summary, fig1.Fig1Config())[-1][1]
