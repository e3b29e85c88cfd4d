"""ImageNet-format pipeline (Sec. 4.2): transforms, center crop, 144 crops, ensembles, training."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from batchnorm.reproduce import imagenet, imagenet_train

pytestmark = pytest.mark.usefixtures("one_thread")


CLASSES = ("n01", "n02", "n03")
# (width, height) of the generated images: landscape, portrait and square, per class
SIZES = ((48, 40), (40, 56), (44, 44), (60, 36))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    g = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                w, h = SIZES[i % len(SIZES)]
                pixels = g.integers(0, 60, size=(h, w, 3)) + 60 * label  # class = brightness
                image = Image.fromarray(pixels.astype(np.uint8), "RGB")
                image.save(root / split / name / f"img{i}.JPEG", quality=95)
    (root / "train" / "n01" / "notes.txt").write_text("not an image")
    return root


def test_folder_scan(folder):
    ds = imagenet.ImageFolder(folder, "train", imagenet.CenterCrop(16))
    assert ds.classes == list(CLASSES)
    assert len(ds) == 12  # the .txt file is skipped
    assert [label for _, label in ds.samples] == [0] * 4 + [1] * 4 + [2] * 4


@pytest.mark.parametrize("strength", ["strong", "weak", "none"])
def test_training_transform(folder, strength):
    ds = imagenet.ImageFolder(folder, "train", imagenet.RandomResizedCropFlip(24, strength))
    x, y = ds[5]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and y == 1
    assert torch.equal(ds[5][0], x)  # a pure function of (seed, epoch, index)
    ds.epoch = 1
    assert not torch.equal(ds[5][0], x)


def test_no_distortion_keeps_pixels():
    x = torch.rand(3, 8, 8)
    assert torch.equal(imagenet.distort(x.clone(), "none", np.random.default_rng(0)), x)
    y = imagenet.distort(x.clone(), "strong", np.random.default_rng(0))
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1


def test_hue_rotation_by_full_turn_is_identity():
    x = torch.rand(3, 5, 5)
    assert torch.allclose(imagenet._rotate_hue(x, 2 * np.pi), x, atol=1e-5)


def test_center_crop_matches_manual_crop():
    # oracle: a 20x10 image whose shorter side is already `resize`: the crop is pure indexing
    pixels = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    x = imagenet.CenterCrop(8, resize=10)(Image.fromarray(pixels, "RGB"))
    expected = torch.from_numpy(pixels[1:9, 6:14].astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.allclose(x, (expected - imagenet.MEAN) / imagenet.STD, atol=1e-6)


@pytest.mark.parametrize("size", SIZES)
def test_multicrop_144(size):
    g = np.random.default_rng(1)
    image = Image.fromarray(g.integers(0, 255, (size[1], size[0], 3)).astype(np.uint8), "RGB")
    crops = imagenet.MultiCrop144(16)(image)
    assert crops.shape == (4 * 3 * 6 * 2, 3, 16, 16)
    # every odd crop is the mirror of the one before it
    assert torch.allclose(crops[1::2], crops[0::2].flip(-1), atol=1e-6)


def test_epoch_order():
    thorough = imagenet.epoch_order(100, 0, thorough=True)
    local = imagenet.epoch_order(100, 0, thorough=False, chunk=10)
    for order in (thorough, local):
        assert sorted(order.tolist()) == list(range(100))
    # shard-local: each run of 10 stays inside one shard of 10 consecutive indices
    assert all(len(set((local[i : i + 10] // 10).tolist())) == 1 for i in range(0, 100, 10))
    assert torch.equal(imagenet.epoch_order(100, 3), imagenet.epoch_order(100, 3))


class _Fixed(torch.nn.Module):
    """A 'model' returning fixed logits per crop index, to check averaging by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[: len(x)]


def test_ensemble_is_mean_of_probabilities():
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    x = torch.zeros(3, 2, 1, 1, 1)  # 3 images x 2 crops
    p = imagenet.predict_probabilities([_Fixed(a), _Fixed(b)], x)

    # oracle: numpy softmax, mean over crops, then over models
    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    expected = (
        softmax(a.numpy()).reshape(3, 2, 4).mean(1) + softmax(b.numpy()).reshape(3, 2, 4).mean(1)
    ) / 2
    assert torch.allclose(p, torch.from_numpy(expected), atol=1e-6)
    assert torch.allclose(p.sum(1), torch.ones(3))


