"""torch's own test cases for its BN modules (`common_modules.module_db`) run on our layers.

For every ModuleInput of nn.BatchNorm1d/2d/3d (constructor and forward arguments, train and
eval mode) our layer must do what torch's does from the same state: forward, buffers,
gradients (and second derivatives), pickling, non-contiguous input, memory formats, the meta
device, and the same exception type for torch's error inputs. The oracle is torch's module.

One documented difference: an empty batch (N = 0) in training leaves our
``num_batches_tracked`` alone (torch counts it, which shifts momentum=None's 1/k average).
"""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from torch.testing._internal.common_modules import module_db
from torch.testing._internal.common_utils import noncontiguous_like

import batchnorm

OURS = {
    nn.BatchNorm1d: batchnorm.BatchNorm1d,
    nn.BatchNorm2d: batchnorm.BatchNorm2d,
    nn.BatchNorm3d: batchnorm.BatchNorm3d,
}
INFOS = [info for info in module_db if info.module_cls in OURS]
BACKWARDS = ["native", "paper"]


def _cases(dtype=torch.float32):
    """(module info, ModuleInput, training) for every case torch declares."""
    torch.manual_seed(0)
    out = []
    for info in INFOS:
        for training in (True, False):
            inputs = info.module_inputs_func(
                info, device="cpu", dtype=dtype, requires_grad=True, training=training
            )
            for mi in inputs:
                name = f"{info.name[3:]}-{mi.desc or 'default'}-{'train' if training else 'eval'}"
                out.append(pytest.param(info, mi, training, id=name))
    return out


CASES = _cases()
# float64 where the paper's equations meet torch's kernel to rounding: batch statistics.
TRAIN64 = [c for c in _cases(torch.float64) if c.values[2]]
IMAGES = [c for c in CASES if c.values[1].forward_input.args[0].dim() in (4, 5)]


def _build(info, mi, training, backward="native", device=None):
    """torch's module and ours from the case's constructor arguments, with the same state
    (random gamma and beta, and some running statistics), in the case's mode."""
    args, kwargs = mi.constructor_input.args, dict(mi.constructor_input.kwargs)
    if device is not None:
        kwargs["device"] = device
    theirs = info.module_cls(*args, **kwargs)
    ours = OURS[info.module_cls](*args, backward=backward, **kwargs)
    if device != "meta":
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            if theirs.running_mean is not None:
                theirs.running_mean.copy_(torch.randn(theirs.running_mean.shape, generator=g))
                theirs.running_var.copy_(torch.rand(theirs.running_var.shape, generator=g) + 0.5)
                theirs.num_batches_tracked.fill_(3)
        ours.load_state_dict(theirs.state_dict())
    dtype = mi.forward_input.args[0].dtype
    return theirs.to(dtype).train(training), ours.to(dtype).train(training)


def _input(mi, transform=None):
    x = mi.forward_input.args[0].detach().clone()
    if transform is not None:
        x = transform(x)
    return x.requires_grad_()


def _compare_state(ours, theirs, empty):
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    for key in sd_ours:
        if empty and key.endswith("num_batches_tracked"):
            continue  # the documented difference (module docstring)
        torch.testing.assert_close(sd_ours[key], sd_theirs[key], msg=key)


def _step(module, x, grad):
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(grad)
    return y, x.grad, [p.grad for p in module.parameters()]


def _check_same(info, mi, training, backward, transform=None, both=False):
    theirs, ours = _build(info, mi, training, backward)
    empty = mi.forward_input.args[0].shape[0] == 0
    g = torch.Generator().manual_seed(2)
    for _ in range(2):  # two steps: the second sees the first one's running statistics
        grad = torch.randn(mi.forward_input.args[0].shape, generator=g)
        grad = grad.to(mi.forward_input.args[0].dtype)
        y_ref, gx_ref, gp_ref = _step(theirs, _input(mi, transform if both else None), grad)
        y, gx, gp = _step(ours, _input(mi, transform), grad)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(gx, gx_ref)
        for a, b in zip(gp, gp_ref, strict=True):
            # Sums over the batch: the paper's backward adds in another order than torch.
            tol = {"rtol": 1e-5, "atol": 1e-4} if a.dtype == torch.float32 else {}
            torch.testing.assert_close(a, b, **tol)
        _compare_state(ours, theirs, empty)
    return y, y_ref


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("info,mi,training", CASES)
def test_forward_gradients_and_buffers_match_torch(info, mi, training, backward):
    _check_same(info, mi, training, backward)


