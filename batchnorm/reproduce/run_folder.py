"""The run folder every experiment writes: provenance, config.json, resume, no overwriting, flags.

One convention for every experiment (`fig1`, `fig2`, `imagenet_train`):

- ``--out RUN_DIR`` starts a new run. RUN_DIR must not exist or be empty, and must be
  writable; a folder that already holds a run is refused with a message naming
  ``--resume`` (checked while the flags are parsed, before any work).
- ``--resume RUN_DIR`` continues the run in RUN_DIR with the settings recorded in its
  ``config.json``. A flag given with ``--resume`` must repeat the recorded value, except the
  few an experiment declares changeable (Figure 1: ``--steps``, to train further). A
  finished run that nothing extends is refused: resuming it would only redo the report.
- One process at a time runs a folder: `create` and `record_resume` take an advisory lock
  (``RUN_DIR/.lock``) that the system drops when the process ends, however it ends; a second
  ``--resume`` of a run still going is refused naming the process that holds it.
- Every setting is checked once, in the experiment's frozen config (`require`); the command
  line reports a bad value as an argparse error naming the flag (exit code 2).

``config.json`` holds {"experiment", "config": every setting, "versions", "machine", "git",
"command", "started", "finished": time or null, "resumed": [{"command", "started",
"changes"}, ...]} plus what the experiment adds (Figure 1: "seeds", "data").
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "CONFIG",
    "RunFolderError",
    "SettingError",
    "require",
    "finite",
    "SEED_MAX",
    "provenance",
    "git_state",
    "command_line",
    "check_new",
    "create",
    "read_record",
    "record_resume",
    "finish",
    "hold",
    "is_finished",
    "check_resume",
    "atomic_write",
    "save_figure",
    "write_json",
    "write_text",
    "default_out",
    "Flag",
    "add_flags",
    "existing_folder",
    "settings_from_args",
]

CONFIG = "config.json"
LOCK = ".lock"
_held: dict[Path, io.TextIOWrapper] = {}  # run folders this process holds: path -> lock file
_PACKAGE = Path(__file__).resolve().parents[1]  # batchnorm/


class RunFolderError(ValueError):
    """A folder that cannot serve as asked: not empty for a new run, not a run to resume."""


class SettingError(ValueError):
    """One setting out of range. ``field`` names it, so the command line can name its flag."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field} {reason}")
        self.field, self.reason = field, reason


SEED_MAX = 2**64 - 1  # torch.manual_seed's largest seed


def finite(x: float) -> bool:
    """Whether ``x`` is a number other than nan and +-inf (for `require`)."""
    return math.isfinite(x)


def require(ok: bool, field: str, expected: str, got: Any) -> None:
    """Raise `SettingError` "``field`` must be ``expected``, got ``got``" unless ``ok``."""
    if not ok:
        raise SettingError(field, f"must be {expected}, got {got!r}")


# --------------------------------------------------------------------------------------------
# Provenance.


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(_PACKAGE), *args], capture_output=True, text=True, timeout=10,
            check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None


def git_state() -> dict:
    """{"revision": HEAD or None, "dirty": whether the package's sources differ from HEAD}."""
    revision = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", ".") if revision else None
    return {"revision": revision, "dirty": None if status is None else bool(status)}


def command_line(argv: list[str] | None = None) -> list[str]:
    """The command as typed: ``python -m batchnorm`` for ``__main__.py``, else the program."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return []
    path = Path(argv[0])
    program = path.name
    if path.suffix == ".py" and path.resolve().is_relative_to(_PACKAGE):
        module = path.resolve().relative_to(_PACKAGE.parent).with_suffix("").parts
        program = "python -m " + ".".join(module[:-1] if module[-1] == "__main__" else module)
    elif program == "__main__.py":  # python -m <package> of another package (pytest, ...)
        program = f"python -m {path.parent.name}"
    return [program, *argv[1:]]


def provenance(argv: list[str] | None = None) -> dict:
    """Versions, machine, git revision, command and start time of the current process."""
    import batchnorm

    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "batchnorm": batchnorm.__version__,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "git": git_state(),
        "command": command_line(argv),
        "started": _now(),
    }


# --------------------------------------------------------------------------------------------
# The folder's life: create (refusing an existing run), resume, finish.


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO], Any], *, text: bool = False
) -> None:
    """Write a file with ``write(f)`` through a temporary file in the same folder and a rename.

    The one way this wing writes a file (config, summaries, reports, figures, checkpoints, the
    data cache): the data is flushed to disk before an atomic ``os.replace``, so a reader or a
    crash sees the old file or the new one, never half of one, and a failed ``write`` leaves
    the old file and no temporary behind. The new file gets the permissions a plain ``open``
    would give (0666 less the umask), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w" if text else "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON with `atomic_write`."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, default=str) + "\n"), text=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (a report) with `atomic_write`."""
    atomic_write(path, lambda f: f.write(text), text=True)