def test_topk_correct():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1]])
    assert imagenet.topk_correct(scores, torch.tensor([2, 0]), ks=(1, 2)) == [1, 2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_training_entry_rejects_too_few_images(folder, tmp_path, monkeypatch):
    # One process inside a gloo group of world size 1: the code path torchrun takes.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    out = tmp_path / "run"
    args = ["--data", str(folder), "--recipe", "bn_x5", "--out", str(out), "--image-size", "32",
            "--width", "0.0625", "--workers", "0", "--log-every", "1", "--checkpoint-every", "1",
            "--eval-batch", "4"]  # fmt: skip
    # 12 images / 32 per step is zero steps: the recipe's batch must fit, so it raises
    with pytest.raises(ValueError, match="fewer than one step"):
        imagenet_train.main(args + ["--max-steps", "2"])
    assert not torch.distributed.is_initialized()


def _two_class_folder(root):
    g = np.random.default_rng(0)
    for split, count in (("train", 33), ("val", 3)):
        for label, name in enumerate(CLASSES[:2]):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = g.integers(0, 60, size=(36, 36, 3)) + 120 * label
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.JPEG")
    return root


def _one_process_group(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)


def test_training_entry_runs_and_resumes(tmp_path, monkeypatch):
    root = _two_class_folder(tmp_path / "data")
    _one_process_group(monkeypatch)
    out = tmp_path / "run"
    args = ["--data", str(root), "--recipe", "bn_x5", "--out", str(out), "--image-size", "32",
            "--width", "0.0625", "--workers", "0", "--log-every", "1", "--checkpoint-every", "1",
            "--eval-batch", "4", "--epochs", "2"]  # fmt: skip
    # 66 images = 2 steps of 32 per epoch; stop after 3 steps (mid-epoch 2), then resume
    assert imagenet_train.main(args + ["--max-steps", "3"]) == 0
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 3 and saved["rng"]["cpu"].dtype == torch.uint8  # Dropout's state
    # the run is finished at 3 steps; --resume with a larger --max-steps trains further
    assert imagenet_train.main(["--resume", str(out), "--max-steps", "4"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4]
    validations = [r for r in records if "top1" in r]
    assert validations and all(0 <= r["top1"] <= r["top5"] <= 1 for r in validations)
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 1 and config["lr0"] == pytest.approx(0.0075)
    assert config["config"]["max_steps"] == 4 and config["finished"] is not None
    assert [r["changes"] for r in config["resumed"]] == [{"max_steps": 4}]
    for refused in (["--resume", str(out)], args + ["--max-steps", "5"],
                    ["--resume", str(out), "--max-steps", "6", "--seed", "1"]):
        with pytest.raises(SystemExit) as exit_info:  # finished; exists; settings kept
            imagenet_train.main(refused)
        assert exit_info.value.code == 2
    assert not torch.distributed.is_initialized()
    # evaluation of an ensemble of the same checkpoint twice, with 144 crops
    result = imagenet_train.evaluate_checkpoints(
        str(root), [str(out / "checkpoint.pt")] * 2, "bn_x5", "144", 32, 0.0625, 0, 2
    )
    assert result["n"] == 6 and 0 <= result["top1"] <= result["top5"] <= 1


@pytest.mark.parametrize("torch_bn,sync_bn", [(False, False), (True, False), (False, True)])
def test_bn_layer_choice(torch_bn, sync_bn):
    import batchnorm

    cfg = imagenet_train.TrainConfig(
        data="unused", width=0.0625, torch_bn=torch_bn, sync_bn=sync_bn
    )
    model = imagenet_train._build_model(cfg, 3, "cpu")
    kinds = {
        type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    }
    if sync_bn:
        expected = batchnorm.SyncBatchNorm
    else:
        expected = torch.nn.BatchNorm2d if torch_bn else batchnorm.BatchNorm2d
    assert kinds == {expected}


def test_resume_keeps_each_metrics_step_once(tmp_path):
    # Audit defect: a run killed between checkpoints had logged steps it redoes after
    # --resume, so metrics.jsonl held them twice (and a line torn by the kill broke readers).
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.9}, {"step": 2, "top1": 0.5},
             {"step": 3, "loss": 1.8}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    imagenet_train._drop_metrics_after(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:3]


def test_resume_mid_epoch_with_dropout_is_bit_identical(tmp_path, monkeypatch):
    # Audit defect: Inception's Dropout drew from torch's global generator, which neither
    # the checkpoint held nor the data loaders left alone, so a resumed run trained on with
    # other masks than an uninterrupted one.
    root = _two_class_folder(tmp_path / "data")
    _one_process_group(monkeypatch)
    args = ["--data", str(root), "--recipe", "inception", "--image-size", "32", "--width",
            "0.0625", "--workers", "0", "--log-every", "1", "--checkpoint-every", "1",
            "--eval-batch", "4", "--epochs", "2"]  # fmt: skip
    assert imagenet_train.main([*args, "--max-steps", "3", "--out", str(tmp_path / "a")]) == 0
    assert imagenet_train.main([*args, "--max-steps", "1", "--out", str(tmp_path / "b")]) == 0
    assert imagenet_train.main(["--resume", str(tmp_path / "b"), "--max-steps", "3"]) == 0
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_a_missing_data_folder_is_an_argparse_error(tmp_path, capsys):
    # Audit: `--data <typo>` was a FileNotFoundError traceback; now exit code 2 naming it.
    with pytest.raises(SystemExit) as exit_info:
        imagenet_train.main(["--data", str(tmp_path / "typo"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --data: expected an existing folder" in err
    assert not (tmp_path / "run").exists()
