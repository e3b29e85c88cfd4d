"""`monitor`: percentiles of BN layer inputs in training, Figure 1(b, c) (Sec. 4.1), any model."""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from batchnorm.diagnose.report import jsonable, pyplot
from batchnorm.inference.population import mask_argument
from batchnorm.swap import channel_axis, is_bn_like

# --------------------------------------------------------------------------------------------
# monitor: Figure 1(b, c) for any model
# --------------------------------------------------------------------------------------------


POOLED_VALUES = 2048  # values behind the all-channel percentiles of one record


def _percentiles(rows: Tensor, q: Tensor) -> Tensor:
    """(P, R) percentiles of each row of ``rows`` (R, n): one sort, then the linear
    interpolation between order statistics that ``torch.quantile`` uses by default."""
    ordered = rows.sort(dim=1).values
    pos = q * (rows.shape[1] - 1)  # (P,)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    a, b = ordered[:, lo], ordered[:, hi]  # (R, P)
    return torch.lerp(a, b, (pos - lo).to(rows.dtype)).t()


class Monitor:
    """Records percentiles of layer inputs during training; made by `monitor`.

    Attributes:
        history: layer name -> list of records ``{"step": int, "percentiles": (P,) tensor,
            "per_channel": (P, C) tensor or None}``. ``percentiles`` are over every value of
            the layer's input (all channels; at most 2048 of the sampled values),
            ``per_channel`` over each channel's values (sampled to at most ``max_values`` per
            channel). Tensors stay on the input's
            device (no synchronization during training).
        percentiles: the percentiles recorded, ascending.
        step: training-mode forward passes of the model seen so far.
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 1,
        percentiles: Sequence[float] = (15, 50, 85),
        *,
        layers: Sequence[str] | None = None,
        per_channel: bool = True,
        max_values: int = 512,
        seed: int = 0,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        q = sorted(float(p) for p in percentiles)
        if not q or q[0] < 0 or q[-1] > 100:
            raise ValueError(
                f"percentiles must be a non-empty list of numbers in [0, 100], got {percentiles!r}"
            )
        if max_values < 1:
            raise ValueError(f"max_values must be a positive integer, got {max_values}")
        modules = dict(model.named_modules())
        if layers is None:
            names = [n for n, m in modules.items() if is_bn_like(m)]
            if not names:
                raise ValueError(
                    f"monitor found no BN layer in {type(model).__name__}; name the modules "
                    "whose inputs to record with layers=[...]"
                )
        else:
            names = list(layers)
            missing = [n for n in names if n not in modules]
            if missing:
                raise ValueError(
                    f"monitor: no module named {missing} in {type(model).__name__}; names are "
                    f"those of model.named_modules(), e.g. {list(modules)[1:6]}"
                )
        self.model = model
        self.every = every
        self.percentiles = tuple(q)
        self.per_channel = per_channel
        self.max_values = max_values
        self.layers = names
        self.history: dict[str, list[dict]] = {n: [] for n in names}
        self.step = 0
        self._modules = {n: modules[n] for n in names}
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._handles: list = []
        self._current: int | None = None
        self._seen: set[str] = set()

    # -- hooks ---------------------------------------------------------------------------------

    def _on_model(self, module, args) -> None:
        self._seen = set()
        if module.training:
            self._current = self.step if self.step % self.every == 0 else None
            self.step += 1
        else:
            self._current = None

    def _after_model(self, module, args, output) -> None:
        self._current = None

    def _hook_for(self, name: str, axis: int):
        def hook(module, args, kwargs):
            if self._current is None or name in self._seen or not args:
                return
            x = args[0]
            if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
                return
            mask = mask_argument(module, args, kwargs) if x.dim() >= 2 else None
            if mask is not None:
                a = axis % x.dim()
                if mask.shape != x.shape[:a] + x.shape[a + 1 :] or not mask.any():
                    return  # the layer itself refuses this mask (or this batch)
            self._seen.add(name)
            with torch.no_grad():
                self.history[name].append(self._record(x.detach(), axis, mask))

        return hook

    def _record(self, x: Tensor, axis: int, mask: Tensor | None = None) -> dict:
        q = torch.tensor(self.percentiles, dtype=torch.float32, device=x.device) / 100
        if x.dim() < 2:
            x, axis = x.reshape(-1, 1), 1
        y = x.movedim(axis, 1)
        n, c = y.shape[0], y.shape[1]
        y = y.reshape(n, c, -1)  # (N, C, S): a view for contiguous and channels-last input
        s = y.shape[2]
        # A mask (the input's shape without the channel axis, so (N, S) in y's order) keeps
        # padding out, as it keeps it out of the layer's statistics.
        where = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)
        total = n * s if where is None else where.numel()
        if total > self.max_values:
            # The same random positions for every channel, drawn with the monitor's own
            # generator so that training's random stream is left untouched.
            idx = torch.randint(total, (self.max_values,), generator=self._generator(x.device),
                                device=x.device)
            idx = idx if where is None else where[idx]
            sample = y[idx // s, :, idx % s]  # (max_values, C)
        else:
            sample = y.transpose(1, 2).reshape(-1, c)  # (N * S, C)
            sample = sample if where is None else sample[where]
        sample = sample.float()
        # All channels together: at most POOLED_VALUES values (whole rows, already random).
        rows = max(1, -(-POOLED_VALUES // c)) if c else 1
        pooled = _percentiles(sample[:rows].reshape(1, -1), q)[:, 0]
        per = _percentiles(sample.t().contiguous(), q) if self.per_channel else None
        return {"step": self._current, "percentiles": pooled, "per_channel": per}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]

    # -- context -------------------------------------------------------------------------------

    def __enter__(self) -> Monitor:
        if self._handles:
            raise RuntimeError("this monitor is already active")
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._on_model))
            self._handles.append(self.model.register_forward_hook(self._after_model))
            for name, m in self._modules.items():
                self._handles.append(
                    m.register_forward_pre_hook(
                        self._hook_for(name, channel_axis(m)), with_kwargs=True
                    )
                )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (the history stays)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._current = None

    @property
    def active(self) -> bool:
        return bool(self._handles)

    # -- output --------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-ready history: {layer: [{"step", "percentiles", "per_channel"}, ...]}."""
        return {
            "every": self.every,
            "percentiles": list(self.percentiles),
            "history": {
                name: [
                    {
                        "step": r["step"],
                        "percentiles": jsonable(r["percentiles"].cpu()),
                        "per_channel": None
                        if r["per_channel"] is None
                        else jsonable(r["per_channel"].cpu()),
                    }
                    for r in records
                ]
                for name, records in self.history.items()
            },
        }

    def curves(self, layer: str, channel: int | None = None) -> tuple[list[int], Tensor]:
        """(steps, (S, P) percentiles) of one layer: pooled, or of one channel."""
        if layer not in self.history:
            raise KeyError(f"monitor recorded no layer {layer!r}; it has {self.layers}")
        records = self.history[layer]
        steps = [r["step"] for r in records]
        if not records:
            return steps, torch.empty(0, len(self.percentiles))
        if channel is None:
            values = torch.stack([r["percentiles"].cpu() for r in records])
        else:
            if records[0]["per_channel"] is None:
                raise ValueError("per-channel percentiles were not recorded (per_channel=False)")
            values = torch.stack([r["per_channel"][:, channel].cpu() for r in records])
        return steps, values

    def plot(self, path, layers: Sequence[str] | None = None, channel: int | None = None,
             titles: Sequence[str] | None = None) -> None:
        """Figure 1(b, c)-style panels: each chosen layer's input percentiles against the
        training step (median solid, the others dashed), over all its values or one channel.

        Args:
            path: where to save the figure (PNG, PDF, ... by extension).
            layers: the layers to draw (default: up to four, spread over the model).
            channel: draw this channel's percentiles instead of those over all channels.
            titles: one panel title per layer (default: the layer names).
        """
        plt = pyplot()
        if layers is None:
            n = len(self.layers)
            picks = sorted({round(i * (n - 1) / 3) for i in range(4)}) if n > 4 else range(n)
            layers = [self.layers[i] for i in picks]
        layers = list(layers)
        fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.6), squeeze=False)
        median = min(range(len(self.percentiles)), key=lambda k: abs(self.percentiles[k] - 50))
        for k, (ax, name) in enumerate(zip(axes[0], layers)):
            steps, values = self.curves(name, channel)
            for j, pct in enumerate(self.percentiles):
                ax.plot(steps, values[:, j].tolist() if len(steps) else [], color="k",
                        lw=1.0 if j == median else 0.7, ls="-" if j == median else "--",
                        label=f"{pct:g}th percentile")
            title = titles[k] if titles is not None else (name or "(root)")
            if channel is not None:
                title += f", channel {channel}"
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("training step")
            ax.set_ylabel("layer input")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def save(self, path) -> None:
        """Write `to_dict` as JSON."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)


def monitor(
    model: nn.Module,
    every: int = 1,
    percentiles: Sequence[float] = (15, 50, 85),
    *,
    layers: Sequence[str] | None = None,
    per_channel: bool = True,
    max_values: int = 512,
    seed: int = 0,
) -> Monitor:
    """Record the percentiles of BN layer inputs during training: Figure 1(b, c) for any model.

    Use as a context manager; forward hooks are registered on entry and removed on exit, also
    when the block raises. Every training-mode forward pass of ``model`` counts one step (0, 1,
    2, ...); at steps divisible by ``every`` each watched layer's input (its first call in that
    pass) is summarized by the given percentiles over all its channels together, and per
    channel; a layer called with a ``mask`` (ours) is summarized over the positions it selects,
    as its statistics are (finding them reads the mask back: one host synchronization per record
    on accelerators, as the masked layer itself has). Eval-mode passes are neither counted nor
    recorded. Inputs with more than ``max_values`` values per channel are sampled at
    ``max_values`` random positions (the monitor's own random generator, so training's random
    stream is untouched), and the all-channel percentiles use at most 2048 of the sampled
    values; the percentiles are then estimates (the standard error of a median is about 1.25 std
    / sqrt(n): 5.5% of a std per channel at 512 values, 2.8% for all channels at 2048). The cost
    is measured in docs/diagnose.md; it is one sort of C x max_values values per watched layer
    and record.

    Args:
        model: the model being trained.
        every: record every ``every`` training steps.
        percentiles: which percentiles (0-100); Figure 1 shows 15, 50 and 85.
        layers: qualified names of the modules whose input to record (default: every BN
            layer). Any module works, so a network without BN can be watched too
            (Figure 1(b): the input of a sigmoid).
        per_channel: also record the percentiles of each channel.
        max_values: values per channel kept for the percentiles (the cost grows with it).
        seed: seed of the monitor's sampling generator.

    Returns:
        A `Monitor`: ``mon.history[layer]`` lists ``{"step", "percentiles", "per_channel"}``
        records; ``mon.plot(path)`` draws Figure 1(b, c)-style panels.

    Example:
        >>> import batchnorm
        >>> net = nn.Sequential(nn.Linear(4, 8), batchnorm.BatchNorm1d(8), nn.Sigmoid())
        >>> with batchnorm.monitor(net, every=2) as mon:
        ...     for _ in range(5):
        ...         net(torch.randn(16, 4)).sum().backward()
        >>> [r["step"] for r in mon.history["1"]]
        [0, 2, 4]
    """
    return Monitor(
        model,
        every,
        percentiles,
        layers=layers,
        per_channel=per_channel,
        max_values=max_values,
        seed=seed,
    )
