"""The run folder shared by every experiment: provenance, refusal, resume bookkeeping, flags."""

from __future__ import annotations

import argparse
import collections
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

import batchnorm
from batchnorm.reproduce import atomic, flags, provenance, run_folder
from batchnorm.reproduce.flags import Flag, SettingError, require
from batchnorm.reproduce.run_folder import RunFolderError

PACKAGE = Path(batchnorm.__file__).resolve().parent


@dataclass(frozen=True)
class Toy:
    """A stand-in experiment config: one required and two checked settings."""

    data: str
    steps: int = 10
    lr: float = 0.1

    def __post_init__(self):
        require(self.steps >= 1, "steps", "an integer >= 1", self.steps)
        require(self.lr > 0, "lr", "> 0", self.lr)


FLAGS = {"--data": Flag("data", str, "input"), "--steps": Flag("steps", int, "steps"),
         "--lr": Flag("lr", float, "learning rate")}


def _parse(argv):
    parser = argparse.ArgumentParser(prog="toy")
    flags.add_flags(parser, Toy, FLAGS, "toy")
    return parser, parser.parse_args([str(a) for a in argv])


def test_command_line_names_the_module():
    main = str(PACKAGE / "__main__.py")
    assert provenance.command_line([main, "reproduce", "fig1"]) == [
        "python -m batchnorm", "reproduce", "fig1"]
    train = str(PACKAGE / "reproduce" / "imagenet_train.py")
    assert provenance.command_line([train, "--data", "x"])[0] == (
        "python -m batchnorm.reproduce.imagenet_train")
    assert provenance.command_line(["/usr/bin/batchnorm", "data"]) == ["batchnorm", "data"]
    assert provenance.command_line(["/x/pytest/__main__.py"]) == ["python -m pytest"]


def test_provenance_fields():
    record = provenance.provenance(["prog", "--flag"])
    assert set(record) == {"versions", "machine", "git", "command", "started"}
    assert record["versions"]["batchnorm"] == batchnorm.__version__
    assert record["command"] == ["prog", "--flag"]
    assert set(record["git"]) == {"revision", "dirty"}


def test_create_refuses_what_it_would_overwrite(tmp_path):
    record = run_folder.create(tmp_path / "a" / "b", "toy", Toy(data="d"), extra=1)
    on_disk = json.loads((tmp_path / "a" / "b" / "config.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert on_disk["config"] == {"data": "d", "steps": 10, "lr": 0.1} and on_disk["extra"] == 1
    with pytest.raises(RunFolderError, match="--resume"):
        run_folder.create(tmp_path / "a" / "b", "toy", Toy(data="d"))
    with pytest.raises(RunFolderError, match="not empty"):
        run_folder.check_new(tmp_path / "a")
    run_folder.check_new(tmp_path / "empty")  # absent: fine, and not created
    assert not (tmp_path / "empty").exists()


def test_resume_bookkeeping(tmp_path):
    out = tmp_path / "run"
    record = run_folder.create(out, "toy", Toy(data="d"))
    run_folder.check_resume(out, record, done=5, target=10)  # interrupted: fine
    record = run_folder.record_resume(out, record, Toy(data="d", steps=20))
    assert record["resumed"][0]["changes"] == {"steps": 20} and record["finished"] is None
    run_folder.finish(out)
    record = run_folder.read_record(out)
    assert record["finished"] is not None
    with pytest.raises(RunFolderError, match="finished run: nothing to resume; more"):
        run_folder.check_resume(out, record, done=20, target=20, hint="; more")
    run_folder.check_resume(out, record, done=20, target=30, extends=True)
    with pytest.raises(RunFolderError, match="cannot go back"):
        run_folder.check_resume(out, record, done=20, target=10, extends=False)
    with pytest.raises(RunFolderError, match="not a run folder"):
        run_folder.read_record(tmp_path)


def test_flags_become_the_config_or_an_argparse_error(tmp_path, capsys):
    parser, args = _parse(["--data", "d", "--steps", 3, "--out", tmp_path / "r"])
    config, record = flags.settings_from_args(parser, args, Toy, FLAGS)
    assert config == Toy(data="d", steps=3) and record is None and args.out == tmp_path / "r"
    for argv, message in (
        (["--steps", 0, "--data", "d"], "argument --steps: must be an integer >= 1, got 0"),
        (["--lr", -1, "--data", "d"], "argument --lr: must be > 0, got -1.0"),
        (["--steps", 3], "a new run needs --data"),
    ):
        parser, args = _parse(argv)
        with pytest.raises(SystemExit) as exit_info:
            flags.settings_from_args(parser, args, Toy, FLAGS)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SettingError, match="steps must be an integer >= 1, got -2"):
        Toy(data="d", steps=-2)


def test_resume_keeps_settings_except_those_allowed(tmp_path, capsys):
    out = tmp_path / "run"
    run_folder.create(out, "toy", Toy(data="d", lr=0.5))
    parser, args = _parse(["--resume", out, "--steps", 30, "--lr", 0.5])
    config, record = flags.settings_from_args(parser, args, Toy, FLAGS, may_change={"steps"})
    assert config == Toy(data="d", steps=30, lr=0.5) and record["config"]["lr"] == 0.5
    parser, args = _parse(["--resume", out, "--lr", 0.25])
    with pytest.raises(SystemExit):
        flags.settings_from_args(parser, args, Toy, FLAGS, may_change={"steps"})
    err = capsys.readouterr().err
    assert "argument --lr: a resumed run keeps its settings" in err and "--steps may" in err
    with pytest.raises(SystemExit):
        _parse(["--resume", tmp_path / "nothing"])
    assert "not a run folder" in capsys.readouterr().err


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "summary.json"
    atomic.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}

    def fails_half_way(f):
        f.write('{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write(path, fails_half_way, text=True)
    assert json.loads(path.read_text()) == {"a": 1}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path, umask):
    import os

    previous = os.umask(umask)
    try:
        atomic.write_text(tmp_path / "report.md", "# report\n")
        (tmp_path / "plain.md").write_text("# report\n")
    finally:
        os.umask(previous)
    mode = (tmp_path / "report.md").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.md").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "report.md").read_text() == "# report\n"


