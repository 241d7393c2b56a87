"""Where a pixel attends: the attention weights of APNB or AFNB for query points of an image.

The weights come from the block's own forward (an ``AttentionProbe`` set on the block for one
pass), so they are exactly what the network used. Image pixels and feature positions are
related by the *stride rule*: image row ``y`` (of ``H`` rows) lies in feature row
``floor(y * H_f / H)`` of an ``H_f``-row map, and the same for columns. At stride 8 with
``H = 8 H_f`` this is ``y // 8``: feature row ``i`` stands for image rows ``8i .. 8i + 7``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torchvision import tv_tensors

from annseg.data.transforms import Normalization
from annseg.layers import AFNB, APNB, AttentionProbe
from annseg.layers.pyramid import PyramidSampling, bin_mask

BLOCKS = ("apnb", "afnb")
Point = tuple[float, float]


def feature_index(coordinate: float | np.ndarray, image_length: int, feature_length: int) -> int | np.ndarray:
    """The feature row (or column) that holds image row (or column) ``coordinate``: the stride rule
    ``floor(coordinate * feature_length / image_length)``, exact for integers."""
    if isinstance(coordinate, np.ndarray):
        return (coordinate.astype(np.int64) * feature_length) // image_length
    if isinstance(coordinate, numbers.Integral):
        return int(coordinate) * feature_length // image_length
    return min(math.floor(coordinate * feature_length / image_length), feature_length - 1)


@dataclass(frozen=True)
class AttentionMaps:
    """The attention of P query points over a block's S pyramid anchors, and how to draw it.

    ``weights`` (P, S) float32: row p is the softmax over the anchors for ``points[p]``, anchors
    ordered level by level (``sizes``), each level's s x s cells row-major. ``feature``: (H, W) of
    the map the anchors are pooled from (APNB: the context map; AFNB: the low-level map);
    ``query_feature``: (H, W) of the map the queries come from; ``positions``: each point's
    (row, col) there, by the stride rule; ``image``: (H, W) of the image; ``points``: (x, y).
    """

    block: str
    weights: np.ndarray
    sizes: tuple[int, ...]
    feature: tuple[int, int]
    query_feature: tuple[int, int]
    image: tuple[int, int]
    points: tuple[Point, ...]
    positions: tuple[tuple[int, int], ...]

    @property
    def stride(self) -> tuple[float, float]:
        """Image pixels per anchor-map position, (rows, columns): 8.0 for a stride-8 network."""
        return self.image[0] / self.feature[0], self.image[1] / self.feature[1]

    def levels(self) -> list[tuple[int, np.ndarray]]:
        """(s, (P, s, s) weights) for each pyramid size s, in ``sizes`` order."""
        result, start = [], 0
        for s in self.sizes:
            result.append((s, self.weights[:, start: start + s * s].reshape(-1, s, s)))
            start += s * s
        return result

    def cell_masks(self, size: int) -> np.ndarray:
        """(s * s, H, W) bool: the image pixels each cell of pyramid level ``size`` averages.

        A cell's adaptive-pooling bin (its feature rows x columns) mapped to the image by the
        stride rule. Where ``size`` does not divide the map, neighbouring bins share feature rows
        or columns, and so their masks overlap: exactly as the pooling averages.
        """
        if size not in self.sizes:
            raise ValueError(f"no pyramid level {size}; this block's sizes are {list(self.sizes)}")
        (height, width), (feature_h, feature_w) = self.image, self.feature
        rows = bin_mask(feature_h, size)[:, feature_index(np.arange(height), height, feature_h)]  # (s, H)
        cols = bin_mask(feature_w, size)[:, feature_index(np.arange(width), width, feature_w)]  # (s, W)
        return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(size * size, height, width)


def check_points(points: Sequence[Sequence[float]], height: int, width: int) -> tuple[Point, ...]:
    """``points`` as (x, y) tuples, each inside a ``width`` x ``height`` image; else a ValueError naming it."""
    if isinstance(points, (str, bytes)) or not isinstance(points, Sequence) or not points:
        raise ValueError(f"points={points!r}; expected a non-empty list of (x, y) image pixels")
    checked = []
    for point in points:
        if (not isinstance(point, Sequence) or len(point) != 2
                or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                           for v in point)):
            raise ValueError(f"point {point!r} is not two numbers (x, y)")
        x, y = point
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"point ({x}, {y}) is outside the {width}x{height} image; x must be in [0, {width}), "
                             f"y in [0, {height})")
        checked.append((int(x) if isinstance(x, numbers.Integral) else float(x),
                        int(y) if isinstance(y, numbers.Integral) else float(y)))
    return tuple(checked)


def block_of(network: nn.Module, block: str) -> APNB | AFNB:
    """The network's APNB or AFNB with pyramid anchors; a ValueError naming what is missing."""
    if block not in BLOCKS:
        raise ValueError(f"unknown block {block!r}; choose from {list(BLOCKS)}")
    module = getattr(network, block, None)
    pooled = isinstance(getattr(module, "sample", None), PyramidSampling)
    if not isinstance(module, (APNB, AFNB)) or not pooled:
        variant = getattr(network, "variant", type(network).__name__)
        raise ValueError(f"this model (variant {variant!r}) has no {block.upper()} with pyramid anchors; choose a "
                         "block it has (variant 'ann' has both, 'apnb' and 'afnb' one each)")
    return module


def attention_maps(network: nn.Module, rgb: Tensor, normalization: Normalization,
                   points: Sequence[Sequence[float]], block: str = "apnb") -> AttentionMaps:
    """The attention of ``block`` for ``points`` (x, y image pixels) of ``rgb`` (3, H, W), uint8 or
    float in [0, 1], from one forward of ``network`` (eval mode) at the image's own size."""
    module = block_of(network, block)
    height, width = rgb.shape[-2:]
    points = check_points(points, height, width)
    positions: list[tuple[int, int]] = []

    def rows(query_h: int, query_w: int) -> Tensor:
        positions[:] = [(feature_index(y, height, query_h), feature_index(x, width, query_w)) for x, y in points]
        return torch.tensor([r * query_w + c for r, c in positions], dtype=torch.long)

    device = next(network.parameters()).device
    image = normalization.transform()(tv_tensors.Image(rgb[None])).as_subclass(Tensor).to(device)
    probe = module.probe = AttentionProbe(rows)
    try:
        with torch.no_grad():
            network(image)
    finally:
        module.probe = None
    assert probe.weights is not None and probe.query_size is not None and probe.anchor_size is not None
    return AttentionMaps(block=block, weights=probe.weights[0].float().cpu().numpy(), sizes=module.sample.sizes,
                         feature=probe.anchor_size, query_feature=probe.query_size, image=(height, width),
                         points=points, positions=tuple(positions))
