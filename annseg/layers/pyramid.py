"""Pyramid sampling: summarise a feature map by S "anchors" (the paper's key idea).

Adaptive average pooling to each size in ``sizes`` (default 1, 3, 6, 8), flattened and
concatenated: S = sum(s * s) = 110 anchors instead of N = H * W positions.

Pooling is separable (average over rows, then over columns), so all pyramid levels are
computed with one matmul over the input plus tiny per-level matmuls. That reads a large
(B, 2048, H, W) map once instead of once per level (about 2.5x faster on the CPU than four
``adaptive_avg_pool2d`` calls) and gives exactly adaptive average pooling's bins, including
when H or W is smaller than a pooling size.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn


@lru_cache(maxsize=64)
def _bins(length: int, sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """(sum(sizes), length) averaging matrix with adaptive_avg_pool's bins, levels stacked.

    Built outside inference mode: a cached inference tensor could not be saved for backward
    by a later training forward (Lightning validates under ``inference_mode``). Built in
    float64 and rounded once, so every dtype gets the nearest value of 1 / bin length.
    """
    with torch.inference_mode(False):
        return _averaging_matrix(length, sizes, device, torch.float64).to(dtype)


def _averaging_matrix(length: int | torch.SymInt, sizes: tuple[int, ...], device: torch.device,
                      dtype: torch.dtype) -> Tensor:
    """The averaging matrix from tensor operations only, so ``length`` may be symbolic.

    Under ``torch.export`` (ONNX) or ``torch.compile`` with dynamic shapes the graph then
    computes the bins from the input's size at run time instead of baking in the traced size.
    Bin i of s covers [floor(i L / s), ceil((i + 1) L / s)), as adaptive average pooling.
    """
    level = torch.tensor([s for s in sizes for _ in range(s)], device=device)  # (T,)
    index = torch.tensor([i for s in sizes for i in range(s)], device=device)  # (T,)
    start = (index * length).div(level, rounding_mode="floor")[:, None]  # (T, 1)
    end = ((index + 1) * length + level - 1).div(level, rounding_mode="floor")[:, None]
    position = torch.arange(length, device=device)  # (L,)
    inside = (position >= start) & (position < end)  # (T, L)
    return inside.to(dtype) / (end - start).to(dtype)


def graph_captured(x: Tensor) -> bool:
    """Whether ``x`` flows through graph capture (``torch.compile``, or ``torch.export`` with
    symbolic sizes), where code must be traceable rather than use eager-only shortcuts."""
    return torch.compiler.is_compiling() or not all(isinstance(n, int) for n in x.shape)


def bin_mask(length: int, size: int) -> np.ndarray:
    """(size, length) bool: which of ``length`` positions each of ``size`` adaptive-pooling bins averages."""
    return (_averaging_matrix(length, (size,), torch.device("cpu"), torch.float64) > 0).numpy()


def validate_sizes(sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Return ``sizes`` as a tuple of positive ints, or raise a ValueError that says why not."""
    sizes = tuple(sizes)
    if not sizes or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ValueError(f"pooling sizes must be a non-empty sequence of positive ints, got {sizes!r}")
    return sizes


class PyramidSampling(nn.Module):
    """(B, C, H, W) -> (B, C, S) anchors, S = sum(s * s for s in sizes)."""

    def __init__(self, sizes: tuple[int, ...] = (1, 3, 6, 8)) -> None:
        super().__init__()
        self.sizes = validate_sizes(sizes)

    @property
    def num_anchors(self) -> int:
        """S, the number of anchors produced per feature map."""
        return sum(s * s for s in self.sizes)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        # Eager calls use the cache; graph capture (torch.compile, torch.export for ONNX) must
        # see the bins computed from the input's size, else a dynamic size is baked in.
        bins = _averaging_matrix if graph_captured(x) else _bins
        rows = bins(H, self.sizes, x.device, x.dtype)  # (T, H), T = sum(sizes)
        cols = bins(W, self.sizes, x.device, x.dtype)  # (T, W)
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # A projected key arrives as a channels-last view of (B, N, C) tokens: pool the
            # (B, H, W, C) layout, C contiguous. torch.matmul on the NCHW view below would fall
            # back to one tiny product per row: seconds instead of milliseconds at 96x96.
            pooled_w = torch.matmul(cols, x.permute(0, 2, 3, 1))  # (B, H, T, C): column bins
            pooled = torch.matmul(rows, pooled_w.flatten(2)).unflatten(2, (-1, C))  # (B, T, T, C)
            pooled = pooled.permute(0, 3, 1, 2)  # (B, C, T, T)
        else:
            pooled_w = torch.matmul(x, cols.t())  # (B, C, H, T): every level's column bins, one pass
            pooled = torch.matmul(rows, pooled_w)  # (B, C, T, T)
        # pooled[..., i, j]: row bin i of one level against column bin j of any level; the
        # diagonal blocks (same level) are the pooled cells. Small: T * T values per channel.
        anchors, start = [], 0
        for s in self.sizes:
            level = pooled[..., start : start + s, start : start + s]  # (B, C, s_h, s_w)
            anchors.append(level.reshape(B, C, s * s))  # row-major, as flatten
            start += s
        return torch.cat(anchors, dim=2)

    def accumulate_transpose(self, grad: Tensor, into: Tensor) -> None:
        """Add the gradient of ``forward``'s input for ``grad`` (B, C, S) to the map ``into``, in place.

        ``into`` is (B, C, H, W), contiguous or channels-last. This is the backward of the pooling
        written as matmuls: every level's cell gradients are laid out on the (T, T) grid of
        ``forward`` (zero off the levels' diagonal blocks), spread over the columns (a small
        (B, C, T, W) map) and then over the rows, accumulated straight into ``into``
        (``baddbmm_``) so that no input-sized temporary is allocated.
        """
        B, C, H, W = into.shape
        rows = _bins(H, self.sizes, into.device, into.dtype)  # (T, H)
        cols = _bins(W, self.sizes, into.device, into.dtype)  # (T, W)
        T = rows.shape[0]
        grid = grad.new_zeros(B, C, T, T, dtype=into.dtype)
        start, offset = 0, 0
        for s in self.sizes:
            grid[..., start : start + s, start : start + s] = grad[..., offset : offset + s * s].unflatten(-1, (s, s))
            start, offset = start + s, offset + s * s
        spread = torch.matmul(grid, cols)  # (B, C, T, W): each row bin's gradient over the columns, small
        if into.is_contiguous():  # (B C, H, W) += rows^T (H, T) @ (B C, T, W)
            into.view(B * C, H, W).baddbmm_(rows.t().expand(B * C, -1, -1), spread.view(B * C, T, W))
        else:  # channels-last: (B, H, W C) += rows^T (H, T) @ (B, T, W C)
            spread = spread.permute(0, 2, 3, 1).reshape(B, T, W * C)
            into.permute(0, 2, 3, 1).view(B, H, W * C).baddbmm_(rows.t().expand(B, -1, -1), spread)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, anchors={self.num_anchors}"
