"""One forward, one commit (issue 18): every layer call is validated once, its engine chosen
once (`batchnorm.dispatch.choose`), and every engine writes the running statistics through
the one guarded write (`batchnorm.functional.write_running_stats`), once per training call.

Oracles: the engines against each other on the same batches (reference transform + commit,
torch's fused kernel, the Triton kernels under the interpreter), a NaN batch and the
cumulative momentum included; call counts of the shared checks and of the write.
"""

import copy

import pytest
import torch

import batchnorm
from batchnorm import dispatch
from batchnorm import functional as F
from batchnorm.functional import running
from batchnorm.kernels import function as kernel_function


@pytest.fixture
def calls(monkeypatch):
    """Count, per kind, the layer's checks, the engine choices (by engine name), the kernels'
    own argument check, and the writes of running statistics."""
    seen = {"validate": 0, "kernel_check": 0, "write": 0, "engines": []}

    def counting(key, real):
        def wrapper(*args, **kwargs):
            seen[key] += 1
            return real(*args, **kwargs)

        return wrapper

    base = batchnorm.modules._BatchNormBase
    monkeypatch.setattr(base, "_check_input_dim", counting("validate", base._check_input_dim))
    monkeypatch.setattr(kernel_function, "_check", counting("kernel_check", kernel_function._check))
    write = counting("write", running.write_running_stats)
    monkeypatch.setattr(running, "write_running_stats", write)  # commit_running_stats' lookup
    monkeypatch.setattr(F, "write_running_stats", write)  # dispatch's fused engine's lookup
    real_choose = dispatch.choose

    def choosing(*args, **kwargs):
        engine = real_choose(*args, **kwargs)
        seen["engines"].append(engine.name)
        return engine

    monkeypatch.setattr(dispatch, "choose", choosing)
    return seen


LAYERS = {
    # name: (constructor, forward arguments after x, expected engine in training)
    "bn fused": (lambda: batchnorm.BatchNorm2d(3), {}, "fused"),
    "bn masked": (
        lambda: batchnorm.BatchNorm2d(3),
        {"mask": torch.rand(6, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.3},
        "reference",
    ),
    "bn paper": (lambda: batchnorm.BatchNorm2d(3, backward="paper"), {}, "reference"),
    "renorm": (lambda: batchnorm.BatchRenorm2d(3), {}, "reference"),
    "bn kernels": (lambda: batchnorm.BatchNorm2d(3, backend="triton"), {}, "kernels"),
    "act kernels": (
        lambda: batchnorm.BatchNormAct2d(3, backend="triton"),
        {"residual": torch.randn(6, 3, 4, 4)},
        "kernels",
    ),
    "act torch": (
        lambda: batchnorm.BatchNormAct2d(3),
        {"residual": torch.randn(6, 3, 4, 4)},
        "fused",
    ),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_each_call_is_validated_once_chooses_once_and_writes_once(calls, name):
    make, kwargs, engine = LAYERS[name]
    layer = make()
    x = torch.randn(6, 3, 4, 4)
    layer(x, **kwargs)
    assert calls["engines"] == [engine]
    assert (calls["validate"], calls["kernel_check"], calls["write"]) == (1, 0, 1)
    layer.eval()
    layer(x, **kwargs)
    engines = {"kernels": "kernels"}.get(engine, "inference")
    assert calls["engines"] == [engine, engines]
    assert (calls["validate"], calls["kernel_check"], calls["write"]) == (2, 0, 1)  # no write


@pytest.mark.parametrize("momentum", [0.1, None])
def test_every_engine_leaves_the_same_state(calls, momentum):
    """The same batches (a NaN one among them) through three engines of BatchNorm2d: running
    statistics and both counters agree."""
    torch.manual_seed(0)
    batches = [torch.randn(6, 3, 4, 4) * 2 + 1 for _ in range(4)]
    batches[2][0, 1, 0, 0] = float("nan")
    base = batchnorm.BatchNorm2d(3, momentum=momentum)
    layers = {
        "fused": base,
        "reference": batchnorm.BatchNorm2d(3, momentum=momentum, backward="paper"),
        "kernels": batchnorm.BatchNorm2d(3, momentum=momentum, backend="triton"),
    }
    start = copy.deepcopy(base.state_dict())
    for layer in layers.values():
        layer.load_state_dict(start)
        for x in batches:
            layer(x)
    assert calls["engines"] == ["fused"] * 4 + ["reference"] * 4 + ["kernels"] * 4
    assert calls["write"] == 12
    for name, layer in layers.items():
        torch.testing.assert_close(layer.running_mean, base.running_mean, msg=name)
        torch.testing.assert_close(layer.running_var, base.running_var, msg=name)
        assert (int(layer.num_batches_tracked), int(layer.num_batches_skipped)) == (3, 1), name
