"""Settings and their flags: the checks every experiment's config makes, and the command line.

Every setting is checked once, in the experiment's frozen config (`require`); the command
line only parses flags into it at the edge (`add_flags`, `settings_from_args`) and reports a
bad value as an argparse error naming the flag (exit code 2). `open_from_args` is every
experiment command's one entry: the config and its run folder (`run_folder`), each checked
once, before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from batchnorm.reproduce.run_folder import (
    CONFIG,
    ResumeCheck,
    RunFolder,
    RunFolderError,
    check_new,
    check_recorded,
    default_out,
    read_record,
)

__all__ = [
    "SettingError",
    "require",
    "finite",
    "SEED_MAX",
    "Flag",
    "add_flags",
    "existing_folder",
    "settings_from_args",
    "open_from_args",
]


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
    # Only that RUN_DIR holds a record; `settings_from_args` reads it, once.
    try:
        return check_recorded(text)
    except RunFolderError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
    ``experiment`` names the default run folder (`run_folder.default_out`). ``check_out``:
    refuse an unusable ``--out`` while parsing (`run_folder.check_new`); False where
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


def open_from_args(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    config_class: type,
    flags: dict[str, Flag],
    experiment: str,
    *,
    may_change: Iterable[str] = (),
    check: ResumeCheck | None = None,
    writer: bool = True,
    folder_name: str | None = None,
) -> tuple[Any, RunFolder]:
    """An experiment command's one entry: its config and its run folder, each checked once.

    The settings as `settings_from_args` gives them; the folder: ``--out`` as its flag
    checked it while parsing, the default ``runs/<folder_name>-<date>-<time>`` checked here,
    or ``--resume``'s run with the experiment's ``check`` passed and the folder held (see
    `run_folder.RunFolder.resumed`). Any refusal is ``parser.error`` naming the flag (exit
    code 2), before any work. ``writer``: as in `run_folder.open_run` (and ``check_out`` of
    `add_flags`). Sets ``args.run_dir`` for the command line's message on Ctrl-C.
    """
    config, record = settings_from_args(
        parser, args, config_class, flags, may_change=may_change, experiment=experiment
    )
    if record is not None:
        try:
            folder = RunFolder.resumed(args.resume, experiment, record, config, check,
                                       writer=writer)  # fmt: skip
        except RunFolderError as error:
            parser.error(f"argument --resume: {error}")
    elif args.out is not None:
        folder = RunFolder(args.out, experiment)  # checked by --out's type while parsing
    else:
        out = default_out(folder_name or experiment)
        try:
            folder = RunFolder.new(out, experiment) if writer else RunFolder(out, experiment)
        except RunFolderError as error:
            parser.error(f"argument --out: {error}")
    args.run_dir = folder.path
    return config, folder
