"""Winograd F(2x2, 3x3): the plain conv's outputs and gradients up to float re-association, on
every geometry it accepts, and only where it applies."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from annseg.layers import winograd
from annseg.layers.winograd import WinogradConv, winograd_conv2d
from tests.models.tiny import one_training_step


@pytest.fixture
def small_blocks(monkeypatch):
    """Several channel blocks and slabs on small maps: the rules for wide convs, on narrow ones."""
    monkeypatch.setattr(winograd, "MAX_BLOCK_CHANNELS", 3)
    monkeypatch.setattr(winograd, "SLAB_VALUES", 20)


def _outputs_and_grads(conv, x, weight, bias, grad):
    inputs = [t.detach().clone().requires_grad_() for t in (x, weight) + (() if bias is None else (bias,))]
    out = conv(*inputs)
    return [out.detach(), *torch.autograd.grad(out, inputs, grad)]


def _compare(x, weight, bias, dilation, tolerance):
    grad = torch.randn(x.shape[0], weight.shape[0], *x.shape[2:], dtype=x.dtype)
    plain = _outputs_and_grads(lambda *a: F.conv2d(*a, padding=dilation, dilation=dilation), x, weight, bias, grad)
    ours = _outputs_and_grads(lambda *a: winograd_conv2d(*a, dilation=dilation), x, weight, bias, grad)
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), plain, ours):
        assert b.shape == a.shape and b.dtype == a.dtype, name
        torch.testing.assert_close(b, a, rtol=0, atol=tolerance * a.abs().max().item(), msg=name)
    return ours


@pytest.mark.parametrize("size, dilation", [
    ((9, 13), (1, 1)), ((11, 6), (2, 2)), ((17, 16), (4, 4)), ((7, 5), (1, 3)), ((1, 1), (1, 1)), ((2, 3), (1, 1)),
    ((8, 8), (1, 1)), ((5, 12), (3, 1))])
@pytest.mark.parametrize("with_bias", [True, False])
def test_equals_the_plain_conv_in_float64(size, dilation, with_bias, small_blocks):
    torch.manual_seed(0)
    x = torch.randn(2, 7, *size, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(5, 7, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(5, dtype=torch.float64) if with_bias else None
    out, grad_x, grad_w, *_ = _compare(x, weight, bias, list(dilation), 1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert grad_x.is_contiguous(memory_format=torch.channels_last)
    assert grad_w.stride() == weight.stride()  # the parameter's own layout


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), c_in=st.integers(1, 9), c_out=st.integers(1, 6), height=st.integers(1, 14),
       width=st.integers(1, 14), dh=st.integers(1, 4), dw=st.integers(1, 4), block=st.integers(1, 9),
       slab=st.integers(1, 200), channels_last=st.booleans())
def test_any_geometry_and_layout_in_float64(batch, c_in, c_out, height, width, dh, dw, block, slab, channels_last):
    old = winograd.MAX_BLOCK_CHANNELS, winograd.SLAB_VALUES
    winograd.MAX_BLOCK_CHANNELS, winograd.SLAB_VALUES = block, slab
    try:
        generator = torch.Generator().manual_seed(batch * 1000 + c_in * 100 + height)
        x = torch.randn(batch, c_in, height, width, dtype=torch.float64, generator=generator)
        weight = torch.randn(c_out, c_in, 3, 3, dtype=torch.float64, generator=generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        _compare(x, weight, None, [dh, dw], 1e-12)
    finally:
        winograd.MAX_BLOCK_CHANNELS, winograd.SLAB_VALUES = old


def test_float32_error_is_that_of_re_association():
    """On a conv as wide as the network's, float32 results stay within 2e-6 of their largest value
    (oneDNN's own float32 conv is off from float64 by about as much)."""
    torch.manual_seed(0)
    x = torch.randn(2, 256, 12, 12).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(128, 256, 3, 3) / 48).contiguous(memory_format=torch.channels_last)
    exact = _outputs_and_grads(lambda *a: F.conv2d(*a, padding=2, dilation=2), x.double(), weight.double(), None,
                               grad := torch.randn(2, 128, 12, 12, dtype=torch.float64))
    ours = _outputs_and_grads(lambda *a: winograd_conv2d(*a, dilation=2), x, weight, None, grad.float())
    for a, b in zip(exact, ours):
        torch.testing.assert_close(b.double(), a, rtol=0, atol=2e-6 * a.abs().max().item())


def test_an_output_gradient_in_another_layout_gives_the_same_gradients(small_blocks):
    x = torch.randn(1, 4, 6, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(1, 3, 6, 7, dtype=torch.float64)  # NCHW, where the output is NHWC
    ours = torch.autograd.grad(winograd_conv2d(x, weight, None, 1), (x, weight), grad)
    plain = torch.autograd.grad(F.conv2d(x, weight, None, padding=1), (x, weight), grad)
    for a, b in zip(plain, ours):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def _routed(conv_args: dict, channels: int | None = None, channels_last: bool = True, weight_shape=(3, 3),
            size: tuple[int, int, int] = (1, 32, 32)) -> bool:
    channels = channels or winograd.MIN_CHANNELS
    x = torch.randn(size[0], channels, *size[1:])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, channels, *weight_shape, requires_grad=True)
    with WinogradConv():
        out = F.conv2d(x, weight, **conv_args)
    return type(out.grad_fn).__name__ == "_WinogradBackward"


def test_the_mode_takes_exactly_the_wide_same_3x3_convs():
    assert _routed(dict(padding=1))
    assert _routed(dict(padding=4, dilation=4))
    assert _routed(dict(padding=(1, 2), dilation=(1, 2)))
    assert not _routed(dict(padding=1, stride=2))  # strided
    assert not _routed(dict(padding=2, dilation=1))  # not "same"
    assert not _routed(dict(padding="same"))
    assert not _routed(dict(), weight_shape=(1, 1))
    assert not _routed(dict(padding=1), channels=winograd.MIN_CHANNELS - 1)  # too narrow to pay
    assert not _routed(dict(padding=1), channels_last=False)
    assert not _routed(dict(padding=1), size=(1, 16, 16))  # too few positions to pay
    assert _routed(dict(padding=1), size=(4, 16, 16))
    assert not _routed(dict(padding=4, dilation=4), size=(4, 8, 12))  # tiles span 8 columns: 16 computed for 12
    assert _routed(dict(padding=4, dilation=4), size=(1, 97, 97))  # 104 x 104 computed for 97 x 97
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _routed(dict(padding=1))


def test_a_double_backward_raises_instead_of_a_wrong_result():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(winograd_conv2d(x, weight).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        grad.sum().backward()


def test_the_network_trains_to_the_same_gradients_in_float64(monkeypatch):
    for rule, value in (("MIN_CHANNELS", 8), ("MIN_POSITIONS", 1), ("MAX_TILE_WASTE", float("inf"))):
        monkeypatch.setattr(winograd, rule, value)  # every 3x3 "same" conv of a small network, on small maps
    calls = []
    apply = winograd._Winograd.apply
    monkeypatch.setattr(winograd._Winograd, "apply", lambda *args: calls.append(1) or apply(*args))
    results = []
    for option in (False, True):
        model, result = one_training_step(winograd_conv=option)
        results.append(result)
        eligible = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
                    and m.stride == (1, 1) and m.padding == m.dilation and min(m.in_channels, m.out_channels) >= 8]
        assert len(eligible) >= 15  # the backbone's unstrided 3x3 convs and the heads' two
        assert len(calls) == (len(eligible) if option else 0)  # each of them, once, and only when asked
    scale = max(g.abs().max().item() for g in results[0])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10 * scale)
