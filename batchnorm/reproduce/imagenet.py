"""ImageNet-format data and evaluation (Sec. 4.2, 4.2.3): folders, crops, 144-crop, ensembles.

A folder ``root/{train,val}/<class>/*.JPEG`` is decoded with Pillow (no torchvision):

- training: random-resized crop (8%-100% of the area, aspect 3/4-4/3, as GoogLeNet) to 224,
  horizontal flip, and photometric distortions at two strengths, "strong" for the
  Inception baseline and "weak" for the BN-x recipes (Sec. 4.2.1 "reduce the photometric
  distortions"); `epoch_order` gives a thorough (global) or a shard-local shuffle.
- validation: resize the shorter side to 256, one 224 center crop, top-1 and top-5.
- GoogLeNet's multi-crop test (Szegedy et al. 2015, Sec. 7): shorter side resized to 256,
  288, 320 and 352; the left, center and right squares (top, center, bottom for portrait
  images); from each square the 4 corner and the center 224 crops plus the square resized
  to 224; each also mirrored: 4 x 3 x 6 x 2 = 144 crops, softmax averaged over crops.
- ensembles (Sec. 4.2.3, Figure 4): arithmetic mean of class probabilities over models.

Example:
    >>> ds = ImageFolder("/data/imagenet", "val", transform=CenterCrop(224))
    >>> x, y = ds[0]          # x: (3, 224, 224) float32, normalized; y: int
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "RandomResizedCropFlip",
    "CenterCrop",
    "MultiCrop144",
    "DISTORTIONS",
    "distort",
    "to_tensor",
    "epoch_order",
    "topk_correct",
    "predict_probabilities",
    "evaluate",
]

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
# ImageNet channel statistics of pixels in [0, 1] (the values every public port uses)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

# Photometric distortion strengths: maximal relative change of brightness, contrast,
# saturation, and hue rotation as a fraction of a full turn. The paper states only that
# BN-x uses fewer distortions; "strong" follows GoogLeNet-lineage color jitter, "weak" is 1/4.
DISTORTIONS: dict[str, tuple[float, float, float, float]] = {
    "strong": (0.4, 0.4, 0.4, 0.1),
    "weak": (0.1, 0.1, 0.1, 0.0),
    "none": (0.0, 0.0, 0.0, 0.0),
}


class ImageFolder(torch.utils.data.Dataset):
    """``root/split/<class>/<image>`` with classes sorted by folder name (label = index).

    Args:
        root: the data set folder, holding ``train`` and ``val``.
        split: "train" or "val" (any subfolder name works).
        transform: PIL image (RGB) -> tensor; given the sample's index-derived generator.
        seed: makes random transforms a pure function of (seed, epoch, index).
    """

    def __init__(self, root, split: str, transform: Callable, seed: int = 0):
        self.root = Path(root) / split
        if not self.root.is_dir():
            raise FileNotFoundError(f"no folder {self.root} (expected root/{split}/<class>/*)")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((self.root / name).iterdir())
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert("RGB")
        generator = np.random.default_rng([self.seed, self.epoch, index])
        return self.transform(image, generator), label


def to_tensor(image: Image.Image) -> Tensor:
    """PIL RGB -> (3, H, W) float32 in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _normalize(x: Tensor) -> Tensor:
    return (x - MEAN) / STD


def _grey(x: Tensor) -> Tensor:
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)  # ITU-R 601 luma


def distort(x: Tensor, strength: str, rng: np.random.Generator) -> Tensor:
    """Photometric distortions of a (3, H, W) image in [0, 1], in random order.

    brightness: x * b; contrast: blend with the mean grey level; saturation: blend with the
    grey image; hue: rotate the chroma plane (YIQ) by up to ``hue`` of a turn.
    """
    b, c, s, h = DISTORTIONS[strength]
    if not any((b, c, s, h)):
        return x
    # draw every factor first, so the draws do not depend on the order applied
    factors = {
        "brightness": rng.uniform(1 - b, 1 + b),
        "contrast": rng.uniform(1 - c, 1 + c),
        "saturation": rng.uniform(1 - s, 1 + s),
        "hue": rng.uniform(-h, h) * 2 * math.pi,
    }
    for i in rng.permutation(4):
        name = ("brightness", "contrast", "saturation", "hue")[i]
        f = factors[name]
        if name == "brightness":
            x = x * f
        elif name == "contrast":
            mean = _grey(x).mean()
            x = (x - mean) * f + mean
        elif name == "saturation":
            grey = _grey(x)
            x = (x - grey) * f + grey
        elif h:
            x = _rotate_hue(x, f)
    return x.clamp_(0.0, 1.0)


def _rotate_hue(x: Tensor, angle: float) -> Tensor:
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    cos, sin = math.cos(angle), math.sin(angle)
    rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    matrix = torch.linalg.inv(to_yiq) @ rotate @ to_yiq
    return torch.einsum("ij,jhw->ihw", matrix, x)


class RandomResizedCropFlip:
    """Training transform: random-resized crop to ``size``, flip, distortions, normalize."""

    def __init__(self, size: int = 224, distortions: str = "strong", scale=(0.08, 1.0)):
        if distortions not in DISTORTIONS:
            raise ValueError(f"distortions must be one of {list(DISTORTIONS)}")
        self.size, self.distortions, self.scale = size, distortions, scale

    def crop_box(self, width: int, height: int, rng: np.random.Generator):
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(0, width - w + 1))
                top = int(rng.integers(0, height - h + 1))
                return left, top, left + w, top + h
        side = min(width, height)  # fallback: the center square
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Tensor:
        box = self.crop_box(*image.size, rng)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=box)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return _normalize(distort(to_tensor(image), self.distortions, rng))


