"""A run's folder through its life: checked once, created or resumed, held, finished (Sec. 4).

One convention for every experiment (`fig1`, `fig2`, `imagenet_train`):

- ``--out RUN_DIR`` starts a new run. RUN_DIR must not exist or be empty, and must be
  writable; a folder that already holds a run is refused with a message naming
  ``--resume`` (checked while the flags are parsed, before any work).
- ``--resume RUN_DIR`` continues the run in RUN_DIR with the settings recorded in its
  ``config.json``. A flag given with ``--resume`` must repeat the recorded value, except the
  few an experiment declares changeable (Figure 1: ``--steps``, to train further). A
  finished run that nothing extends is refused: resuming it would only redo the report.
- One process at a time runs a folder: a run takes an advisory lock (``RUN_DIR/.lock``)
  that the system drops when the process ends, however it ends; a second ``--resume`` of a
  run still going is refused naming the process that holds it.

A run opens its folder once (`open_run`, or the command line's `flags.open_from_args`,
which checks it before any work), then `RunFolder.start` makes or notes it once the data is
loaded, and `RunFolder.finish` marks it done. Writing goes through `atomic`, the record's
versions, machine and command come from `provenance`, flags from `flags`.

``config.json`` holds {"experiment", "config": every setting, "versions", "machine", "git",
"command", "started", "finished": time or null, "resumed": [{"command", "started",
"changes"}, ...]} plus what the experiment adds (Figure 1: "seeds", "data").
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from batchnorm.reproduce.atomic import write_json
from batchnorm.reproduce.provenance import command_line, now, provenance

__all__ = [
    "CONFIG",
    "RunFolderError",
    "RunFolder",
    "open_run",
    "default_out",
    "check_new",
    "check_recorded",
    "create",
    "read_record",
    "check_experiment",
    "is_finished",
    "check_resume",
    "record_resume",
    "finish",
    "hold",
]

CONFIG = "config.json"
LOCK = ".lock"
_held: dict[Path, io.TextIOWrapper] = {}  # run folders this process holds: path -> lock file


class RunFolderError(ValueError):
    """A folder that cannot serve as asked: not empty for a new run, not a run to resume."""


# --------------------------------------------------------------------------------------------
# A new run's folder.


def default_out(experiment: str) -> Path:
    """``runs/<experiment>-<date>-<time>``: a new folder for each run started without --out."""
    return Path("runs") / f"{experiment}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def check_new(out: str | os.PathLike) -> Path:
    """``out`` as a Path if a new run may use it (absent or empty, writable); else refuse.

    Raises:
        RunFolderError: ``out`` holds a run (the message names --resume), is a non-empty
            folder or a file, or cannot be created or written.
    """
    out = Path(out)
    if (out / CONFIG).is_file():
        raise RunFolderError(
            f"{out} already holds a run ({CONFIG}); continue it with --resume {out}, "
            "or give --out a new folder"
        )
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise RunFolderError(f"{out} is not empty; a new run needs a new or empty folder")
    base = out
    while not base.exists():  # the nearest existing folder is where mkdir will write
        base = base.parent
    if not base.is_dir():
        raise RunFolderError(f"cannot create {out}: {base} is a file, not a folder")
    try:  # a real write: os.access says yes to root on a read-only file system
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=base))
    except OSError as error:
        raise RunFolderError(
            f"cannot create {out}: {base} is not writable ({error.strerror})"
        ) from error
    return out


def _make(out: Path, experiment: str, config: Any, extra: dict) -> dict:
    # Make the folder `check_new` accepted, hold it, write its config.json; the record.
    out.mkdir(parents=True, exist_ok=True)
    hold(out)
    record = {
        "experiment": experiment,
        "config": dataclasses.asdict(config),
        **provenance(),
        **extra,
        "finished": None,
        "resumed": [],
    }
    write_json(out / CONFIG, record)
    return record


def create(out: str | os.PathLike, experiment: str, config: Any, **extra: Any) -> dict:
    """Make the new run folder ``out`` and write its config.json; refuses as `check_new`.

    ``config`` is the experiment's frozen dataclass; ``extra`` adds top-level entries.
    Returns the record written.
    """
    return _make(check_new(out), experiment, config, extra)


# --------------------------------------------------------------------------------------------
# A recorded run: read, checked for resuming, noted.


def check_recorded(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` as a Path if it holds a config.json; else `RunFolderError`."""
    if not (Path(run_dir) / CONFIG).is_file():
        raise RunFolderError(f"{run_dir} is not a run folder: it has no {CONFIG}")
    return Path(run_dir)


