"""The activations a BN layer may be fused with (Sec. 4.2 puts BN before every nonlinearity).

One registry, `ACTIVATIONS`, says for each name everything the library needs to know: the
torch function that computes it, the ``torch.nn`` module and the functional forms it stands
for (what `batchnorm.fuse_activations` recognises in a model), whether it is invertible (In-
Place ABN's ``memory_saving`` rebuilds the BN output from the activation's output), and
whether the Triton kernels implement it (`batchnorm.dispatch` falls back to the torch path, or
refuses ``backend="triton"``, for the others). A new activation is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "Activation", "check_activation", "of_module", "of_call"]


@dataclass(frozen=True)
class Activation:
    """One activation of the registry.

    Attributes:
        name: the layers' ``activation`` setting.
        function: (input, negative_slope) -> output, torch's own function (the torch path).
        module: the ``torch.nn`` class it is, with ``attributes`` (a module of that exact class
            with those attribute values is this activation).
        attributes: constructor settings that select this activation among the module's
            (GELU's ``approximate``).
        functions: the functional forms (``F.silu``, ``torch.relu``) and Tensor method names
            (``"relu"``) a traced graph shows for it, called with the tensor alone (and
            ``inplace``, and ``attributes`` as keywords).
        invertible: (negative_slope) -> whether the output determines the input (memory
            saving needs it).
        kernel: the code of its branch in the Triton kernels (``ACT`` in
            `batchnorm.kernels.common.activate`), None where they do not implement it.
    """

    name: str
    function: Callable[[Tensor, float], Tensor]
    module: type | None
    attributes: dict = field(default_factory=dict)
    functions: tuple = ()
    invertible: Callable[[float], bool] = lambda slope: False
    kernel: int | None = None

    def make_module(self, negative_slope: float = 0.01) -> nn.Module:
        """The ``torch.nn`` module of this activation (``nn.Identity`` for identity)."""
        if self.module is nn.LeakyReLU:
            return nn.LeakyReLU(negative_slope)
        return nn.Identity() if self.module is None else self.module(**self.attributes)


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", lambda x, s: x, None, invertible=lambda s: True, kernel=0),
        Activation(
            "relu",
            lambda x, s: torch.relu(x),
            nn.ReLU,
            functions=(torch.relu, TF.relu, "relu"),
            kernel=1,
        ),
        Activation(
            "leaky_relu",
            lambda x, s: TF.leaky_relu(x, s),
            nn.LeakyReLU,
            invertible=lambda s: s > 0,
            kernel=2,
        ),
        Activation("silu", lambda x, s: TF.silu(x), nn.SiLU, functions=(TF.silu,)),
        Activation(
            "hardswish", lambda x, s: TF.hardswish(x), nn.Hardswish, functions=(TF.hardswish,)
        ),
        Activation("relu6", lambda x, s: TF.relu6(x), nn.ReLU6, functions=(TF.relu6,)),
        Activation(
            "gelu",
            lambda x, s: TF.gelu(x),
            nn.GELU,
            {"approximate": "none"},
            functions=(TF.gelu,),
        ),
        Activation(
            "gelu_tanh",
            lambda x, s: TF.gelu(x, approximate="tanh"),
            nn.GELU,
            {"approximate": "tanh"},
            functions=(TF.gelu,),
        ),
    )
}


def check_activation(activation: str, negative_slope: float, memory_saving: bool) -> None:
    """Refuse an activation the fused layers cannot apply, before any work.

    Raises:
        ValueError: ``activation`` is not in `ACTIVATIONS`; leaky_relu with a negative slope
            (the fused backward reads the sign off the output); ``memory_saving`` with an
            activation that is not invertible.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if activation == "leaky_relu" and not negative_slope >= 0:
        raise ValueError(
            "the fused leaky_relu needs negative_slope >= 0 (its backward reads the sign off "
            f"the output, like torch's in-place leaky_relu), got {negative_slope}"
        )
    if memory_saving and not ACTIVATIONS[activation].invertible(negative_slope):
        usable = [n for n, a in ACTIVATIONS.items() if a.invertible(1.0)]
        raise ValueError(
            "memory_saving rebuilds the input from the output and needs an invertible "
            f"activation ({' or '.join(usable)}; leaky_relu with negative_slope > 0), got "
            f"{activation!r} with negative_slope={negative_slope}"
        )


def of_module(module: nn.Module | None) -> tuple[str, float] | None:
    """(name, negative_slope) of an activation module of the registry (exact class, not a
    subclass, which may change forward), else None."""
    for act in ACTIVATIONS.values():
        if act.module is None or type(module) is not act.module:
            continue
        if all(getattr(module, k, None) == v for k, v in act.attributes.items()):
            slope = float(module.negative_slope) if act.module is nn.LeakyReLU else 0.01
            return act.name, slope
    return None


def of_call(target, args_after_input: tuple, kwargs: dict) -> tuple[str, float] | None:
    """(name, negative_slope) of a functional activation call ``target(x, **kwargs)`` (a
    function, or a Tensor method name) that takes nothing but the tensor, else None."""
    if args_after_input:
        return None
    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
    for act in ACTIVATIONS.values():
        if not any(target is f or (isinstance(f, str) and target == f) for f in act.functions):
            continue
        if {**act.attributes, **kwargs} == act.attributes:
            return act.name, 0.01
    return None