@pytest.mark.parametrize("info,mi,training", TRAIN64)
def test_paper_backward_matches_torch_in_float64(info, mi, training):
    _check_same(info, mi, training, "paper")


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("info,mi,training", CASES)
def test_non_contiguous_input(info, mi, training, backward):
    x = mi.forward_input.args[0]
    assert not noncontiguous_like(x).is_contiguous() or x.numel() <= 1
    _check_same(info, mi, training, backward, transform=noncontiguous_like)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("info,mi,training", IMAGES)
def test_memory_formats(info, mi, training, backward):
    dim = mi.forward_input.args[0].dim()
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[dim]
    y, y_ref = _check_same(
        info, mi, training, backward, lambda x: x.contiguous(memory_format=fmt), both=True
    )
    assert y.is_contiguous(memory_format=fmt) == y_ref.is_contiguous(memory_format=fmt)


SMALL64 = [c for c in TRAIN64 if c.values[1].forward_input.args[0].numel() <= 100]


@pytest.mark.parametrize("info,mi,training", SMALL64)
def test_second_derivatives(info, mi, training):
    # torch declares supports_gradgrad for these modules; so do both of our backwards (with
    # batch statistics: in eval mode BN is an affine map, nothing to check beyond first order;
    # the 1d cases, whose inputs are small enough for a numerical second derivative).
    if mi.forward_input.args[0].shape[0] == 0:
        pytest.skip("nothing to differentiate in an empty batch")
    for backward in BACKWARDS:
        _, ours = _build(info, mi, training, backward)
        params = list(ours.parameters())

        def f(x, *ps, ours=ours):
            out = torch.func.functional_call(
                ours,
                {**dict(ours.named_buffers()), **dict(zip(dict(ours.named_parameters()), ps))},
                (x,),
            )
            return out

        inputs = (_input(mi), *[p.detach().clone().requires_grad_() for p in params])
        assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True), backward


@pytest.mark.parametrize("info,mi,training", CASES)
def test_pickle_round_trip(info, mi, training):
    _, ours = _build(info, mi, training, "paper")
    ours(_input(mi))
    copy = pickle.loads(pickle.dumps(ours))
    assert type(copy) is type(ours) and copy.backward == "paper" and copy.training == training
    _compare_state(copy, ours, empty=False)
    torch.testing.assert_close(copy(_input(mi)), ours(_input(mi)))
    _compare_state(copy, ours, empty=False)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("info,mi,training", CASES)
def test_meta_device(info, mi, training, backward):
    theirs, ours = _build(info, mi, training, backward, device="meta")
    x = mi.forward_input.args[0].detach().to("meta")
    y = ours(x)
    assert y.device.type == "meta"
    try:
        y_ref = theirs(x)
    except RuntimeError as err:  # torch's momentum=None reads k back, which meta cannot
        assert theirs.momentum is None and training and "meta" in str(err)
        assert (y.shape, y.dtype) == (x.shape, x.dtype)
    else:
        assert (y.shape, y.dtype) == (y_ref.shape, y_ref.dtype)


def _error_cases():
    out = []
    for info in INFOS:
        errors = info.module_error_inputs_func(
            info, device="cpu", dtype=torch.float32, requires_grad=False, training=True
        )
        for i, e in enumerate(errors):
            out.append(pytest.param(info, e, id=f"{info.name[3:]}-{i}"))
    return out


@pytest.mark.parametrize("info,error", _error_cases())
def test_error_inputs_raise_the_same_exception(info, error):
    # As torch's harness: build, then call in the default (training) mode.
    mi = error.module_error_input
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    x = mi.forward_input.args[0]
    for cls in (info.module_cls, OURS[info.module_cls]):
        # torch raises at forward; we refuse an eps < 0 already at construction.
        with pytest.raises(error.error_type, match=error.error_regex):
            cls(*args, **kwargs)(x)
