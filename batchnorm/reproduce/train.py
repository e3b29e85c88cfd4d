"""Training-loop pieces shared by the experiments: batch order, threads, atomic checkpoints."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchnorm.reproduce.atomic import atomic_write
from batchnorm.reproduce.run_folder import RunFolderError

__all__ = [
    "epoch_permutation",
    "save_checkpoint",
    "load_checkpoint",
    "set_threads",
    "rng_state",
    "set_rng_state",
]


def epoch_permutation(seed: int, epoch: int, n: int, stream: int = 0) -> torch.Tensor:
    """The order of the ``n`` training examples in ``epoch`` for ``seed``, as int64 indices.

    A pure function of (seed, stream, epoch): a resumed run redraws exactly the batches an
    uninterrupted one would, without checkpointing any generator state. ``stream`` separates
    independent uses (training batches, Algorithm 2's batches) of the same seed.
    """
    state = np.random.SeedSequence([seed, stream, epoch]).generate_state(2, np.uint64)
    generator = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
    return torch.randperm(n, generator=generator)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None: leave as is) and return the number in use.

    On CPU, results are bit-identical across runs only for the same thread count.
    """
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def rng_state() -> dict[str, Any]:
    """torch's global random state (CPU, and every CUDA device when there is one).

    What Dropout draws from: a checkpoint that holds it lets a resumed run draw the masks an
    uninterrupted one would (`set_rng_state`), so resuming mid-run stays bit-identical.
    """
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` to a temporary file, then rename it over ``path``.

    The rename is atomic on POSIX, so an interruption leaves either the old checkpoint or the
    new one, never a truncated file. ``state`` must hold only tensors, numbers, strings and
    lists/dicts of them, so that `load_checkpoint` can read it with ``weights_only=True``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(state, f))


# What torch.load raises on a truncated or foreign file.
_DAMAGED = (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`; never unpickles arbitrary objects.

    Raises:
        RunFolderError: the file is truncated, damaged or not such a checkpoint (the message
            names it and the way out: delete it, and a resume redoes the training it held).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except _DAMAGED as error:
        raise RunFolderError(_unreadable(path, error)) from None
    if not isinstance(state, dict):
        raise RunFolderError(_unreadable(path, f"a {type(state).__name__}, not a dict"))
    return state


def _unreadable(path, why) -> str:
    text = str(why).strip() or type(why).__name__
    first = text.splitlines()[0].split(". ")[0]  # torch's messages go on with advice
    return (
        f"{path} is not a readable checkpoint ({first}); delete it, and --resume redoes the "
        "training it held"
    )
