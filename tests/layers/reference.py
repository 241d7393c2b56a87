"""Plain re-statements of the paper's blocks (docs/method.md), written with conv2d and adaptive pooling.

They compute everything the obvious way (values projected at all N positions, then pooled;
bmm + softmax attention) so that the optimised blocks can be checked against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from annseg.layers.conv import Projection


def randomize(module: nn.Module) -> nn.Module:
    """Non-trivial weights and BatchNorm statistics everywhere (zero-initialised W included)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return module


def project(p: Projection, x: Tensor) -> Tensor:
    """A Projection applied to a (B, C, H, W) map as conv2d -> batch_norm (eval) -> relu."""
    y = F.conv2d(x, p.conv.weight, p.conv.bias)
    if p.bn is not None:
        bn = p.bn
        y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return y.relu() if p.act is not None else y


def sample(x: Tensor, sizes: tuple[int, ...] | None) -> Tensor:
    """(B, C, H, W) -> (B, C, S)."""
    if sizes is None:
        return x.flatten(2)
    return torch.cat([F.adaptive_avg_pool2d(x, s).flatten(2) for s in sizes], dim=2)


def attend(query: Tensor, key: Tensor, value: Tensor, sizes) -> Tensor:
    """query (B, Ck, H, W), key/value maps -> (B, Cv, H, W) with scaled softmax over anchors."""
    B, Ck, H, W = query.shape
    k, v = sample(key, sizes), sample(value, sizes)  # (B, Ck, S), (B, Cv, S)
    sim = torch.softmax(query.flatten(2).transpose(1, 2) @ k * Ck**-0.5, dim=-1)  # (B, N, S)
    return (sim @ v.transpose(1, 2)).transpose(1, 2).reshape(B, -1, H, W)


def apnb(block, x: Tensor, sizes) -> Tensor:
    key = project(block.key, x)
    query = key if block.query is None else project(block.query, x)
    out = project(block.out, attend(query, key, project(block.value, x), sizes))
    return out if block.fuse is None else block.fuse(torch.cat([out, x], 1))


def afnb(block, low: Tensor, high: Tensor, sizes) -> Tensor:
    context = attend(project(block.query, high), project(block.key, low), project(block.value, low), sizes)
    out = project(block.out, context)
    return out if block.fuse is None else block.fuse(torch.cat([out, high], 1))
