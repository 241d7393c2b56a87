"""The checks every baseline module's tests share: equal to a re-statement, trainable at 13x21."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def assert_equals_restatement(block: nn.Module, x: Tensor, plain: Callable[[nn.Module, Tensor], Tensor],
                              out_channels: int) -> Tensor:
    """``block(x)`` has ``out_channels`` channels at x's size and equals ``plain(block, x)`` (float64)."""
    with torch.no_grad():
        out = block(x)
    assert out.shape == (x.shape[0], out_channels, *x.shape[2:])
    torch.testing.assert_close(out, plain(block, x), rtol=1e-10, atol=1e-10)
    return out


def assert_trains_at_odd_size(block: nn.Module, in_channels: int) -> None:
    """Train-mode forward + backward on a (2, C, 13, 21) map: finite gradients everywhere."""
    x = torch.randn(2, in_channels, 13, 21, requires_grad=True)
    block.train()(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())
