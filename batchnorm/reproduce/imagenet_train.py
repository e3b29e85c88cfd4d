"""Full-scale BN-Inception training on ImageNet (Sec. 4.2), one recipe, under torchrun + DDP.

Run unchanged on one process, several GPUs, or several nodes:

    torchrun --nproc_per_node=8 -m batchnorm.reproduce.imagenet_train \\
        --data /data/imagenet --recipe bn_x30 --out runs/bn_x30 --epochs 40

Each replica takes 32 images per step (Sec. 4.2) and, by default, normalizes over its own
32 as the paper's workers did; ``--sync-bn`` merges the statistics over all replicas with
`batchnorm.SyncBatchNorm` instead. NCCL on GPUs, gloo on CPUs. Rank 0 writes atomic
checkpoints (``--resume`` continues mid-epoch from the last one, with the same batch order)
and metrics.jsonl; validation is single center-crop top-1/top-5 on every rank's shard,
summed over ranks. ``--eval-only --checkpoints a.pt b.pt --crops 144`` evaluates one
checkpoint or an ensemble with GoogLeNet's 144 crops (Sec. 4.2.3).

The paper's workers were asynchronous; here replicas are synchronous (DDP), so a step
consumes 32 x world_size images. ``--lr-scaling linear`` (the default) multiplies the
recipe's learning rate by world_size (Goyal et al. 2017's rule for synchronous SGD);
``none`` keeps the paper's value. The decay clock counts epochs, as GoogLeNet's schedule.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from batchnorm.reproduce.imagenet import (
    CenterCrop,
    ImageFolder,
    MultiCrop144,
    RandomResizedCropFlip,
    epoch_order,
    evaluate,
)
from batchnorm.reproduce.models.inception import build_inception, parameter_count
from batchnorm.reproduce.recipes import RECIPES
from batchnorm.reproduce.train import load_checkpoint, save_checkpoint

__all__ = ["TrainConfig", "main", "train", "evaluate_checkpoints"]


@dataclass(frozen=True)
class TrainConfig:
    """One full-scale training run (flags of the same names, with dashes)."""

    data: str  # folder with train/<class>/*.JPEG and val/<class>/*.JPEG
    recipe: str = "bn_x30"  # key of batchnorm.reproduce.recipes.RECIPES
    out: str = "runs/imagenet"  # checkpoints and metrics.jsonl
    epochs: float = 40.0  # training length in epochs of the training set
    max_steps: int | None = None  # stop after this many steps (smoke tests, budgets)
    image_size: int = 224  # crop side (224 in the paper; tests use 32)
    width: float = 1.0  # channel multiplier (1 = Figure 5)
    sync_bn: bool = False  # merge BN statistics over replicas (the paper: per replica)
    # torch.nn.BatchNorm2d instead of ours: same math and state_dict keys, fewer GPU kernel
    # launches (batch 32 per GPU is launch-bound; see docs/imagenet.md's throughput)
    torch_bn: bool = False
    lr_scaling: str = "linear"  # "linear": lr x world_size for synchronous replicas; "none"
    workers: int = 8  # DataLoader processes per replica (Pillow decoding is the bottleneck)
    checkpoint_every: int = 2000  # steps between checkpoints (and one at each epoch end)
    log_every: int = 100  # steps between metrics lines
    eval_batch: int = 64  # validation batch per replica
    seed: int = 0  # initial weights, batch order and augmentation draws
    resume: bool = False  # continue from out/checkpoint.pt
    channels_last: bool = False  # NHWC memory format (faster convs on recent GPUs)


def _setup_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's process group if launched by it; else one local process."""
    if "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), device


class _Shard(torch.utils.data.Sampler):
    """This rank's slice of `epoch_order`, from ``start`` on (mid-epoch resume)."""

    def __init__(self, n, epoch, seed, thorough, rank, world, batch, start=0):
        order = epoch_order(n, epoch, seed, thorough)
        per_rank = n // (world * batch) * batch  # equal whole batches on every rank
        self.indices = order[rank * per_rank : (rank + 1) * per_rank][start * batch :].tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def _loader(dataset, indices_or_sampler, batch, workers, drop_last):
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        sampler=indices_or_sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=False,
    )