def check_experiment(run_dir: str | os.PathLike, record: dict, experiment: str | None) -> None:
    """Refuse a record of another experiment than ``experiment`` (None: any)."""
    if experiment is not None and record["experiment"] != experiment:
        raise RunFolderError(
            f"{run_dir} holds a {record['experiment']} run, not {experiment}; resume it with "
            f"the {record['experiment']} command"
        )


def read_record(run_dir: str | os.PathLike, experiment: str | None = None) -> dict:
    """The config.json of the run in ``run_dir``, checked to be a run of ``experiment``.

    Raises:
        RunFolderError: no config.json, one that is not a run's record ({"experiment": name,
            "config": {...}, ...}), or a run of another experiment than ``experiment``.
    """
    path = check_recorded(run_dir) / CONFIG
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunFolderError(f"{path} is not valid JSON ({error})") from error
    if not (isinstance(record, dict) and isinstance(record.get("experiment"), str)
            and isinstance(record.get("config"), dict)):  # fmt: skip
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise RunFolderError(
            f"{path} is not a run's record: expected an object with \"experiment\" and "
            f"\"config\", got {got}"
        )
    check_experiment(run_dir, record, experiment)
    return record


def is_finished(run_dir: str | os.PathLike, record: dict) -> bool:
    """Whether the run completed (for folders from before "finished": a summary.json)."""
    if "finished" in record:
        return record["finished"] is not None
    return (Path(run_dir) / "summary.json").is_file()


def check_resume(
    run_dir: str | os.PathLike,
    record: dict,
    *,
    done: int | None = None,
    target: int | None = None,
    extends: bool = False,
    hint: str = "",
) -> None:
    """Refuse a resume that would go back or do nothing.

    ``done``/``target``: steps the checkpoint holds and steps asked for (when the experiment
    can tell); ``extends``: the resumed settings ask for more work than the recorded ones.

    Raises:
        RunFolderError: ``target < done``, or the run is finished and nothing extends it.
    """
    if done is not None and target is not None and target < done:
        raise RunFolderError(f"{run_dir} is already at step {done}; it cannot go back to {target}")
    if is_finished(run_dir, record) and not extends:
        raise RunFolderError(f"{run_dir} holds a finished run: nothing to resume{hint}")


def record_resume(run_dir: str | os.PathLike, record: dict, config: Any) -> dict:
    """Note a resume in config.json: the new settings, the command, the time; unfinished.

    Holds the folder first (`hold`; RunFolderError if another process runs it), then
    removes the temporaries a killed `atomic.atomic_write` left (``.<name>.*.tmp``): the
    files they were meant to replace are whole, old or new.
    """
    hold(run_dir)
    for leftover in Path(run_dir).rglob(".*.tmp"):
        leftover.unlink(missing_ok=True)
    new = json.loads(json.dumps(dataclasses.asdict(config)))  # as config.json holds it
    changes = {k: v for k, v in new.items() if record["config"].get(k) != v}
    record = {**record, "config": new, "finished": None}
    record["resumed"] = [
        *record.get("resumed", []),
        {"command": command_line(), "started": now(), "changes": changes},
    ]
    write_json(Path(run_dir) / CONFIG, record)
    return record


def finish(run_dir: str | os.PathLike) -> None:
    """Mark the run in ``run_dir`` finished (after its summary, report and figure)."""
    record = read_record(run_dir)
    record["finished"] = now()
    write_json(Path(run_dir) / CONFIG, record)
    _release(run_dir)


# --------------------------------------------------------------------------------------------
# One process at a time.


