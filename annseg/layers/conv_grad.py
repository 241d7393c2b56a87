"""Training on the CPU: a channels-last conv's weight gradient as matrix products.

oneDNN convolves channels-last (NHWC) maps faster than NCHW ones, forward and for the input
gradient, but its NHWC *weight* gradient can be much slower. On a 2-core AVX2 EPYC, the weight
gradient of ANN's 3x3 context conv (2048 -> 512, 2x48x48) takes 1,658 ms in NHWC, 787 ms
through NCHW copies, and 667 ms as the nine matrix products below; a 1x1 conv (1024 -> 2048)
173 ms against 108 ms as one product (``benchmarks/conv-weight-grad/``, with its command). While ``MatmulWeightGrad`` is active, a channels-last
conv on the CPU keeps oneDNN's NHWC forward and input gradient, and computes its weight (and
bias) gradient from the NHWC maps' tokens, (B*H*W, C) views:

- 1x1, stride 1: ``dW = dY^T X``, one matmul, no copy;
- k x k with at least ``MIN_TAP_CHANNELS`` input channels: per kernel tap (i, j),
  ``dW[:, :, i, j] = dY_t^T X_t`` over the output positions whose input position lies inside
  the map (zero padding contributes nothing), with X_t the input shifted by the tap (one copy
  of the input at a time, freed after its product).

Narrow convs (the stem) stay with oneDNN: their products are too thin to pay. The same
gradients up to float re-association (``tests/layers/test_conv_grad.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

MIN_TAP_CHANNELS = 128  # below this, a tap's (C_out x N) @ (N x C_in) product is too thin to beat oneDNN


class MatmulWeightGrad(TorchFunctionMode):
    """Context for a training forward on the CPU: channels-last convs take their weight gradient
    as matrix products (``_ConvMatmulWeightGrad``) where that pays."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.conv2d:
            conv = conv_arguments(*args, **kwargs)
            if conv is not None and _applies(*conv):
                return _ConvMatmulWeightGrad.apply(*conv)
        return func(*args, **kwargs)


def conv_arguments(input: object, weight: object, bias: object = None, stride=1, padding=0, dilation=1,
                    groups: int = 1) -> tuple | None:
    """``F.conv2d``'s arguments with pairs spelt out as lists, or None for a string padding ('same')."""
    if isinstance(padding, str):
        return None
    pair = lambda v: [int(v[0]), int(v[1])] if isinstance(v, (tuple, list)) else [int(v), int(v)]  # noqa: E731
    return input, weight, bias, pair(stride), pair(padding), pair(dilation), groups


def _applies(input: object, weight: object, bias: object, stride: list[int], padding: list[int],
             dilation: list[int], groups: int) -> bool:
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor) and input.device.type == "cpu"
            and input.dim() == 4 and groups == 1 and torch.is_grad_enabled() and weight.requires_grad
            and input.dtype == weight.dtype and not torch.is_autocast_enabled("cpu")
            and not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last)):
        return False
    if tuple(weight.shape[-2:]) == (1, 1):
        return stride == [1, 1] and padding == [0, 0]
    return weight.shape[1] >= MIN_TAP_CHANNELS


class _ConvMatmulWeightGrad(torch.autograd.Function):
    """``F.conv2d`` whose backward takes the input gradient from oneDNN and the weight gradient
    as matrix products of NHWC tokens."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                dilation: list[int], groups: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.geometry = stride, padding, dilation
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad_out, x, weight, None, stride, padding, dilation, False,
                                                         [0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_weight = weight_grad(grad_out, x, tuple(weight.shape), stride, padding, dilation)
        if ctx.needs_input_grad[2]:  # False for a None bias
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None, None, None


def weight_grad(grad_out: Tensor, x: Tensor, shape: tuple[int, ...], stride: list[int], padding: list[int],
                dilation: list[int]) -> Tensor:
    """The (C_out, C_in, kh, kw) weight gradient of a conv, channels-last, from its input x
    (B, C_in, H, W) and output gradient (B, C_out, H', W'), as one matmul per kernel tap."""
    c_out, c_in, kh, kw = shape
    grad = grad_out.new_empty(shape).contiguous(memory_format=torch.channels_last)
    rows = [_valid(grad_out.shape[2], stride[0], padding[0], i * dilation[0], x.shape[2]) for i in range(kh)]
    cols = [_valid(grad_out.shape[3], stride[1], padding[1], j * dilation[1], x.shape[3]) for j in range(kw)]
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            if r1 <= r0 or c1 <= c0:  # the tap only ever reads padding
                grad[:, :, i, j] = 0
                continue
            top, left = r0 * stride[0] - padding[0] + i * dilation[0], c0 * stride[1] - padding[1] + j * dilation[1]
            shifted = x[:, :, top:top + (r1 - r0 - 1) * stride[0] + 1:stride[0],
                        left:left + (c1 - c0 - 1) * stride[1] + 1:stride[1]]  # (B, C_in, h, w) read by tap (i, j)
            out_tokens = grad_out[:, :, r0:r1, c0:c1].permute(0, 2, 3, 1).reshape(-1, c_out)  # (B*h*w, C_out)
            grad[:, :, i, j] = out_tokens.t() @ shifted.permute(0, 2, 3, 1).reshape(-1, c_in)
    return grad


def _valid(n_out: int, stride: int, padding: int, offset: int, n_in: int) -> tuple[int, int]:
    """The output indices [lo, hi) whose input index ``o * stride - padding + offset`` is inside [0, n_in)."""
    return max(0, math.ceil((padding - offset) / stride)), min(n_out, (n_in - 1 + padding - offset) // stride + 1)
