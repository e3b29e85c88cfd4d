"""Figure 1 (Sec. 4.1): MNIST sigmoid MLP with and without BN, test accuracy and sigmoid inputs.

`batchnorm reproduce fig1` trains both networks from the same initial weights on the same
batches, evaluates every `eval_every` steps on the 10,000 test images (the BN net with its
moving-average population statistics), tracks the 15/50/85th percentiles of the input to one
sigmoid of the last hidden layer, and at the end re-estimates the BN net's population
statistics with Algorithm 2. This module trains and measures; `fig1_report` compares with
the paper and `fig1_plot` draws the figure. It writes into the run folder
(`batchnorm.reproduce.run_folder`):

- ``config.json``: every setting, seeds, versions, machine, git revision, data source,
  command, and the resumes.
- ``summary.json``: {"bn": NET, "baseline": NET, "timing": {"train_seconds": over all
  sessions, "sessions": [{"from_step", "to_step", "train_seconds"}, ...]}} where for one seed
  NET is {"seed", "unit", "test_accuracy": [[step, accuracy], ...], "percentiles":
  [[step, p15, p50, p85], ...], "percentiles_units_mean": same rows averaged over all units
  of the layer, "units_drift": each unit's median min/max and first/last spread after
  step 0, "final_accuracy", and for BN "final_accuracy_algorithm2"}, and for N seeds
  NET is {"seeds": [...], "per_seed": [one such dict per seed]}.
- ``fig1.png`` (panels a, b, c as in the paper), ``report.md`` (ours vs the paper), and
  ``checkpoint.pt`` (written atomically; ``--resume RUN_DIR`` continues from it, and
  ``--resume RUN_DIR --steps N`` trains a run further, to N steps).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

import batchnorm
from batchnorm.reproduce import fig1_plot, fig1_report, run_folder
from batchnorm.reproduce.atomic import write_json, write_text
from batchnorm.reproduce.data import DataUnavailable
from batchnorm.reproduce.fig1_config import NETS, Fig1Config
from batchnorm.reproduce.flags import Flag, add_flags, existing_folder, open_from_args, require
from batchnorm.reproduce.models.mlp import MLP, SIZES, StackedMLP
from batchnorm.reproduce.train import (
    epoch_permutation,
    load_checkpoint,
    save_checkpoint,
    set_threads,
)

# --------------------------------------------------------------------------------------------
# Data and initialization.


def _load_data(config: Fig1Config):
    from batchnorm.reproduce import data  # looked up here so that tests can patch it

    try:
        dataset = data.load_mnist(config.data_dir)
    except (FileNotFoundError, ValueError, RuntimeError) as error:  # missing, or fails a check
        raise DataUnavailable(str(error)) from error
    flat = dataset.train_images.reshape(len(dataset.train_images), -1)
    x_train = flat.float().div_(255)  # (60000, 784) grey levels in [0, 1]
    onehot = torch.nn.functional.one_hot(dataset.train_labels, SIZES[-1]).float()
    x_test = dataset.test_images.reshape(len(dataset.test_images), -1).float().div_(255)
    return x_train, onehot, x_test, dataset.test_labels, dataset.source


def initial_models(config: Fig1Config, seed: int) -> dict[str, MLP]:
    """Both nets for ``seed``, with identical Gaussian weights; biases and beta 0, gamma 1."""
    generator = torch.Generator().manual_seed(seed)
    weights = [
        torch.randn(o, i, generator=generator) * config.init_std
        for i, o in zip(SIZES[:-1], SIZES[1:])
    ]
    models = {}
    for name in NETS:
        model = MLP(bn=name == "bn", eps=config.eps, momentum=config.momentum)
        with torch.no_grad():
            for linear, w in zip([*model.hidden, model.out], weights):
                linear.weight.copy_(w)
                if linear.bias is not None:
                    linear.bias.zero_()
        models[name] = model
    return models


def _seeds(config: Fig1Config) -> list[int]:
    return list(range(config.seed, config.seed + config.seeds))


# --------------------------------------------------------------------------------------------
# Evaluation.

_QUANTILES = torch.tensor([0.15, 0.50, 0.85])


def _evaluate(nets, x_test, y_test, unit, step, history) -> dict[str, float]:
    # Appends one row per seed to history[net][seed]; returns the seed-mean accuracy per net.
    means = {}
    for name, net in nets.items():
        logits, z = net.evaluate(x_test)  # (S, N, 10), (S, N, 100)
        accuracy = (logits.argmax(-1) == y_test).double().mean(-1)  # (S,)
        q = torch.quantile(z, _QUANTILES, dim=1).double()  # (3, S, 100) over test images
        for s, record in enumerate(history[name]):
            record["test_accuracy"].append([step, accuracy[s].item()])
            record["percentiles"].append([step, *q[:, s, unit].tolist()])
            record["percentiles_units_mean"].append([step, *q[:, s].mean(-1).tolist()])
            if step > 0:  # per unit: the range of its median and its first/last spread
                median, spread = q[1, s], q[2, s] - q[0, s]  # (100,) each
                units = record.setdefault("units_drift", {
                    "median_min": median.tolist(), "median_max": median.tolist(),
                    "spread_first": spread.tolist()})
                units["median_min"] = torch.minimum(
                    torch.tensor(units["median_min"], dtype=median.dtype), median).tolist()
                units["median_max"] = torch.maximum(
                    torch.tensor(units["median_max"], dtype=median.dtype), median).tolist()
                units["spread_last"] = spread.tolist()
        means[name] = accuracy.mean().item()
    return means


def _inference_statistics(net: StackedMLP, config, x_train, x_test, y_test) -> list[dict]:
    # The BN net's final test accuracy under each choice of normalization statistics, per
    # seed: Algorithm 2 (weights frozen, E[x] and Var[x] = m/(m-1) E_B[sigma2_B] over
    # `population_batches` training batches of `batch_size`), the pooled mean and variance of
    # the same samples, and the test batches' own statistics (batches of `batch_size`, and
    # the whole test set as one batch), which Algorithm 2 replaces.
    def accuracy(model) -> float:
        with torch.no_grad():
            logits = torch.cat([model(x) for x in x_test.split(config.batch_size)])
        return (logits.argmax(-1) == y_test).double().mean().item()

    results = []
    b = config.batch_size
    for s, seed in enumerate(_seeds(config)):
        order = epoch_permutation(seed, 0, len(x_train), stream=1)  # not a training order
        count = min(config.population_batches, len(x_train) // b)
        batches = [x_train[order[i * b : (i + 1) * b]] for i in range(count)]
        row = {}
        for estimator in ("algorithm2", "pooled"):
            model = net.to_module(s)
            batchnorm.recalibrate(model, batches, estimator=estimator, progress=False)
            row[estimator] = accuracy(model.eval())
        model = net.to_module(s).train()  # BN normalizes each test batch with its own stats
        row[f"test_batches_{b}"] = accuracy(model)
        with torch.no_grad():
            logits = model(x_test)
        row[f"test_batch_{len(x_test)}"] = (logits.argmax(-1) == y_test).double().mean().item()
        results.append(row)
    return results


# --------------------------------------------------------------------------------------------
# Training.


def _train_steps(net: StackedMLP, x_train, onehot, idx, s: int, lr: float) -> None:
    # One SGD step per row of idx (S*b example indices); all time goes into torch ops.
    for row in idx:
        x = x_train.index_select(0, row).view(s, -1, x_train.shape[1])  # (S, b, 784)
        y = onehot.index_select(0, row).view(s, -1, onehot.shape[1])  # (S, b, 10)
        net.sgd_step(x, y, lr)


def _new_history(config: Fig1Config) -> dict:
    return {
        name: [
            {
                "seed": seed,
                "unit": config.unit,
                "test_accuracy": [],
                "percentiles": [],
                "percentiles_units_mean": [],
            }
            for seed in _seeds(config)
        ]
        for name in NETS
    }


def _check_resume(out: Path, record: dict, config: Fig1Config) -> dict | None:
    # The checkpoint to continue from (None: the run was stopped before its first one and
    # starts again from step 0), if the resume has work to do (train further, or finish the
    # analysis of an interrupted run); RunFolderError otherwise.
    path = out / "checkpoint.pt"
    state = load_checkpoint(path) if path.is_file() else None
    done = state["step"] if state is not None else 0
    trained = state["step"] if state is not None else record["config"]["steps"]
    hint = f"; pass --steps N with N > {trained} to train it further"
    run_folder.check_resume(out, record, done=done, target=config.steps,
                            extends=config.steps > trained, hint=hint)  # fmt: skip
    return state


def run(
    config: Fig1Config,
    out: str | os.PathLike | run_folder.RunFolder,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict | None:
    """Train, evaluate and write the run folder; returns the summary (see the module doc).

    Args:
        config: the settings; with ``resume``, the recorded ones (``steps`` may be larger).
        out: the run folder: new (refused if it holds anything) or, with ``resume``, the run;
            or the `run_folder.RunFolder` the command line opened (checked there, not again).
        resume: continue from ``out/checkpoint.pt`` (from step 0 when the run stopped before
            its first checkpoint) with the folder's thread count; refused when the run is
            finished and ``config.steps`` asks for no more steps.
        progress: show a tqdm bar on stderr.
        stop_after: stop right after the checkpoint at this step and return None (used to
            test that an interruption loses nothing).

    Raises:
        RunFolderError: ``out`` cannot start or continue a run (see `run_folder`).
        SettingError: ``batch_size`` exceeds the training set found on disk.
        DataUnavailable: MNIST is missing or fails a check (nothing is written).
    """
    start_time = time.perf_counter()
    # The folder is checked (and a resume's checkpoint read) before the data is loaded.
    folder = run_folder.open_run(out, "fig1", config, resume=resume, check=_check_resume)
    out, state = folder.path, folder.state
    x_train, onehot, x_test, y_test, source = _load_data(config)
    require(config.batch_size <= len(x_train), "batch_size",
            f"at most the {len(x_train):,} training images", config.batch_size)  # fmt: skip
    seeds = _seeds(config)
    if folder.resuming:
        set_threads(folder.record["machine"]["torch_threads"])
    else:
        set_threads(1 if config.parallel_nets else config.threads)
    folder.start(config, seeds=seeds, data=source)
    if state is not None:
        start, history = state["step"], state["history"]
        sessions = state.get("sessions", [])
        nets = {
            name: StackedMLP(
                state["nets"][name], bn=name == "bn", eps=config.eps, momentum=config.momentum
            )
            for name in NETS
        }
    else:  # a new run, or one stopped before its first checkpoint: from the initial weights
        models = [initial_models(config, seed) for seed in seeds]
        nets = {name: StackedMLP.from_modules([m[name] for m in models]) for name in NETS}
        start, history, sessions = 0, _new_history(config), []
        _evaluate(nets, x_test, y_test, config.unit, 0, history)

    b, n = config.batch_size, len(x_train)
    per_epoch = n // b  # batches per epoch; a remainder of n % b examples is left out
    s = len(seeds)
    bar = tqdm(
        total=config.steps,
        initial=start,
        disable=not progress,
        desc="fig1",
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5,
    )
    orders: dict[int, torch.Tensor] = {}  # epoch -> (S, n) example order
    pool = ThreadPoolExecutor(max_workers=len(nets)) if config.parallel_nets else None
    train_time = 0.0
    step = start
    while step < config.steps:
        # Train up to the next evaluation: every batch index first, then a tight loop per net.
        until = min(config.steps, (step // config.eval_every + 1) * config.eval_every)
        tick = time.perf_counter()
        rows = []
        for t in range(step, until):
            epoch, j = divmod(t, per_epoch)
            if epoch not in orders:
                orders = {epoch: torch.stack([epoch_permutation(seed, epoch, n)
                                              for seed in seeds])}
            rows.append(orders[epoch][:, j * b:(j + 1) * b].reshape(-1))  # (S*b,)
        idx = torch.stack(rows)  # (T, S*b): the same batches for both nets
        if pool is None:
            for net in nets.values():
                _train_steps(net, x_train, onehot, idx, s, config.lr)
        else:
            for job in [pool.submit(_train_steps, net, x_train, onehot, idx, s, config.lr)
                        for net in nets.values()]:
                job.result()
        crossed = until // config.checkpoint_every > step // config.checkpoint_every
        step = until
        train_time += time.perf_counter() - tick
        bar.update(step - bar.n)
        acc = _evaluate(nets, x_test, y_test, config.unit, step, history)
        bar.set_postfix_str(f"acc baseline {acc['baseline']:.4f}  bn {acc['bn']:.4f}")
        # checkpoints go with evaluations: the first one at or after each multiple
        if crossed or step in (stop_after, config.steps):
            session = {"from_step": start, "to_step": step, "train_seconds": round(train_time, 3)}
            save_checkpoint(
                out / "checkpoint.pt",
                {
                    "step": step,
                    "history": history,
                    "nets": {k: v.state_dict() for k, v in nets.items()},
                    "sessions": [*sessions, session],  # this session up to this checkpoint
                },
            )
        if stop_after is not None and step >= stop_after and step < config.steps:
            bar.close()
            if pool is not None:
                pool.shutdown()
            return None
    bar.close()
    if pool is not None:
        pool.shutdown()
    if step > start:
        sessions = [*sessions, {"from_step": start, "to_step": step,
                                "train_seconds": round(train_time, 3)}]  # fmt: skip

    by_statistics = _inference_statistics(nets["bn"], config, x_train, x_test, y_test)
    for s_index, record in enumerate(history["bn"]):
        record["final_accuracy_algorithm2"] = by_statistics[s_index]["algorithm2"]
        record["final_accuracy_by_statistics"] = by_statistics[s_index]
    for name in NETS:
        for record in history[name]:
            record["final_accuracy"] = record["test_accuracy"][-1][1]
    summary = {
        name: history[name][0] if len(seeds) == 1 else {"seeds": seeds, "per_seed": history[name]}
        for name in NETS
    }
    summary["timing"] = {
        "train_seconds": round(sum(x["train_seconds"] for x in sessions), 3),
        "sessions": sessions,
        "total_seconds_last_session": round(time.perf_counter() - start_time, 3),
    }
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", fig1_report.make_report(summary, config, out))
    fig1_plot.plot(summary, config, out / "fig1.png")
    folder.finish()
    return summary


# --------------------------------------------------------------------------------------------
# Command line.

FLAGS = {
    "--steps": Flag("steps", int, "SGD steps per network; with --resume, train further to this"),
    "--batch-size": Flag("batch_size", int, "examples per mini-batch"),
    "--lr": Flag("lr", float, "SGD learning rate (both nets)"),
    "--init-std": Flag("init_std", float, "std of the Gaussian initial weights"),
    "--seeds": Flag("seeds", int, "number of seeds, trained together"),
    "--seed": Flag("seed", int, "first seed"),
    "--eval-every": Flag("eval_every", int, "steps between test evaluations"),
    "--checkpoint-every": Flag("checkpoint_every", int, "steps between checkpoints"),
    "--unit": Flag("unit", int, "sigmoid of the last hidden layer shown in panels (b, c)"),
    "--population-batches": Flag("population_batches", int, "batches for Algorithm 2"),
    "--threads": Flag("threads", int, "torch threads without --parallel-nets"),
    "--parallel-nets": Flag("parallel_nets", bool, "the two nets in two threads"),
    "--data-dir": Flag("data_dir", existing_folder, "folder with the MNIST IDX files"),
}


def add_cli(parser: argparse.ArgumentParser) -> None:
    """Add Figure 1's flags to ``parser`` (defaults from `Fig1Config`)."""
    add_flags(parser, Fig1Config, FLAGS, "fig1")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=functools.partial(run_from_args, parser))


def run_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Check the flags and the folder (argparse errors), run, print the accuracy table; 0."""
    config, folder = open_from_args(
        parser, args, Fig1Config, FLAGS, "fig1", may_change={"steps"}, check=_check_resume
    )
    try:
        summary = run(config, folder, resume=folder.resuming, progress=not args.no_progress)
    except DataUnavailable as error:  # before the run folder is made: nothing written
        print(f"batchnorm reproduce fig1: {error}", file=sys.stderr)
        return 1
    print(fig1_report.accuracy_table(summary, config))
    for text, ok in fig1_report.checks(summary, config):
        print(f"{'PASS' if ok else 'FAIL'}: {text}")
    print(f"run folder: {folder} (report.md, fig1.png, summary.json, config.json)")
    return 0
