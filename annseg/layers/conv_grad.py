"""Training on the CPU: a channels-last conv's weight gradient computed another way.

oneDNN convolves channels-last (NHWC) maps faster than NCHW ones, forward and for the input
gradient, but its NHWC *weight* gradient can be much slower. On a 2-core AVX2 EPYC, ANN's 3x3
context conv (2048 -> 512, 2x48x48) takes 1,657 ms for its NHWC weight gradient against 719 ms
in NCHW, the auxiliary head's 3x3 conv (1024 -> 256) 322 against 164 ms, and a 1x1 conv
(1024 -> 2048) 174 ms against 108 ms for the same product as one matmul; forward and input
gradient are 5-30% faster in NHWC. While ``NchwWeightGrad`` is active, every channels-last
conv on the CPU keeps its NHWC forward and input gradient and takes its weight (and bias)
gradient either from NCHW copies of its input and output gradient (k x k kernels; the copies
are made in the backward and freed after it) or, for a 1x1 conv of stride 1, as one matmul of
the NHWC maps' tokens (no copy). The same gradients up to float re-association.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


class NchwWeightGrad(TorchFunctionMode):
    """Context for a training forward on the CPU: channels-last k x k convs get their weight
    gradient in NCHW (``_ConvNchwWeightGrad``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.conv2d and _applies(*args, **kwargs):
            return _ConvNchwWeightGrad.apply(*_conv_arguments(*args, **kwargs))
        return func(*args, **kwargs)


def _conv_arguments(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                    dilation=1, groups: int = 1) -> tuple:
    """``F.conv2d``'s arguments, pairs spelt out (``convolution_backward`` wants lists)."""
    pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
    return input, weight, bias, pair(stride), pair(padding), pair(dilation), groups


def _applies(input: object, weight: object, bias: object = None, stride=1, padding=0, dilation=1,
             groups: int = 1) -> bool:
    return (isinstance(input, Tensor) and isinstance(weight, Tensor) and input.device.type == "cpu"
            and torch.is_grad_enabled() and weight.requires_grad and not isinstance(padding, str)
            and groups == 1 and input.dim() == 4 and (tuple(weight.shape[-2:]) != (1, 1) or _pointwise(stride, padding))
            and input.dtype == weight.dtype and not torch.is_autocast_enabled("cpu")
            and not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last))


def _pointwise(stride: object, padding: object) -> bool:
    """A 1x1 conv's stride and padding leave every output position reading its own input position."""
    return all(v in (1, (1, 1), [1, 1]) for v in (stride,)) and all(v in (0, (0, 0), [0, 0]) for v in (padding,))


class _ConvNchwWeightGrad(torch.autograd.Function):
    """``F.conv2d`` whose backward takes the input gradient in the input's layout and the weight
    gradient from NCHW copies."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                dilation: list[int], groups: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.has_bias = (stride, padding, dilation, groups), bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        common = (stride, padding, dilation, False, [0, 0], groups)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad_out, x, weight, None, *common, [True, False, False])[0]
        wants = [False, ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        if any(wants) and tuple(weight.shape[-2:]) == (1, 1):  # stride 1, no padding: tokens times tokens
            out_tokens = grad_out.permute(0, 2, 3, 1).reshape(-1, weight.shape[0])  # (B*H*W, C_out), a view
            if wants[1]:
                in_tokens = x.permute(0, 2, 3, 1).reshape(-1, weight.shape[1])  # (B*H*W, C_in)
                grad_weight = (out_tokens.t() @ in_tokens).view_as(weight)  # (C_out, C_in, 1, 1)
            if wants[2]:
                grad_bias = out_tokens.sum(0)
        elif any(wants):
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_out.contiguous(), x.contiguous(), weight.contiguous(), [weight.shape[0]] if wants[2] else None,
                *common, wants)
            if grad_weight is not None and weight.is_contiguous(memory_format=torch.channels_last):
                grad_weight = grad_weight.contiguous(memory_format=torch.channels_last)  # the parameter's layout
        return grad_x, grad_weight, grad_bias, None, None, None, None
