"""Figure 1 (Sec. 4.1): a run's settings, one frozen config for fig1, fig1_report, fig1_plot."""

from __future__ import annotations

from dataclasses import dataclass

from batchnorm.reproduce.flags import SEED_MAX, finite, require
from batchnorm.reproduce.models.mlp import SIZES

__all__ = ["Fig1Config", "NETS", "TRAIN_IMAGES"]

NETS = ("baseline", "bn")  # the two nets of Figure 1: without BN, with BN
TRAIN_IMAGES = 60_000  # MNIST's training set: the largest mini-batch a run can draw


@dataclass(frozen=True)
class Fig1Config:
    """Every setting of a Figure 1 run; the CLI only parses flags into this."""

    steps: int = 50_000  # SGD steps per network (paper: 50,000)
    batch_size: int = 60  # examples per mini-batch (paper: 60)
    lr: float = 0.16  # plain SGD learning rate, both nets (paper: not stated; see docs/fig1.md)
    init_std: float = 0.04  # std of the Gaussian initial weights (paper: "small"; not stated)
    seeds: int = 1  # number of seeds trained (seed, seed+1, ...), all in one batched stack
    seed: int = 0  # first seed: initial weights and batch order
    eval_every: int = 500  # test evaluation interval in steps (paper: about 500)
    checkpoint_every: int = 5000  # steps between atomic checkpoints (at the next evaluation)
    unit: int = 7  # which sigmoid of the last hidden layer panels (b, c) follow; fixed up front
    eps: float = 1e-5  # BN's eps inside the square root (paper: not stated; torch's default)
    momentum: float = 0.1  # weight of the new batch in BN's moving averages (torch convention)
    population_batches: int = 1000  # Algorithm 2: training batches averaged at the end
    threads: int | None = None  # torch intra-op threads without parallel_nets (None: the cores)
    parallel_nets: bool = True  # the two nets in two Python threads, one torch thread each
    data_dir: str | None = None  # MNIST IDX folder; None: batchnorm.reproduce.data's search

    def __post_init__(self) -> None:
        for field in ("steps", "seeds", "eval_every", "checkpoint_every", "population_batches"):
            require(getattr(self, field) >= 1, field, "an integer >= 1", getattr(self, field))
        require(self.threads is None or self.threads >= 1, "threads", ">= 1", self.threads)
        require(0 <= self.seed <= SEED_MAX - self.seeds + 1, "seed",
                f"in 0..{SEED_MAX - self.seeds + 1} (torch seeds end at 2**64 - 1)", self.seed)
        require(2 <= self.batch_size <= TRAIN_IMAGES, "batch_size",
                f"between 2 and the {TRAIN_IMAGES:,} training images", self.batch_size)
        for field in ("lr", "init_std", "eps"):
            value = getattr(self, field)
            require(finite(value) and value > 0, field, "a finite number > 0", value)
        require(0 < self.momentum <= 1, "momentum", "in (0, 1]", self.momentum)
        require(0 <= self.unit < SIZES[-2], "unit",
                f"a unit of the last hidden layer (0..{SIZES[-2] - 1})", self.unit)  # fmt: skip
