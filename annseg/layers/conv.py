"""Convolution building blocks shared by the blocks and the network head.

The attention blocks work on *tokens*, (B, N, C) with N = H * W, because that is the layout
the attention kernel reads and writes. A 1x1 convolution on tokens is one matmul
(``F.linear``), which on the CPU is 2-3x faster than ``conv2d`` with a 1x1 kernel and needs
no re-ordered copy of a large input. The weights still live in ``nn.Conv2d`` /
``nn.BatchNorm2d`` modules, so state dicts have the usual conv-stack shapes and
``nn.SyncBatchNorm.convert_sync_batchnorm`` works unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from annseg.layers.pyramid import graph_captured


def to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, N, C), a view when ``x`` is contiguous (NCHW) or channels-last."""
    return x.flatten(2).transpose(1, 2)


def to_map(tokens: Tensor, height: int, width: int) -> Tensor:
    """(B, N, C) -> (B, C, H, W), a channels-last view: no copy."""
    return tokens.transpose(1, 2).unflatten(2, (height, width))


class Projection(nn.Module):
    """1x1 conv (+ BatchNorm + ReLU) on tokens: (B, N, C_in) -> (B, N, C_out)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        norm: bool = True,
        act: bool = True,
        bias: bool = True,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.act = nn.ReLU(inplace=True) if act else None
        if zero_init:  # the paper's W: the block starts as an identity path
            # With a norm, zero its affine instead: a zero conv under BatchNorm has zero batch
            # variance and its gradient would be scaled by 1/sqrt(eps).
            last = self.bn if self.bn is not None else self.conv
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        weight = self.conv.weight.flatten(1)  # (C_out, C_in)
        return self.finish(F.linear(tokens, weight, self.conv.bias))  # (B, N, C_out)

    def finish(self, out: Tensor) -> Tensor:
        """BatchNorm and ReLU on the conv's (B, N, C_out) output."""
        if self.bn is not None:
            # BatchNorm over channels: view tokens as a (B, C, N, 1) channels-last map (no copy).
            out = self.bn(out.unsqueeze(2).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).flatten(1, 2)
        if self.act is not None:
            out = self.act(out)
        return out

    def fold_norm(self) -> None:
        """Fold an eval-mode BatchNorm into the conv (``fuse_for_inference``): one matmul left."""
        if self.bn is None:
            return
        weight, bias = fold_batchnorm(self.conv.weight.flatten(1), self.conv.bias, self.bn)
        conv = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, 1).to(weight.device, weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight[:, :, None, None])
            conv.bias.copy_(bias)
        self.conv, self.bn = conv, None


def project_together(tokens: Tensor, *projections: Projection) -> list[Tensor]:
    """Several projections of the same tokens as one wider matmul, then each one's BN/ReLU.

    Reading a large (B, N, C_in) input once instead of once per projection: on the CPU a
    2048 -> 512 matmul takes ~0.9x the time of two 2048 -> 256 ones.
    """
    if len(projections) == 1:
        return [projections[0](tokens)]
    weight, bias = _stacked(projections)
    return _finish_each(projections, F.linear(tokens, weight, bias))


def project_and_sample(x: Tensor, projections: Sequence[Projection],
                       sample: nn.Module | None = None) -> tuple[list[Tensor], Tensor | None]:
    """The projections of ``x``'s tokens and ``sample(x)``, with one gradient buffer for ``x``.

    x (B, C, H, W) -> ([(B, N, C_out) per projection], (B, C, S) sampled, or None without
    ``sample``, a ``PyramidSampling``). APNB projects its keys from X and pools X for its values
    (AFNB likewise from the low-level map). Left to autograd, the two paths would each allocate
    an input-sized gradient and then add them; here the backward writes the projection's input
    gradient once, in ``x``'s own layout (no copy to match a contiguous input), and accumulates
    the sampling's transpose into it in place.
    """
    weight, bias = _stacked(projections)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) and not graph_captured(x):
        projected, sampled = _ProjectAndSample.apply(x, weight, bias, sample)
    else:
        projected, sampled = F.linear(to_tokens(x), weight, bias), None if sample is None else sample(x)
    return _finish_each(projections, projected), sampled


