"""The IDX format and the 28x28 data sets of Sec. 4.1: read, found, checksummed, checked.

Below `fetch` (which checks a download by loading it) and `data` (which searches the places
a data set may be); imports neither.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


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


IDX_FILES = {  # ImageDataset field -> standard IDX file name (optionally with .gz)
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_TORCHVISION_DIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


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


def load_idx(name: str, directory: Path, checksums: dict[str, str] | None = None) -> ImageDataset:
    """The data set `name` from the four IDX files in `directory` (see `find_idx`).

    Args:
        checksums: file name -> sha256; when given, every file is checked before it is read
            (a file with no known sum is an error); None for a user's own files.

    Raises:
        FileNotFoundError: no complete set of files; ValueError: a sum, the format or
            `as_dataset`'s checks fail.
    """
    files = find_idx(directory, name)
    if checksums is not None:
        for file in files.values():
            if file.name not in checksums:
                raise ValueError(f"{file}: no known sha256 (expected {sorted(checksums)})")
            check_sha256(file, checksums[file.name])
    arrays = {field: read_idx(file) for field, file in files.items()}
    note = "sha256 verified" if checksums is not None else "user files, not checksummed"
    return as_dataset(name, arrays, f"IDX files in {files['train_images'].parent} ({note})")


def as_dataset(name: str, arrays: dict[str, np.ndarray], source: str) -> ImageDataset:
    """Validate shapes, dtypes and label range; wrap the arrays as tensors.

    Args:
        arrays: the four `IDX_FILES` fields -> arrays; images uint8 (N, 28, 28), labels
            integers in 0..9, one per image.
        source: where the arrays came from, for the messages and `ImageDataset.source`.
    """
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
