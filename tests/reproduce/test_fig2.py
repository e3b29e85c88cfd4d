"""`batchnorm reproduce fig2` end to end on synthetic data, and the Figure 3 table by hand."""

from __future__ import annotations

import json

import pytest

from batchnorm.reproduce import fig2, run_folder
from batchnorm.reproduce.cli import main
from batchnorm.reproduce.recipes import RECIPES

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = fig2.Fig2Config(
    steps=4, eval_every=2, eval_examples=32, dataset="synthetic", width=0.0625,
    synthetic_size=(96, 32), checkpoint_every=2,
)  # fmt: skip
TINY_FLAGS = ["--steps", "4", "--eval-every", "2", "--eval-examples", "32", "--dataset",
              "synthetic", "--width", "0.0625", "--checkpoint-every", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fig2")
    summary = fig2.run(TINY, out)
    return out, TINY, summary


def test_run_folder(run_dir):
    out, _, _ = run_dir
    for name in ("config.json", "summary.json", "fig2.png", "report.md"):
        assert (out / name).stat().st_size > 0
    assert sorted(p.stem for p in (out / "checkpoints").glob("*.pt")) == sorted(RECIPES)
    assert not list(out.rglob("*.tmp*"))  # atomic writes leave no temporaries
    config = json.loads((out / "config.json").read_text())
    assert config["experiment"] == "fig2" and config["config"]["steps"] == 4
    assert {"torch", "python", "numpy", "batchnorm"} == set(config["versions"])
    assert {"platform", "torch_threads"} <= set(config["machine"])
    assert {"revision", "dirty"} == set(config["git"]) and config["finished"] is not None


def test_summary_schema(run_dir):
    out, cfg, summary = run_dir
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk) == {"data", "parameters", "variants", "figure3", "negative_results",
                            "seconds", "seconds_last_session"}  # fmt: skip
    seconds = sum(r["seconds"] for r in summary["variants"].values())
    assert on_disk["seconds"] == pytest.approx(seconds) and seconds > 0
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


def test_interrupted_run_resumes_without_retraining(tmp_path, monkeypatch, capsys):
    # Interrupted while training bn_x5: `--resume RUN_DIR` keeps inception's finished
    # checkpoint, trains bn_x5, and ends with the curves of an uninterrupted run.
    cfg = fig2.Fig2Config(**{**TINY.__dict__, "variants": ("inception", "bn_x5")})
    full = fig2.run(cfg, tmp_path / "full")
    train = fig2._train_variant

    def interrupted(cfg, key, *args, **kwargs):
        if key == "bn_x5":
            raise KeyboardInterrupt
        return train(cfg, key, *args, **kwargs)

    monkeypatch.setattr(fig2, "_train_variant", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fig2.run(cfg, tmp_path / "cut")
    monkeypatch.setattr(fig2, "_train_variant", train)
    assert main(["reproduce", "fig2", "--resume", str(tmp_path / "cut")]) == 0
    again = json.loads((tmp_path / "cut" / "summary.json").read_text())
    for key in cfg.variants:
        assert again["variants"][key]["curve"] == full["variants"][key]["curve"]
    assert "run folder" in capsys.readouterr().out
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert len(config["resumed"]) == 1 and config["resumed"][0]["changes"] == {}


def _refused(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "fig2", *map(str, argv)])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def test_a_run_folder_is_never_overwritten(run_dir, capsys):
    # Defect 5 for fig2: --out naming an existing run is refused and points to --resume; a
    # finished run is not resumed (it would only rewrite its summary), and a resumed run
    # keeps its recorded settings.
    out, _, _ = run_dir
    before = _files(out)
    err = _refused(capsys, *TINY_FLAGS, "--out", out)
    assert "argument --out" in err and f"--resume {out}" in err
    assert "finished" in _refused(capsys, "--resume", out)
    err = _refused(capsys, "--resume", out, "--steps", "8")
    assert "argument --steps" in err and "keeps its settings" in err
    with pytest.raises(run_folder.RunFolderError, match="--resume"):
        fig2.run(TINY, out)
    assert _files(out) == before


@pytest.mark.parametrize(("flag", "value"), [
    ("--steps", -5), ("--eval-every", 0), ("--checkpoint-every", 0), ("--threads", -1),
    ("--eval-examples", 0), ("--eval-examples", 20000), ("--width", 0), ("--stem-stride", 3),
    ("--horizon-epochs", 0), ("--variants", "resnet"), ("--dataset", "cifar"), ("--seed", -1),
])  # fmt: skip
def test_bad_flags_are_argparse_errors_before_any_work(
    tmp_path, monkeypatch, capsys, flag, value
):
    # Defect 12 for fig2: every flag is checked before data is loaded or a folder made.
    def load(cfg):
        raise AssertionError("the run started before its flags were checked")

    monkeypatch.setattr(fig2, "_load", load)
    err = _refused(capsys, flag, value, "--out", tmp_path / "run")
    assert f"argument {flag}: must be" in err and f"got {value!r}".replace("'", "") in (
        err.replace("'", "")
    )
    assert not (tmp_path / "run").exists()


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


def test_unknown_variant():
    with pytest.raises(run_folder.SettingError, match="variants must be a comma-separated"):
        fig2.Fig2Config(variants=("resnet",), dataset="synthetic")
