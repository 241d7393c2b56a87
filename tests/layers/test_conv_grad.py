"""MatmulWeightGrad: channels-last convs on the CPU give the plain conv's outputs and gradients
(up to float re-association) with their weight gradient as matrix products."""

import pytest
import torch
import torch.nn.functional as F

from annseg.layers.conv_grad import MatmulWeightGrad
from tests.models.tiny import one_training_step


def _grads(conv_args: dict, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mode: bool):
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    with MatmulWeightGrad() if mode else torch.enable_grad():
        out = F.conv2d(x, weight, bias, **conv_args)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = [out.detach(), x.grad, weight.grad] + ([] if bias is None else [bias.grad])
    return grads, out.grad_fn


@pytest.mark.parametrize("kernel, conv_args", [
    ((3, 3), dict(padding=1)), ((3, 3), dict(padding=2, dilation=2)), ((3, 3), dict(stride=2, padding=1)),
    ((3, 3), {}), ((5, 3), dict(padding=(2, 0), stride=(1, 2), dilation=(1, 3))), ((3, 3), dict(padding=4)),
    ((1, 1), {}), ((1, 1), dict(stride=2)), ((3, 3), dict(padding="same"))])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_weight_gradient_as_matmuls_is_the_same_gradient(kernel, conv_args, dtype, tolerance, with_bias, monkeypatch):
    from annseg.layers import conv_grad

    monkeypatch.setattr(conv_grad, "MIN_TAP_CHANNELS", 1)  # the rule for wide convs, on a small one
    torch.manual_seed(0)
    x = torch.randn(2, 6, 11, 9, dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(5, 6, *kernel, dtype=dtype).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(5, dtype=dtype) if with_bias else None
    plain, plain_fn = _grads(conv_args, x, weight, bias, mode=False)
    other, other_fn = _grads(conv_args, x, weight, bias, mode=True)
    for a, b in zip(plain, other):
        torch.testing.assert_close(b, a, rtol=0, atol=tolerance * a.abs().max().item())
    used = conv_args.get("padding") != "same" and (kernel != (1, 1) or not conv_args)
    assert (type(other_fn).__name__ == "_ConvMatmulWeightGradBackward") == used  # applied where it should be
    assert other[2].is_contiguous(memory_format=torch.channels_last)  # the parameter's own layout


def test_narrow_convs_are_left_to_onednn():
    x = torch.randn(1, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    with MatmulWeightGrad():
        out = F.conv2d(x, weight, padding=1)
    assert type(out.grad_fn).__name__ != "_ConvMatmulWeightGradBackward"


def test_contiguous_inputs_are_left_to_torch():
    x, weight = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3, requires_grad=True)
    with MatmulWeightGrad():
        out = F.conv2d(x, weight, padding=1)
    assert type(out.grad_fn).__name__ != "_ConvMatmulWeightGradBackward"


def test_the_network_trains_to_the_same_gradients_in_float64(monkeypatch):
    from annseg.layers import conv_grad

    calls = []
    apply = conv_grad._ConvMatmulWeightGrad.apply
    monkeypatch.setattr(conv_grad._ConvMatmulWeightGrad, "apply", lambda *args: calls.append(1) or apply(*args))
    grads = []
    for option in (False, True):
        grads.append(one_training_step(matmul_weight_grad=option)[1][2:])
        assert bool(calls) == option  # every conv of the backbone and heads, only when asked
    scale = max(g.abs().max().item() for g in grads[0])  # some are zero up to rounding (a conv bias before BN)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10 * scale)
