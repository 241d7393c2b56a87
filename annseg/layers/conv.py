"""Convolution building blocks shared by the blocks and the network head.

The attention blocks work on *tokens*, (B, N, C) with N = H * W, because that is the layout
the attention kernel reads and writes. A 1x1 convolution on tokens is one matmul
(``F.linear``), which on the CPU is 2-3x faster than ``conv2d`` with a 1x1 kernel and needs
no re-ordered copy of a large input. The weights still live in ``nn.Conv2d`` /
``nn.BatchNorm2d`` modules, so state dicts have the usual conv-stack shapes and
``nn.SyncBatchNorm.convert_sync_batchnorm`` works unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


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
        out = F.linear(tokens, weight, self.conv.bias)  # (B, N, C_out)
        if self.bn is not None:
            # BatchNorm over channels: view tokens as a (B, C, N, 1) channels-last map (no copy).
            out = self.bn(out.unsqueeze(2).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).flatten(1, 2)
        if self.act is not None:
            out = self.act(out)
        return out


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