class _ProjectAndSample(torch.autograd.Function):
    """``(F.linear(to_tokens(x), weight, bias), sample(x))`` whose backward builds one grad of ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None,
                sample: nn.Module | None) -> tuple[Tensor, Tensor | None]:
        ctx.save_for_backward(x, weight)
        ctx.sample, ctx.has_bias = sample, bias is not None
        return F.linear(to_tokens(x), weight, bias), None if sample is None else sample(x)

    @staticmethod
    def backward(ctx, grad_projected: Tensor | None, grad_sampled: Tensor | None):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        B, C, H, W = x.shape
        if grad_projected is None:
            grad_projected = x.new_zeros(B, H * W, weight.shape[0])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = weight.to(grad_projected.dtype)
            if x.is_contiguous():  # (B, C, N) = W^T (C, C_out) @ (B, C_out, N): the gradient in x's layout
                grad_x = torch.bmm(weight.t().expand(B, -1, -1), grad_projected.transpose(1, 2)).view(B, C, H, W)
            else:  # (B, N, C): a channels-last map, as a channels-last x
                grad_x = to_map(torch.matmul(grad_projected, weight), H, W)
            if grad_sampled is not None:
                ctx.sample.accumulate_transpose(grad_sampled, grad_x)
        if ctx.needs_input_grad[1]:  # summed over the batch inside the product: no (B, C_out, C) intermediate
            grad_weight = torch.addbmm(grad_projected.new_zeros(()).expand(weight.shape), grad_projected.transpose(1, 2),
                                       to_tokens(x).to(grad_projected.dtype), beta=0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_projected.sum((0, 1))
        return grad_x, grad_weight, grad_bias, None


def _stacked(projections: Sequence[Projection]) -> tuple[Tensor, Tensor | None]:
    """The convs of ``projections`` as one (sum C_out, C_in) weight and bias (zeros where a conv has none)."""
    if len(projections) == 1:  # a view: no copy of the weight in the forward, none of its gradient in the backward
        return projections[0].conv.weight.flatten(1), projections[0].conv.bias
    weight = torch.cat([p.conv.weight.flatten(1) for p in projections])  # (sum C_out, C_in)
    biases = [p.conv.bias for p in projections]
    if all(b is None for b in biases):
        return weight, None
    return weight, torch.cat([b if b is not None else weight.new_zeros(p.conv.out_channels)
                              for b, p in zip(biases, projections)])


def _finish_each(projections: Sequence[Projection], out: Tensor) -> list[Tensor]:
    """Split a stacked projection's (B, N, sum C_out) output and apply each one's BN/ReLU."""
    if len(projections) == 1:
        return [projections[0].finish(out)]
    parts = out.split([p.conv.out_channels for p in projections], dim=-1)
    # A slice of the wide output is strided; BatchNorm wants it dense (a small copy).
    return [p.finish(part if p.bn is None else part.contiguous()) for p, part in zip(projections, parts)]


def fused_fusion(out: Projection, fuse: nn.Sequential, context: Tensor, tokens: Tensor, size: tuple[int, int]) -> Tensor:
    """``fuse(cat[W(O), X])`` computed without W(O) or the concatenated map, in training too.

    The fusion's 1x1 conv is linear, so with F = [F_o | F_x] split along its input channels,
    ``F cat[W O + b, X] + c = (F_o W) O + F_x X + (F_o b + c)``: the product F_o W is a small
    (C_out, Cv) matrix, and the (B, N, C_w) output of W and the (B, N, C_w + C_in) concatenation
    are never built nor kept for the backward. Exact up to floating-point re-association;
    gradients reach W and the fusion conv through the product. The rest of ``fuse`` (BatchNorm,
    ReLU, dropout) then runs on the (B, C_out, H, W) map. context (B, N, Cv), tokens (B, N, C_in).
    """
    conv = fuse[0]
    weight = conv.weight.flatten(1)  # (C_out, C_w + C_in)
    f_o, f_x = weight.split([out.conv.out_channels, weight.shape[1] - out.conv.out_channels], dim=1)
    context_weight = f_o @ out.conv.weight.flatten(1)  # (C_out, Cv)
    bias = conv.bias
    if out.conv.bias is not None:
        bias = f_o @ out.conv.bias if bias is None else torch.addmv(bias, f_o, out.conv.bias)
    mixed = F.linear(tokens, f_x, bias)  # (B, N, C_out)
    # Accumulate the context's share in place: no second (B, N, C_out) map.
    mixed = mixed.baddbmm_(context.to(mixed.dtype), context_weight.t().to(mixed.dtype).expand(mixed.shape[0], -1, -1))
    return fuse[1:](to_map(mixed, *size))


def can_fuse_fusion(out: Projection, fuse: nn.Sequential | None) -> bool:
    """Whether ``fused_fusion`` computes this W + fusion: a plain affine W (no BatchNorm after it) and a 1x1 fusion conv."""
    return (fuse is not None and out.bn is None and out.act is None and isinstance(fuse[0], nn.Conv2d)
            and fuse[0].kernel_size == (1, 1) and fuse[0].groups == 1)


def fold_batchnorm(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(C_out, C_in) weight and bias of ``bn(conv(x))`` as a single affine map, eval statistics."""
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    shift = bn.bias.double() - bn.running_mean.double() * scale
    bias = shift if bias is None else bias.double() * scale + shift
    return (weight.double() * scale[:, None]).to(weight.dtype), bias.to(weight.dtype)