def save_figure(path: str | os.PathLike, fig, dpi: int) -> None:
    """Save a matplotlib figure as PNG with `atomic_write`."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


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


def create(out: str | os.PathLike, experiment: str, config: Any, **extra: Any) -> dict:
    """Make the new run folder ``out`` and write its config.json; refuses as `check_new`.

    ``config`` is the experiment's frozen dataclass; ``extra`` adds top-level entries.
    Returns the record written.
    """
    out = check_new(out)
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


def read_record(run_dir: str | os.PathLike, experiment: str | None = None) -> dict:
    """The config.json of the run in ``run_dir``, checked to be a run of ``experiment``.

    Raises:
        RunFolderError: no config.json, one that is not a run's record ({"experiment": name,
            "config": {...}, ...}), or a run of another experiment than ``experiment``.
    """
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise RunFolderError(f"{run_dir} is not a run folder: it has no {CONFIG}")
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
    if experiment is not None and record["experiment"] != experiment:
        raise RunFolderError(
            f"{run_dir} holds a {record['experiment']} run, not {experiment}; resume it with "
            f"the {record['experiment']} command"
        )
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
    removes the temporaries a killed `atomic_write` left (``.<name>.*.tmp``): the files they
    were meant to replace are whole, old or new.
    """
    hold(run_dir)
    for leftover in Path(run_dir).rglob(".*.tmp"):
        leftover.unlink(missing_ok=True)
    new = json.loads(json.dumps(dataclasses.asdict(config)))  # as config.json holds it
    changes = {k: v for k, v in new.items() if record["config"].get(k) != v}
    record = {**record, "config": new, "finished": None}
    record["resumed"] = [
        *record.get("resumed", []),
        {"command": command_line(), "started": _now(), "changes": changes},
    ]
    write_json(Path(run_dir) / CONFIG, record)
    return record


def finish(run_dir: str | os.PathLike) -> None:
    """Mark the run in ``run_dir`` finished (after its summary, report and figure)."""
    record = read_record(run_dir)
    record["finished"] = _now()
    write_json(Path(run_dir) / CONFIG, record)
    _release(run_dir)


# --------------------------------------------------------------------------------------------
# Flags: parsed into the experiment's config, checked there, reported under the flag's name.


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag that sets one field of an experiment's config."""

    field: str  # the config field
    type: Callable[[str], Any] | type  # parses the text; bool: --flag / --no-flag
    help: str


def _new_folder(text: str) -> Path:
    try:
        return check_new(text)
    except RunFolderError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _run_folder(text: str) -> Path:
    try:
        read_record(text)
    except RunFolderError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return Path(text)


def add_flags(
    parser: argparse.ArgumentParser,
    config_class: type,
    flags: dict[str, Flag],
    experiment: str,
    *,
    check_out: bool = True,
) -> None:
    """Add ``flags`` (defaults shown from ``config_class``) and ``--out`` / ``--resume``.

    Every flag defaults to None, so `settings_from_args` knows which ones were given.
    ``check_out``: refuse an unusable ``--out`` while parsing (`check_new`); False where
    another process creates the folder (the other ranks of a distributed run).
    """
    defaults = {
        f.name: f.default for f in dataclasses.fields(config_class)
        if f.default is not dataclasses.MISSING
    }  # fmt: skip
    for flag, spec in flags.items():
        shown = defaults.get(spec.field, "required")
        if isinstance(shown, tuple):
            shown = ",".join(map(str, shown))
        text = f"{spec.help} (default: {shown})"
        if spec.type is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            parser.add_argument(flag, type=spec.type, default=None, help=text)
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--out", metavar="RUN_DIR", type=_new_folder if check_out else Path, default=None,
        help=f"folder of a new run; must not exist or be empty "
        f"(default: {default_out(experiment).parent}/{experiment}-<date>-<time>)",
    )  # fmt: skip
    where.add_argument(
        "--resume", metavar="RUN_DIR", type=_run_folder, default=None,
        help="continue the run in RUN_DIR with the settings in its config.json",
    )  # fmt: skip


def existing_folder(text: str) -> str:
    """Flag type of a folder the user names (``--data-dir``): it must exist.

    A mistyped folder would otherwise be passed over by the data search, and the run would
    silently use data from elsewhere.
    """
    if not text.strip() or not Path(text).expanduser().is_dir():  # "" would be the cwd
        what = ("empty" if not text.strip() else "a file" if Path(text).expanduser().exists()
                else "no such folder")  # fmt: skip
        raise argparse.ArgumentTypeError(f"expected an existing folder, got {text!r} ({what})")
    return text


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def settings_from_args(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    config_class: type,
    flags: dict[str, Flag],
    *,
    may_change: Iterable[str] = (),
    experiment: str | None = None,
):
    """The config the flags ask for, and the recorded config.json when resuming (else None).

    A new run: the given flags over the config's defaults. A resumed run: the recorded
    settings (of a run of ``experiment``, when given), with the given flags allowed to differ
    only for fields in ``may_change``. Any `SettingError` becomes ``parser.error`` naming the
    flag (exit code 2).
    """
    given = {s.field: v for f, s in flags.items() if (v := getattr(args, _dest(f))) is not None}
    flag_of = {s.field: f for f, s in flags.items()}
    record = None
    try:
        if args.resume is None:
            missing = [
                flag_of.get(f.name, f.name) for f in dataclasses.fields(config_class)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                and f.name not in given
            ]  # fmt: skip
            if missing:
                parser.error(f"a new run needs {', '.join(missing)}")
            return config_class(**given), None
        record = read_record(args.resume, experiment)
        try:
            recorded = config_class(**record["config"])
        except TypeError as error:  # a field this version lacks, or lacks a required one
            raise RunFolderError(
                f"{args.resume}/{CONFIG}'s settings do not fit {config_class.__name__} of "
                f"this version ({error})"
            ) from None
        allowed = set(may_change)
        for field, value in given.items():
            if field not in allowed and value != getattr(recorded, field):
                can = ", ".join(flag_of[f] for f in allowed if f in flag_of) or "no flag"
                parser.error(
                    f"argument {flag_of[field]}: a resumed run keeps its settings; "
                    f"{args.resume}/{CONFIG} has {field} = {getattr(recorded, field)!r} "
                    f"(with --resume, {can} may change)"
                )
        return dataclasses.replace(recorded, **given), record
    except SettingError as error:
        if error.field in flag_of:
            parser.error(f"argument {flag_of[error.field]}: {error.reason}")
        parser.error(str(error))
    except RunFolderError as error:
        parser.error(f"argument --resume: {error}")