def _resize_shorter(image: Image.Image, side: int) -> Image.Image:
    w, h = image.size
    scale = side / min(w, h)
    return image.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BILINEAR)


def _center_box(width: int, height: int, size: int):
    left, top = (width - size) // 2, (height - size) // 2
    return left, top, left + size, top + size


class CenterCrop:
    """Validation transform: shorter side to ``resize`` (256 for 224), one center crop."""

    def __init__(self, size: int = 224, resize: int | None = None):
        self.size = size
        self.resize = resize or round(size * 256 / 224)

    def __call__(self, image: Image.Image, rng=None) -> Tensor:
        image = _resize_shorter(image, self.resize)
        return _normalize(to_tensor(image.crop(_center_box(*image.size, self.size))))


class MultiCrop144:
    """GoogLeNet's 144 test crops of one image -> (144, 3, size, size).

    Order: scale (4) x square (3: left/top, center, right/bottom) x crop (6: top-left,
    top-right, bottom-left, bottom-right, center, whole square resized) x mirror (2).
    """

    def __init__(self, size: int = 224, scales: Sequence[int] | None = None):
        self.size = size
        # GoogLeNet's 256, 288, 320, 352 for 224 crops; proportionally for other sizes
        self.scales = tuple(scales or (round(size * s / 224) for s in (256, 288, 320, 352)))

    def squares(self, image: Image.Image) -> list[Image.Image]:
        w, h = image.size
        side = min(w, h)
        if w >= h:
            offsets = [(0, 0), ((w - side) // 2, 0), (w - side, 0)]
        else:
            offsets = [(0, 0), (0, (h - side) // 2), (0, h - side)]
        return [image.crop((x, y, x + side, y + side)) for x, y in offsets]

    def __call__(self, image: Image.Image, rng=None) -> Tensor:
        s, crops = self.size, []
        for scale in self.scales:
            for square in self.squares(_resize_shorter(image, scale)):
                side = square.size[0]
                boxes = [(0, 0), (side - s, 0), (0, side - s), (side - s, side - s)]
                views = [square.crop((x, y, x + s, y + s)) for x, y in boxes]
                views.append(square.crop(_center_box(side, side, s)))
                views.append(square.resize((s, s), Image.BILINEAR))
                for view in views:
                    crops.append(view)
                    crops.append(view.transpose(Image.FLIP_LEFT_RIGHT))
        return torch.stack([_normalize(to_tensor(c)) for c in crops])


def epoch_order(
    n: int, epoch: int, seed: int = 0, thorough: bool = True, chunk: int = 1024
) -> Tensor:
    """The visiting order of ``n`` examples in ``epoch``: a pure function of its arguments.

    thorough=True: one global permutation (Sec. 4.2.1 "shuffle training examples more
    thoroughly", which the paper credits with about 1% accuracy). thorough=False: a
    shard-local shuffle, as a record-file pipeline gives: the class-sorted list is cut into
    ``chunk``-sized shards, the shard order and each shard's contents are shuffled, so one
    mini-batch often holds several examples of the same class.
    """
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    g = torch.Generator().manual_seed(int(state >> np.uint64(1)))
    if thorough:
        return torch.randperm(n, generator=g)
    shards = torch.arange(n).split(chunk)
    order = torch.randperm(len(shards), generator=g)
    return torch.cat([shards[i][torch.randperm(len(shards[i]), generator=g)] for i in order])


def topk_correct(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """How many rows of (N, classes) ``scores`` have the label among their top k, per k."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (N, kmax)
    hits = top == labels.unsqueeze(1)
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def predict_probabilities(models: Sequence[torch.nn.Module], x: Tensor) -> Tensor:
    """Class probabilities averaged over crops and models (Sec. 4.2.3, Figure 4).

    Args:
        models: one model, or several for an ensemble (arithmetic mean of probabilities).
        x: (N, 3, H, W) for single crops or (N, crops, 3, H, W) for multi-crop.
    Returns:
        (N, classes) probabilities.
    """
    crops = x.shape[1] if x.dim() == 5 else 1
    flat = x.flatten(0, 1) if x.dim() == 5 else x  # (N*crops, 3, H, W)
    total = None
    for model in models:
        model.eval()
        p = model(flat).softmax(dim=1)  # (N*crops, classes)
        p = p.view(-1, crops, p.shape[1]).mean(dim=1)  # average over crops -> (N, classes)
        total = p if total is None else total + p
    return total / len(models)


@torch.no_grad()
def evaluate(
    models: Sequence[torch.nn.Module], loader, device="cpu", ks: Sequence[int] = (1, 5)
) -> dict:
    """Top-k accuracy of an ensemble over a loader of (x, labels); x as `predict_probabilities`."""
    counts, n = [0] * len(ks), 0
    for x, labels in loader:
        p = predict_probabilities(models, x.to(device))
        for i, c in enumerate(topk_correct(p, labels.to(device), ks)):
            counts[i] += c
        n += len(labels)
    return {"n": n, **{f"top{k}": c / max(1, n) for k, c in zip(ks, counts)}}
