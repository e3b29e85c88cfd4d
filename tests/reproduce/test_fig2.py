"""`batchnorm reproduce fig2` end to end on synthetic data, and the Figure 3 table by hand."""

from __future__ import annotations

import json

import pytest

from batchnorm.reproduce import fig2
from batchnorm.reproduce.cli import main
from batchnorm.reproduce.recipes import RECIPES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fig2")
    cfg = fig2.Fig2Config(
        out=str(out), steps=4, eval_every=2, eval_examples=32, dataset="synthetic",
        width=0.0625, synthetic_size=(96, 32), checkpoint_every=2,
    )  # fmt: skip
    summary = fig2.run(cfg)
    return out, cfg, summary


def test_run_folder(run_dir):
    out, _, _ = run_dir
    for name in ("config.json", "summary.json", "fig2.png", "report.md"):
        assert (out / name).stat().st_size > 0
    assert sorted(p.stem for p in (out / "checkpoints").glob("*.pt")) == sorted(RECIPES)
    assert not list(out.rglob("*.tmp*"))  # atomic writes leave no temporaries
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["steps"] == 4
    for key in ("torch", "python", "git_revision", "platform", "torch_threads"):
        assert key in config["environment"]


def test_summary_schema(run_dir):
    out, cfg, summary = run_dir
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk) == {"data", "parameters", "variants", "figure3", "negative_results",
                            "seconds"}  # fmt: skip
    assert list(on_disk["variants"]) == list(cfg.variants)
    for r in on_disk["variants"].values():
        assert [s for s, _ in r["curve"]] == [2, 4] or r["diverged_at"] is not None
        assert all(0 <= a <= 1 for _, a in r["curve"])
        assert r["seconds_per_step"] > 0 and r["parameters"] > 0
    rows = on_disk["figure3"]["rows"]
    assert set(rows) == set(cfg.variants)
    assert rows["inception"]["speedup"] == 1.0
    assert rows["bn_x5"]["paper_speedup"] == pytest.approx(31.0 / 2.1)
    assert set(on_disk["negative_results"]) == {
        "inception_sigmoid_at_chance",
        "inception_x5_diverges",
    }


def test_report(run_dir):
    out, _, summary = run_dir
    report = (out / "report.md").read_text()
    for name in ("Inception", "BN-Baseline", "BN-x5", "BN-x30", "BN-x5-Sigmoid"):
        assert f"| {name} |" in report
    assert "14.8x" in report and "11.5x" in report and "2.3x" in report
    assert "Negative results" in report and "fig2.png" in report


def test_resume_does_not_retrain(run_dir, capsys):
    out, _, summary = run_dir
    argv = ["reproduce", "fig2", "--out", str(out), "--steps", "4", "--eval-every", "2",
            "--eval-examples", "32", "--dataset", "synthetic", "--width", "0.0625",
            "--variants", "inception,bn_x5", "--resume"]  # fmt: skip
    assert main(argv) == 0  # every checkpoint is at step 4: nothing trains again
    again = json.loads((out / "summary.json").read_text())
    for key in ("inception", "bn_x5"):
        assert again["variants"][key]["curve"] == summary["variants"][key]["curve"]
    assert "run folder" in capsys.readouterr().out


def test_figure3_table_by_hand():
    def result(name, curve, diverged=None):
        return {"name": name, "curve": curve, "diverged_at": diverged}

    results = {
        "inception": result("Inception", [[10, 0.5], [20, 0.8], [30, 0.7], [40, 0.8]]),
        "bn_baseline": result("BN-Baseline", [[10, 0.6], [20, 0.85]]),
        "bn_x5": result("BN-x5", [[10, 0.9]]),
        "bn_x5_sigmoid": result("BN-x5-Sigmoid", [[10, 0.5], [20, 0.6]]),
        "inception_sigmoid": result("Inception-Sigmoid", [[10, 0.11], [20, 0.1]]),
        "inception_x5": result("Inception-x5", [[10, 0.3], [13, 0.1]], diverged=13),
    }
    table = fig2.figure3_table(results)
    assert table["target"] == 0.8 and table["target_steps"] == 20
    rows = table["rows"]
    assert rows["bn_baseline"]["steps_to_target"] == 20 and rows["bn_baseline"]["speedup"] == 1
    assert rows["bn_x5"]["steps_to_target"] == 10 and rows["bn_x5"]["speedup"] == 2
    assert rows["bn_x5_sigmoid"]["steps_to_target"] is None
    assert rows["bn_x5_sigmoid"]["speedup"] is None and rows["bn_x5_sigmoid"]["max_at_step"] == 20
    negatives = fig2._negative_results(results)
    assert negatives["inception_sigmoid_at_chance"]["reappears"] is True
    assert negatives["inception_x5_diverges"]["diverged_at_step"] == 13
    assert negatives["inception_x5_diverges"]["reappears"] is True


def test_unknown_variant(tmp_path):
    with pytest.raises(ValueError, match="unknown variants"):
        fig2.run(fig2.Fig2Config(out=str(tmp_path), variants=("resnet",), dataset="synthetic"))