def _build_model(cfg: TrainConfig, num_classes: int, device):
    recipe = RECIPES[cfg.recipe]
    torch.manual_seed(cfg.seed)
    extra = {"bn_layer": torch.nn.BatchNorm2d} if cfg.torch_bn else {}
    model = build_inception(recipe.model, num_classes=num_classes, width=cfg.width, **extra)
    if cfg.sync_bn:
        from batchnorm.distributed import SyncBatchNorm  # lazy: only --sync-bn needs it

        model = SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def train(cfg: TrainConfig) -> dict:
    """Train ``cfg.recipe``; returns the last validation metrics (on every rank)."""
    rank, world, device = _setup_distributed()
    recipe = RECIPES[cfg.recipe]
    out = Path(cfg.out)
    train_set = ImageFolder(
        cfg.data, "train", RandomResizedCropFlip(cfg.image_size, recipe.distortions), cfg.seed
    )
    val_set = ImageFolder(cfg.data, "val", CenterCrop(cfg.image_size))
    model = _build_model(cfg, len(train_set.classes), device)
    ddp = world > 1 or dist.is_initialized()
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    lr0 = recipe.lr * (world if cfg.lr_scaling == "linear" else 1)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr0, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    batch = recipe.batch_size
    steps_per_epoch = len(train_set) // (world * batch)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} images are fewer than one step of {world}x{batch}")
    total = int(cfg.epochs * steps_per_epoch)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    step = 0
    ckpt = out / "checkpoint.pt"
    if cfg.resume and ckpt.exists():
        saved = load_checkpoint(ckpt)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        step = int(saved["step"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(
            json.dumps(
                {
                    "config": dataclasses.asdict(cfg),
                    "recipe": dataclasses.asdict(recipe),
                    "world_size": world,
                    "lr0": lr0,
                    "parameters": parameter_count(model),
                    "torch": torch.__version__,
                    "device": str(device),
                },
                indent=2,
            )
        )

    def save():
        if rank == 0:
            save_checkpoint(
                ckpt,
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
            )

    def log(record):
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def validate():
        sampler = list(range(rank, len(val_set), world))  # every rank a disjoint shard
        loader = _loader(val_set, sampler, cfg.eval_batch, cfg.workers, False)
        metrics = evaluate([model], loader, device)
        counts = torch.tensor(
            [metrics["top1"] * metrics["n"], metrics["top5"] * metrics["n"], metrics["n"]],
            dtype=torch.float64,
            device=device,
        )
        if ddp:
            dist.all_reduce(counts)
        model.train()
        return {"top1": float(counts[0] / counts[2]), "top5": float(counts[1] / counts[2])}

    model.train()
    metrics: dict = {}
    started, seen = time.perf_counter(), 0
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        train_set.epoch = epoch
        sampler = _Shard(
            len(train_set), epoch, cfg.seed, recipe.thorough_shuffle, rank, world, batch, offset
        )
        for x, y in _loader(train_set, sampler, batch, cfg.workers, True):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            lr = recipe.lr_at(step, steps_per_epoch) * lr0 / recipe.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(y) * world
            if step % cfg.log_every == 0 or step == total:
                # checked only here: reading the loss waits for the GPU
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}: diverged")
                rate = seen / (time.perf_counter() - started)
                log({"step": step, "epoch": step / steps_per_epoch, "loss": loss.item(),
                     "lr": lr, "images_per_s": rate})  # fmt: skip
            if step % cfg.checkpoint_every == 0:
                save()
            if step >= total:
                break
        if step % steps_per_epoch == 0 or step >= total:
            save()
            metrics = {"step": step, **validate()}
            log(metrics)
    if not metrics:
        metrics = {"step": step, **validate()}
    return metrics


def evaluate_checkpoints(
    data: str, checkpoints: list[str], recipe: str, crops: str = "center", image_size=224,
    width=1.0, workers=8, batch=8,
) -> dict:  # fmt: skip
    """Top-1/top-5 of one checkpoint or an ensemble (mean of probabilities), 1 or 144 crops."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    transform = MultiCrop144(image_size) if crops == "144" else CenterCrop(image_size)
    val_set = ImageFolder(data, "val", transform)
    models = []
    for path in checkpoints:
        model = build_inception(
            RECIPES[recipe].model, num_classes=len(val_set.classes), width=width
        )
        model.load_state_dict(load_checkpoint(path)["model"])
        models.append(model.to(device))
    loader = _loader(val_set, None, batch, workers, False)
    return evaluate(models, loader, device)


def build_parser() -> argparse.ArgumentParser:
    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--recipe", default=d["recipe"], choices=sorted(RECIPES))
    p.add_argument("--out", default=d["out"])
    p.add_argument("--epochs", type=float, default=d["epochs"])
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--image-size", type=int, default=d["image_size"])
    p.add_argument("--width", type=float, default=d["width"])
    p.add_argument("--sync-bn", action="store_true")
    p.add_argument("--torch-bn", action="store_true", help="use torch.nn.BatchNorm2d")
    p.add_argument("--lr-scaling", default=d["lr_scaling"], choices=["linear", "none"])
    p.add_argument("--workers", type=int, default=d["workers"])
    p.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"])
    p.add_argument("--log-every", type=int, default=d["log_every"])
    p.add_argument("--eval-batch", type=int, default=d["eval_batch"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--resume", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoints, no training")
    p.add_argument("--checkpoints", nargs="*", default=[], help="one, or several = an ensemble")
    p.add_argument("--crops", default="center", choices=["center", "144"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.eval_only:
            if not args.checkpoints:
                raise SystemExit("--eval-only needs --checkpoints")
            result = evaluate_checkpoints(
                args.data, args.checkpoints, args.recipe, args.crops, args.image_size,
                args.width, args.workers,
            )  # fmt: skip
        else:
            fields = {f.name for f in dataclasses.fields(TrainConfig)}
            cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
            result = train(cfg)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(json.dumps(result))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