class FoldedOutput(nn.Module):
    """W and the fusion (concat[W(O), X] -> 1x1 conv -> BN -> ReLU) folded into one affine map.

    Everything between the attention output O and the block's output is linear (eval mode),
    so ``fuse(cat[W O + b, X]) = (F_o W) O + F_x X + c``: the fusion conv never reads the
    C_out-channel W(O) and no concatenated map is built. For AFNB's 4096 -> 2048 fusion this
    removes N x 2048 x 2048 multiply-accumulates, half the fusion's cost.
    """

    def __init__(self, out: Projection, fuse: nn.Sequential) -> None:
        super().__init__()
        conv, bn = fuse[0], fuse[1]
        if conv.kernel_size != (1, 1) or not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"FoldedOutput folds a 1x1 conv + BatchNorm fusion, got {fuse}")
        out.fold_norm()  # AFNB's optional BN after W
        weight, bias = fold_batchnorm(conv.weight.flatten(1), conv.bias, bn)  # (C_out, C_w + C_in)
        w_out, b_out = out.conv.weight.flatten(1).double(), out.conv.bias
        f_o, f_x = weight.double().split([w_out.shape[0], weight.shape[1] - w_out.shape[0]], dim=1)
        if b_out is not None:
            bias = bias.double() + f_o @ b_out.double()
        self.context_weight = nn.Parameter((f_o @ w_out).to(weight.dtype))  # (C_out, Cv)
        self.input_weight = nn.Parameter(f_x.to(weight.dtype).contiguous())  # (C_out, C_in)
        self.bias = nn.Parameter(bias.to(weight.dtype))
        self.act = any(isinstance(m, nn.ReLU) for m in fuse)

    def forward(self, context: Tensor, tokens: Tensor) -> Tensor:
        """context (B, N, Cv), input tokens (B, N, C_in) -> (B, N, C_out)."""
        out = F.linear(context, self.context_weight, self.bias)
        weight = self.input_weight.t().to(out.dtype).expand(out.shape[0], -1, -1)
        out = out.baddbmm_(tokens.to(out.dtype), weight)  # accumulate in place: no second map
        return out.relu_() if self.act else out


class FoldedContext(nn.Module):
    """A block's eval-mode affine output (``FoldedOutput`` without ReLU) and the conv that reads it, as one.

    In ANN, AFNB's fusion ends in BatchNorm without ReLU, so in eval mode its output
    ``F_o O + F_x X + c`` is affine and the 3x3 context conv ``K`` reads it directly:
    ``K * (F_o O + F_x X + c) = (K F_x) * X + (K F_o) * O + K * c``. ``K F_x`` has the context
    conv's own shape, so AFNB's C_in -> C_out map over every position (for ResNet-50/101
    2048 -> 2048, about 29 of the head's 116 GMACs at 512x1024) and its output are never built;
    ``K F_o`` is a small conv on the Cv-channel attention output. ``K * c`` is not a constant:
    the zero padding sees c only inside the map, so it is a bias map made by convolving a map
    of ones with the per-tap vectors ``K_t c``. Exact up to rounding (weights composed in float64).
    """

    def __init__(self, output: FoldedOutput, conv: nn.Conv2d) -> None:
        super().__init__()
        if output.act or conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise TypeError(f"FoldedContext composes an affine FoldedOutput with a zero-padded, ungrouped conv, "
                            f"got act={output.act} and {conv}")
        kernel = conv.weight.double()  # (C_ctx, C_out, kh, kw)
        compose = lambda weight: torch.einsum("omhw,mi->oihw", kernel, weight.double())  # noqa: E731
        dtype = conv.weight.dtype
        # K F_x: the context conv's own shape, reading the block's input instead of its output.
        self.input_conv = nn.Conv2d(output.input_weight.shape[1], conv.out_channels, conv.kernel_size, conv.stride,
                                    conv.padding, conv.dilation, bias=False).to(conv.weight.device, dtype)
        with torch.no_grad():
            self.input_conv.weight.copy_(compose(output.input_weight))
        self.input_conv.to(memory_format=torch.channels_last)
        self.context_weight = nn.Parameter(compose(output.context_weight).to(dtype).contiguous(
            memory_format=torch.channels_last))  # (C_ctx, Cv, kh, kw)
        self.tap_bias = nn.Parameter(torch.einsum("omhw,m->ohw", kernel, output.bias.double())
                                     .unsqueeze(1).to(dtype))  # (C_ctx, 1, kh, kw): K_t c per tap
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def forward(self, context: Tensor, x: Tensor) -> Tensor:
        """context (B, N, Cv) at x's positions, x (B, C_in, H, W) -> (B, C_ctx, H', W')."""
        geometry = dict(stride=self.stride, padding=self.padding, dilation=self.dilation)
        out = self.input_conv(x)
        out = out.add_(F.conv2d(to_map(context, *x.shape[-2:]).to(out.dtype), self.context_weight.to(out.dtype),
                                **geometry))  # accumulate in place: no third map
        ones = x.new_ones(1, 1, *x.shape[-2:], dtype=out.dtype)  # where the padding sees c
        bias = None if self.bias is None else self.bias.to(out.dtype)
        return out.add_(F.conv2d(ones, self.tap_bias.to(out.dtype), bias, **geometry))


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 1,
    *,
    bias: bool = True,
    act: bool = True,
    dropout: float = 0.0,
) -> nn.Sequential:
    """Conv -> BatchNorm -> (ReLU) -> (Dropout2d) on (B, C, H, W) maps, 'same' padding."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias),
        nn.BatchNorm2d(out_channels),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    if dropout > 0:
        layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)
