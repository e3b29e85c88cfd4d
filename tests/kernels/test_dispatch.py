"""The layers' ``backend`` dispatch to the Triton kernels, run on the CPU under the interpreter.

Oracles: torch.nn's BN layers followed by torch's add and activation (outputs, gradients,
running statistics, counters), and our layers' torch path for the state they leave.
"""

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import batchnorm
from batchnorm import dispatch, kernels


@pytest.fixture
def spy(monkeypatch):
    """Count the layers' calls of the kernels (their transform step)."""
    calls = []
    real = kernels.transform

    def counting(*args, **kwargs):
        calls.append(kwargs.get("activation"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch.kernels, "transform", counting)
    return calls


def _act(y, activation, slope=0.01):
    if activation == "relu":
        return torch.relu(y)
    if activation == "leaky_relu":
        return TF.leaky_relu(y, slope)
    return y


def test_auto_takes_the_torch_path_on_cpu_tensors(spy):
    layer = batchnorm.BatchNorm2d(3)
    ref = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(layer(x), ref(x))
    assert spy == [] and not dispatch.use_kernels(layer, x)


@pytest.fixture
def fake_gpu(monkeypatch):
    """CPU tensors pass for CUDA ones of compute capability 9.0 (the interpreter runs the
    kernels): what ``backend="auto"`` sees on an H100/H200."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(dispatch, "_capability", lambda device: (9, 0))


@pytest.mark.parametrize("fused", [False, True])
def test_auto_takes_the_kernels_only_on_measured_architectures(fake_gpu, spy, monkeypatch, fused):
    layer = batchnorm.BatchNormAct2d(3) if fused else batchnorm.BatchNorm2d(3)
    ref = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    expected = ref(x)
    if fused:
        expected = torch.relu(expected)
    assert dispatch.MEASURED == {}  # shipped empty: no card has run the kernels yet
    torch.testing.assert_close(layer(x), expected)
    assert spy == [] and not dispatch.use_kernels(layer, x)
    monkeypatch.setitem(dispatch.MEASURED, (8, 0), "results/gpu/a100.md")
    layer(x)
    assert spy == []  # another architecture's results say nothing about this one
    monkeypatch.setitem(dispatch.MEASURED, (9, 0), "results/gpu/h200.md")
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert len(spy) == 1 and dispatch.use_kernels(layer, x)


def test_triton_is_opt_in_on_unmeasured_architectures(fake_gpu, spy):
    layer = batchnorm.BatchNorm2d(3, backend="triton")
    layer(torch.randn(4, 3, 5, 5))
    assert len(spy) == 1


def test_auto_rules_where_the_device_qualifies(monkeypatch):
    # auto's device rule is CUDA only; pretend the CPU qualifies to test every other rule.
    monkeypatch.setattr(dispatch, "_auto_takes", lambda t: True)
    x = torch.randn(4, 3, 5, 5)
    assert dispatch.use_kernels(batchnorm.BatchNorm2d(3), x)
    assert dispatch.use_kernels(batchnorm.BatchNormAct2d(3), x, residual=x)
    assert not dispatch.use_kernels(batchnorm.BatchNorm2d(3), x.double())
    assert not dispatch.use_kernels(batchnorm.BatchNorm2d(3), x, torch.ones(4, 5, 5, dtype=bool))
    assert not dispatch.use_kernels(batchnorm.BatchNorm2d(3, virtual_batch_size=2), x)
    assert not dispatch.use_kernels(batchnorm.BatchNorm2d(3, backward="paper"), x)
    assert not dispatch.use_kernels(batchnorm.BatchRenorm2d(3), x)
    assert not dispatch.use_kernels(batchnorm.SyncBatchNorm(3), x)
    assert not dispatch.use_kernels(batchnorm.BatchNorm2d(3, backend="torch"), x)


def test_triton_falls_back_under_torch_compile(spy):
    layer = batchnorm.BatchNormAct2d(3, backend="triton")
    ref = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    compiled = torch.compile(layer, backend="aot_eager")
    torch.testing.assert_close(compiled(x), torch.relu(ref(x)))
    assert spy == []
    torch.testing.assert_close(layer.running_var, ref.running_var)
    layer(x)  # eager again: the kernels
    assert spy == ["relu"]


def test_triton_falls_back_under_torch_func(spy, randomize):
    layer = randomize(batchnorm.BatchNorm2d(3, backend="triton")).eval()
    ref = randomize(nn.BatchNorm2d(3)).eval()
    x = torch.randn(4, 3, 5, 5)
    g = torch.func.grad(lambda t: layer(t).pow(2).sum())(x)
    torch.testing.assert_close(g, torch.func.grad(lambda t: ref(t).pow(2).sum())(x))
    assert spy == []


@pytest.mark.parametrize(
    "make",
    [
        lambda: batchnorm.BatchNorm2d(3, backend="triton", backward="paper"),
        lambda: batchnorm.BatchNorm2d(3, backend="triton", virtual_batch_size=2),
        lambda: batchnorm.BatchRenorm2d(3, backend="triton"),
        lambda: batchnorm.SyncBatchNorm(3, backend="triton"),
        lambda: batchnorm.BatchNorm2d(3, backend="cuda"),
    ],
)
def test_triton_refuses_settings_the_kernels_lack(make):
    with pytest.raises(ValueError, match="backend"):
        make()


def test_triton_refuses_calls_the_kernels_cannot_take():
    layer = batchnorm.BatchNorm2d(3, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        layer(torch.randn(4, 3, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(4, 3, 5, 5), torch.ones(4, 5, 5, dtype=torch.bool))


@pytest.mark.parametrize(
    ("shape", "channels_last", "activation", "residual"),
    [
        ((4, 6, 5, 3), False, "relu", True),
        ((4, 6, 5, 3), True, "leaky_relu", True),
        ((3, 6, 2, 3, 2), False, "relu", False),
        ((7, 6), False, "identity", True),
        ((5, 6, 9), False, "leaky_relu", False),
    ],
)
def test_fused_layer_on_the_kernels_matches_torch_nn(
    spy, shape, channels_last, activation, residual, randomize
):
    rank = len(shape)
    ours_cls = {2: batchnorm.BatchNormAct1d, 3: batchnorm.BatchNormAct1d}.get(
        rank, batchnorm.BatchNormAct2d if rank == 4 else batchnorm.BatchNormAct3d
    )
    ref_cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
    layer = randomize(ours_cls(6, activation=activation, negative_slope=0.2, backend="triton"))
    ref = ref_cls(6)
    ref.load_state_dict(layer.state_dict())
    torch.manual_seed(1)
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    r = torch.randn(shape) if residual else None
    for _ in range(2):
        xs = x.clone().requires_grad_()
        rs = None if r is None else r.clone().requires_grad_()
        y = layer(xs, rs)
        expected = ref(xs)
        expected = _act(expected if rs is None else expected + rs, activation, 0.2)
        torch.testing.assert_close(y, expected, atol=2e-5, rtol=2e-5)
        grad = torch.randn(shape)
        inputs = [xs, layer.weight, layer.bias] + ([rs] if rs is not None else [])
        ref_inputs = [xs, ref.weight, ref.bias] + ([rs] if rs is not None else [])
        got = torch.autograd.grad(y, inputs, grad)
        want = torch.autograd.grad(expected, ref_inputs, grad)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.running_mean, ref.running_mean)
    torch.testing.assert_close(layer.running_var, ref.running_var)
    assert layer.num_batches_tracked.item() == 2 and layer.num_batches_skipped.item() == 0
    layer.eval()
    ref.eval()
    expected = ref(x)
    torch.testing.assert_close(
        layer(x, r), _act(expected if r is None else expected + r, activation, 0.2)
    )
    assert len(spy) == 3  # both training steps and the eval call ran on the kernels


def test_plain_layers_on_the_kernels_leave_the_torch_paths_state(spy):
    x = torch.randn(6, 5, 4)
    kernel = batchnorm.BatchNorm(4, axis=-1, momentum=None, backend="triton")
    torch_path = batchnorm.BatchNorm(4, axis=-1, momentum=None, backend="torch")
    for _ in range(3):
        torch.testing.assert_close(kernel(x), torch_path(x), atol=1e-5, rtol=1e-5)
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    kernel(bad)
    torch_path(bad)
    for name, value in torch_path.named_buffers():
        torch.testing.assert_close(kernel.get_buffer(name), value, msg=name)
    assert kernel.num_batches_skipped.item() == 1 and kernel.num_batches_tracked.item() == 3
    assert len(spy) == 4


def test_memory_saving_gradients_equal_the_standard_ones_and_free_the_input(randomize):
    standard = randomize(
        batchnorm.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.1, backend="triton")
    )
    saving = randomize(
        batchnorm.BatchNormAct2d(
            4, activation="leaky_relu", negative_slope=0.1, memory_saving=True, backend="triton"
        )
    )
    assert saving.state_dict().keys() == nn.BatchNorm2d(4).state_dict().keys()
    x = torch.randn(5, 4, 3, 3, requires_grad=True)
    grad = torch.randn(5, 4, 3, 3)
    results = []
    for layer in (standard, saving):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, saved=saved: saved.append(t.data_ptr()) or t, lambda t: t
        ):
            y = layer(x)
        results.append(torch.autograd.grad(y, (x, layer.weight, layer.bias), grad))
        results.append(x.data_ptr() in saved)
    (g_std, kept_std), (g_save, kept_save) = results[:2], results[2:]
    for a, b in zip(g_std, g_save):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert kept_std and not kept_save
    with pytest.raises(ValueError, match="residual"):
        saving(x, torch.zeros_like(x))


# Regressions of an audit of the kernels (issue 16), through the layers.


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's float16 overflow, interpreted
def test_half_precision_layer_skips_what_float16_cannot_store(spy):
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 5) * 1000).half()
    kernel = batchnorm.BatchNorm2d(3, backend="triton").half()
    torch_path = batchnorm.BatchNorm2d(3, backend="torch").half()
    kernel(x)
    torch_path(x)
    assert len(spy) == 1
    for name, value in torch_path.named_buffers():
        torch.testing.assert_close(kernel.get_buffer(name), value, msg=name)
    assert kernel.num_batches_skipped.item() == 1


@pytest.mark.parametrize("shape", [(4, 3, 0, 5), (4, 0, 5, 5)])
def test_empty_input_on_the_kernels_is_the_torch_paths(spy, shape):
    for training in (True, False):
        kernel = batchnorm.BatchNormAct2d(shape[1], backend="triton").train(training)
        torch_path = batchnorm.BatchNormAct2d(shape[1], backend="torch").train(training)
        x = torch.randn(shape, requires_grad=True)
        y = kernel(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        y.sum().backward()
        assert x.grad.shape == x.shape
        if shape[1] == 0 and not training:
            continue  # torch.nn's BN (and so the torch path) fails on C = 0 in eval mode
        torch_path(x)
        for name, value in torch_path.named_buffers():
            torch.testing.assert_close(kernel.get_buffer(name), value, msg=name)
    assert len(spy) == 2


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_forward_mode_ad_takes_the_torch_path(fake_gpu, spy, monkeypatch, backend, randomize):
    from torch.autograd import forward_ad

    monkeypatch.setitem(dispatch.MEASURED, (9, 0), "results/gpu/h200.md")
    layer = randomize(batchnorm.BatchNormAct2d(3, activation="leaky_relu", backend=backend))
    ref = nn.BatchNorm2d(3)
    ref.load_state_dict(layer.state_dict())
    x, t = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    with forward_ad.dual_level():
        y = forward_ad.unpack_dual(layer(forward_ad.make_dual(x, t)))
        y_ref = forward_ad.unpack_dual(TF.leaky_relu(ref(forward_ad.make_dual(x, t)), 0.01))
    torch.testing.assert_close(y.primal, y_ref.primal)
    torch.testing.assert_close(y.tangent, y_ref.tangent)
    assert spy == []
    torch.testing.assert_close(layer.running_mean, ref.running_mean)
    layer(x)  # no forward AD: the kernels again
    assert len(spy) == 1


def test_huge_address_span_takes_the_torch_path(fake_gpu, spy, monkeypatch, huge_view):
    # 24 values over 2^31 + 12 addresses: auto falls back, triton says why.
    monkeypatch.setitem(dispatch.MEASURED, (9, 0), "results/gpu/h200.md")
    x = huge_view
    torch.testing.assert_close(batchnorm.BatchNorm2d(3)(x), nn.BatchNorm2d(3)(x.clone()))
    assert spy == []
    with pytest.raises(ValueError, match="address span"):
        batchnorm.BatchNorm2d(3, backend="triton")(x)
    # Such a residual: the fused call is refused as a whole (the engine is chosen once per
    # call, for the call), so BN, the add and the activation run in torch.
    ref = nn.BatchNorm2d(3)
    torch.testing.assert_close(
        batchnorm.BatchNormAct2d(3)(x.clone(), x), torch.relu(ref(x.clone()) + x),
        atol=2e-3, rtol=2e-3,
    )  # fmt: skip
    assert spy == []


def test_double_backward_and_batched_grads_through_a_triton_layer(spy, randomize):
    # issue 15: torch's BN supports create_graph and is_grads_batched; so does the kernel path.
    layer = randomize(batchnorm.BatchNormAct2d(3, activation="leaky_relu", backend="triton"))
    ref = nn.BatchNorm2d(3).double()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(4, 3, 3, 3)
    results = []
    for model, t in ((layer, x), (lambda t: TF.leaky_relu(ref(t), 0.01), x.double())):
        t = t.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(t).pow(2).sum(), t, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), t)
        jac = torch.autograd.functional.jacobian(model, t, vectorize=True)
        results.append((g, gg, jac))
    for a, b in zip(*results):
        torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=2e-4)
    assert len(spy) == 2
