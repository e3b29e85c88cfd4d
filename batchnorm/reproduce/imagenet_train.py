"""Full-scale BN-Inception training on ImageNet (Sec. 4.2), one recipe, under torchrun + DDP.

Run unchanged on one process, several GPUs, or several nodes:

    torchrun --nproc_per_node=8 -m batchnorm.reproduce.imagenet_train \\
        --data /data/imagenet --recipe bn_x30 --out runs/bn_x30 --epochs 40

Each replica takes 32 images per step (Sec. 4.2) and, by default, normalizes over its own
32 as the paper's workers did; ``--sync-bn`` merges the statistics over all replicas with
`batchnorm.SyncBatchNorm` instead. NCCL on GPUs, gloo on CPUs. Rank 0 writes the run folder
(`batchnorm.reproduce.run_folder`: config.json, atomic checkpoints, metrics.jsonl);
``--resume RUN_DIR`` continues mid-epoch from the last checkpoint with the same batch order
and the recorded settings (``--epochs``, ``--max-steps`` and the logging, checkpoint,
worker and evaluation-batch flags may change). Validation is single center-crop
top-1/top-5 on every rank's shard, summed over ranks. ``--eval-only --checkpoints a.pt
b.pt --crops 144`` evaluates one checkpoint or an ensemble with GoogLeNet's 144 crops
(Sec. 4.2.3).

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

from batchnorm.reproduce import run_folder
from batchnorm.reproduce.atomic import write_text
from batchnorm.reproduce.flags import (
    SEED_MAX,
    Flag,
    add_flags,
    existing_folder,
    finite,
    open_from_args,
    require,
)
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
from batchnorm.reproduce.train import load_checkpoint, rng_state, save_checkpoint, set_rng_state

__all__ = ["TrainConfig", "main", "train", "evaluate_checkpoints"]


@dataclass(frozen=True)
class TrainConfig:
    """One full-scale training run (flags of the same names, with dashes)."""

    data: str  # folder with train/<class>/*.JPEG and val/<class>/*.JPEG
    recipe: str = "bn_x30"  # key of batchnorm.reproduce.recipes.RECIPES
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
    channels_last: bool = False  # NHWC memory format (faster convs on recent GPUs)

    def __post_init__(self) -> None:
        require(self.recipe in RECIPES, "recipe", f"one of {', '.join(RECIPES)}", self.recipe)
        require(finite(self.epochs) and self.epochs > 0, "epochs", "a finite number > 0",
                self.epochs)
        require(self.max_steps is None or self.max_steps >= 1, "max_steps", ">= 1",
                self.max_steps)
        for field in ("image_size", "checkpoint_every", "log_every", "eval_batch"):
            require(getattr(self, field) >= 1, field, "an integer >= 1", getattr(self, field))
        require(finite(self.width) and self.width > 0, "width", "a finite number > 0",
                self.width)
        require(self.lr_scaling in ("linear", "none"), "lr_scaling", "linear or none",
                self.lr_scaling)
        require(self.workers >= 0, "workers", ">= 0", self.workers)
        require(0 <= self.seed <= SEED_MAX, "seed", f"in 0..{SEED_MAX}", self.seed)

    def longer_than(self, other: TrainConfig) -> bool:
        """Whether these settings train further than ``other`` (a resume with work to do)."""
        capped = other.max_steps is not None and (
            self.max_steps is None or self.max_steps > other.max_steps
        )
        return self.epochs > other.epochs or capped


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
        # the workers' base seed from the loader's own generator, not torch's global one:
        # that one is Dropout's alone, so a checkpoint's random state resumes it exactly
        generator=torch.Generator().manual_seed(0),
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


def _check_resume(out: Path, record: dict, cfg: TrainConfig) -> None:
    run_folder.check_resume(
        out, record, extends=cfg.longer_than(TrainConfig(**record["config"])),
        hint="; pass a larger --epochs or --max-steps to train it further",
    )  # fmt: skip


def _drop_metrics_after(path: Path, step: int) -> None:
    # A run killed between checkpoints logged steps it redoes from the checkpoint: keep the
    # lines up to the checkpoint's step (and none torn by the kill), so metrics.jsonl holds
    # each step once.
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    write_text(path, "".join(kept))


def train(
    cfg: TrainConfig, out: str | os.PathLike | run_folder.RunFolder, *, resume: bool = False
) -> dict:
    """Train ``cfg.recipe`` into the run folder ``out``; returns the last validation metrics.

    ``resume``: continue the run in ``out`` from its checkpoint (refused when it is finished
    and ``cfg`` trains no further); otherwise ``out`` must be new (see `run_folder`); or
    ``out`` is the `run_folder.RunFolder` the command line opened (checked there, not
    again). The metrics come back on every rank; rank 0 writes the folder.
    """
    writer = int(os.environ.get("RANK", 0)) == 0  # rank 0 writes the folder
    folder = run_folder.open_run(
        out, "imagenet_train", cfg, resume=resume, check=_check_resume, writer=writer
    )
    out = folder.path
    rank, world, device = _setup_distributed()
    recipe = RECIPES[cfg.recipe]
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
    if resume and ckpt.exists():
        saved = load_checkpoint(ckpt)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        step = int(saved["step"])
        if "rng" in saved and world == 1:  # Dropout's masks go on as uninterrupted (rank 0's)
            set_rng_state(saved["rng"])
    if rank == 0:
        folder.start(
            cfg, recipe=dataclasses.asdict(recipe), world_size=world, lr0=lr0,
            parameters=parameter_count(model), device=str(device),
        )  # fmt: skip
        if resume:
            _drop_metrics_after(out / "metrics.jsonl", step)

    def save():
        if rank == 0:
            save_checkpoint(
                ckpt,
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "rng": rng_state()},  # fmt: skip
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
    if rank == 0:
        folder.finish()
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


FLAGS = {
    "--data": Flag("data", existing_folder,
                   "folder with train/<class>/*.JPEG and val/<class>/*.JPEG"),
    "--recipe": Flag("recipe", str, f"one of {', '.join(RECIPES)}"),
    "--epochs": Flag("epochs", float, "training length in epochs"),
    "--max-steps": Flag("max_steps", int, "stop after this many steps"),
    "--image-size": Flag("image_size", int, "crop side"),
    "--width": Flag("width", float, "channel multiplier"),
    "--sync-bn": Flag("sync_bn", bool, "normalize over all replicas (batchnorm.SyncBatchNorm)"),
    "--torch-bn": Flag("torch_bn", bool, "use torch.nn.BatchNorm2d"),
    "--lr-scaling": Flag("lr_scaling", str, "linear (lr x world size) or none"),
    "--workers": Flag("workers", int, "DataLoader processes per replica"),
    "--checkpoint-every": Flag("checkpoint_every", int, "steps between checkpoints"),
    "--log-every": Flag("log_every", int, "steps between metrics lines"),
    "--eval-batch": Flag("eval_batch", int, "validation batch per replica"),
    "--seed": Flag("seed", int, "initial weights, batch order, augmentation"),
    "--channels-last": Flag("channels_last", bool, "NHWC memory format"),
}
# What a resumed run may change: how long it trains, and nothing that changes its numbers.
MAY_CHANGE = {"epochs", "max_steps", "workers", "checkpoint_every", "log_every", "eval_batch"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    # Only rank 0 writes the folder: the other ranks must not find it made by rank 0.
    add_flags(p, TrainConfig, FLAGS, "imagenet", check_out=int(os.environ.get("RANK", 0)) == 0)
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoints, no training")
    p.add_argument("--checkpoints", nargs="*", default=[], help="one, or several = an ensemble")
    p.add_argument("--crops", default="center", choices=["center", "144"])
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.eval_only:
        if not args.checkpoints or not args.data:
            parser.error("--eval-only needs --data and --checkpoints")
    else:
        cfg, folder = open_from_args(
            parser, args, TrainConfig, FLAGS, "imagenet_train", may_change=MAY_CHANGE,
            check=_check_resume, writer=int(os.environ.get("RANK", 0)) == 0,
            folder_name="imagenet",
        )  # fmt: skip
    try:
        if args.eval_only:
            d = TrainConfig(data=args.data)
            result = evaluate_checkpoints(
                args.data, args.checkpoints, args.recipe or d.recipe, args.crops,
                args.image_size or d.image_size, args.width or d.width,
                d.workers if args.workers is None else args.workers,
            )  # fmt: skip
        else:
            result = train(cfg, folder, resume=folder.resuming)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(json.dumps(result))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