@pytest.mark.parametrize("text,message", [
    (json.dumps({"experiment": "other", "config": {"data": "d"}}), "holds a other run, not toy"),
    ("[1, 2]", "not a run's record: expected an object"),
    (json.dumps({"experiment": "toy"}), "not a run's record"),
    ('{"experiment": "toy", "con', "not valid JSON"),
    (json.dumps({"experiment": "toy", "config": {"data": "d", "depth": 3}}),
     "do not fit Toy of this version"),
])  # fmt: skip
def test_resume_refuses_another_experiment_or_a_broken_record(tmp_path, capsys, text, message):
    # Audit defect: `fig1 --resume <a fig2 run>` ended in "Fig1Config.__init__() got an
    # unexpected keyword argument 'early_evals'", and a config.json that is JSON but not a
    # record in a KeyError traceback; both now name the folder and what was expected.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(text)
    with pytest.raises(SystemExit) as exit_info:  # refused while parsing or just after
        parser, args = _parse(["--resume", tmp_path / "run"])
        flags.settings_from_args(parser, args, Toy, FLAGS, experiment="toy")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --resume" in err and message in err


def test_resume_removes_what_a_killed_write_left(tmp_path):
    # Audit: `kill -9` inside atomic_write left .checkpoint.pt.<random>.tmp files in the
    # run folder for good; a resume now clears them (and keeps every other file).
    out = tmp_path / "run"
    record = run_folder.create(out, "toy", Toy(data="d"))
    (out / "checkpoints").mkdir()
    for name in (".checkpoint.pt.abc123.tmp", "checkpoints/.x.pt.def456.tmp", "notes.tmp"):
        (out / name).write_text("partial")
    run_folder.record_resume(out, record, Toy(data="d"))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        ".lock", "checkpoints", "config.json", "notes.tmp"]


@pytest.mark.parametrize("name,why", [("", "empty"), ("nowhere", "no such folder"),
                                      ("file", "a file")])  # fmt: skip
def test_existing_folder_flag_type(tmp_path, monkeypatch, name, why):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(argparse.ArgumentTypeError, match=f"expected an existing folder.*{why}"):
        flags.existing_folder(name)
    assert flags.existing_folder(str(tmp_path)) == str(tmp_path)



def test_one_process_at_a_time_runs_a_folder(tmp_path, held_by_another_process):
    out = tmp_path / "run"
    record = run_folder.create(out, "toy", Toy(data="d"))
    run_folder.hold(out)  # again in the holding process: nothing happens
    run_folder.finish(out)  # releases it ...
    child = held_by_another_process(out)  # ... so another process can take it
    try:
        with pytest.raises(RunFolderError, match=f"in use by process {child.pid} "):
            run_folder.record_resume(out, record, Toy(data="d", steps=20))
        assert run_folder.read_record(out)["config"]["steps"] == 10  # nothing written
    finally:
        child.kill()
        child.wait()
    record = run_folder.record_resume(out, record, Toy(data="d", steps=20))  # a kill frees it
    assert record["config"]["steps"] == 20 and run_folder.read_record(out) == record
    run_folder.finish(out)


def test_a_run_checks_its_folder_once(tmp_path, monkeypatch):
    # Issue 18: a new fig2 run checked its folder three times (--out's type, fig2.run,
    # run_folder.create) and a resume ran the experiment's check twice. Now the command
    # opens the folder once and the run takes it as it is; a library call checks once too.
    calls = collections.Counter()
    real_check_new = run_folder.check_new

    def check_new(out):
        calls["check_new"] += 1
        return real_check_new(out)

    def check(path, record, config):  # an experiment's resume check
        calls["check"] += 1
        return {"step": record["config"]["steps"]}

    monkeypatch.setattr(run_folder, "check_new", check_new)
    monkeypatch.setattr(flags, "check_new", check_new)
    parser, args = _parse(["--data", "d", "--out", tmp_path / "r"])
    config, folder = flags.open_from_args(parser, args, Toy, FLAGS, "toy", check=check)
    assert run_folder.open_run(folder, "toy", config, check=check) is folder
    assert args.run_dir == folder.path == tmp_path / "r" and not folder.path.exists()
    folder.start(config)
    folder.finish()
    assert calls == {"check_new": 1}

    parser, args = _parse(["--resume", tmp_path / "r", "--steps", 20])
    config, folder = flags.open_from_args(parser, args, Toy, FLAGS, "toy", may_change={"steps"},
                                          check=check)  # fmt: skip
    assert folder.resuming and folder.state == {"step": 10}
    assert run_folder.open_run(folder, "toy", config, resume=True, check=check) is folder
    assert folder.start(config)["resumed"][0]["changes"] == {"steps": 20}
    folder.finish()
    assert calls == {"check_new": 1, "check": 1}
    with pytest.raises(ValueError, match="expected a folder opened for a new toy run"):
        run_folder.open_run(folder, "toy", config, check=check)

    folder = run_folder.open_run(tmp_path / "lib", "toy", Toy(data="d"))  # a library call
    folder.start(Toy(data="d"))
    assert calls["check_new"] == 2 and run_folder.read_record(folder)["config"]["data"] == "d"
    folder.finish()