def hold(run_dir: str | os.PathLike) -> None:
    """Hold ``run_dir`` for this process until it ends or `finish` is called.

    Two processes running one folder (two ``--resume`` at once) would write each other's
    checkpoints and records. The hold is an advisory ``flock`` on ``RUN_DIR/.lock``, which the
    system drops when the process ends, a kill included, so no stale lock is ever left; in the
    holding process a second call does nothing. (No-op where ``fcntl`` is missing: Windows.)

    Raises:
        RunFolderError: another process holds the folder (named by the pid it wrote).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    path = Path(run_dir).resolve()
    if path in _held:
        return
    lock = open(path / LOCK, "a+")  # noqa: SIM115 - stays open while the folder is held
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise RunFolderError(
            f"{run_dir} is in use by {holder}: one process at a time may run a folder; "
            "wait for it to end or stop it, then --resume"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"process {os.getpid()} on {platform.node()}\n")
    lock.flush()
    _held[path] = lock


def _release(run_dir: str | os.PathLike) -> None:
    lock = _held.pop(Path(run_dir).resolve(), None)
    if lock is not None:
        lock.close()  # closing drops the flock; the file stays (removing it would race)


# --------------------------------------------------------------------------------------------
# The lifecycle in one object.

# An experiment's resume check: (RUN_DIR, recorded config.json, resumed config) -> what the
# run needs to continue (Figure 1: the checkpoint; None where nothing); RunFolderError if the
# resume has nothing to do or cannot be done.
ResumeCheck = Callable[[Path, dict, Any], Any]


class RunFolder:
    """A run folder opened by this process for one experiment: checked once, then used.

    Made by `open_run` (a library call) or by the command line (`flags.open_from_args`),
    each of which checks the folder once, before any work; the experiment then calls `start`
    once its data is loaded and `finish` after its report.

    Attributes:
        path: the folder.
        experiment: the experiment's name in config.json.
        record: the run's config.json as recorded when resuming; None for a new run.
        state: what the experiment's resume check returned (Figure 1: the checkpoint to
            continue from); None for a new run.
    """

    def __init__(self, path: str | os.PathLike, experiment: str, record: dict | None = None,
                 state: Any = None):  # fmt: skip
        self.path, self.experiment, self.record, self.state = Path(path), experiment, record, state

    @property
    def resuming(self) -> bool:
        """Whether this run continues a recorded one."""
        return self.record is not None

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r}, {self.experiment!r}, resuming={self.resuming})"

    @classmethod
    def new(cls, out: str | os.PathLike, experiment: str) -> RunFolder:
        """The folder of a new run, checked by `check_new`; nothing is made yet."""
        return cls(check_new(out), experiment)

    @classmethod
    def resumed(cls, run_dir: str | os.PathLike, experiment: str, record: dict, config: Any,
                check: ResumeCheck | None = None, *, writer: bool = True) -> RunFolder:  # fmt: skip
        """The folder of a run to continue: ``check`` passed, held (by the ``writer``).

        ``record`` is the run's config.json (`read_record`) and ``config`` the resumed
        settings. Raises `RunFolderError` from ``check`` or from `hold`.
        """
        state = None if check is None else check(Path(run_dir), record, config)
        if writer:
            hold(run_dir)  # before any work: refused while another process runs it
        return cls(run_dir, experiment, record, state)

    def start(self, config: Any, **extra: Any) -> dict:
        """Write config.json: a new run's (made and held here), or a resume's note.

        ``extra``: top-level entries of a new run's record (a resume keeps the recorded
        ones). Returns the record written.
        """
        if self.record is None:
            return _make(self.path, self.experiment, config, extra)
        return record_resume(self.path, self.record, config)

    def finish(self) -> None:
        """Mark the run finished and let the folder go (`finish`)."""
        finish(self.path)


def open_run(
    out: str | os.PathLike | RunFolder,
    experiment: str,
    config: Any,
    *,
    resume: bool = False,
    check: ResumeCheck | None = None,
    writer: bool = True,
) -> RunFolder:
    """The folder a run of ``experiment`` works in, checked once.

    ``out`` is either a `RunFolder` the command line opened (returned as it is: it was
    checked while the flags were parsed) or a path, checked here: for a new run by
    `check_new`, for a ``resume`` by `read_record`, then ``check(path, record, config)``
    and `hold`. ``writer``: whether this process writes the folder (False on the other ranks
    of a distributed run: no `check_new`, no hold).

    Raises:
        RunFolderError: ``out`` cannot start or continue the run.
    """
    if isinstance(out, RunFolder):
        if out.experiment != experiment or out.resuming != resume:
            raise ValueError(
                f"expected a folder opened for {'resuming' if resume else 'a new'} "
                f"{experiment} run, got {out!r}"
            )
        return out
    if resume:
        record = read_record(out, experiment)
        return RunFolder.resumed(out, experiment, record, config, check, writer=writer)
    return RunFolder.new(out, experiment) if writer else RunFolder(out, experiment)
