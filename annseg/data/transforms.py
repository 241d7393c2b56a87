"""Augmentation and normalisation for (image, mask) pairs, on torchvision transforms v2.

Images stay uint8 through the geometric steps (cheap, exact for masks: v2 resizes a
``tv_tensors.Mask`` with nearest neighbours and pads it with the ignore label), then become
normalised float32 at the end. Masks come out int64 with ``ignore_index`` where padded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """What the network expects as input: RGB in [0, 1], minus ``mean``, over ``std``."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def transform(self) -> v2.Transform:
        """uint8 image -> normalised float32 image; masks -> int64, untouched otherwise."""
        return v2.Compose([
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
            v2.Normalize(mean=list(self.mean), std=list(self.std)),
        ])


class RandomScale(v2.Transform):
    """Resize by a random factor in ``scale`` with the aspect ratio jittered in ``aspect``.

    The paper's augmentation (scale 0.5-2.0, aspect 0.9-1.1); v2's RandomResize only draws
    one side length, so it cannot express the aspect jitter.
    """

    def __init__(self, scale: tuple[float, float] = (0.5, 2.0), aspect: tuple[float, float] = (0.9, 1.1)) -> None:
        super().__init__()
        for name, (low, high) in (("scale", scale), ("aspect", aspect)):
            if not 0 < low <= high:
                raise ValueError(f"{name} range must satisfy 0 < low <= high, got {(low, high)}")
        self.scale, self.aspect = scale, aspect

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        scale = float(torch.empty(()).uniform_(*self.scale))
        aspect = float(torch.empty(()).uniform_(*self.aspect))
        return {"size": [max(1, round(height * scale / math.sqrt(aspect))), max(1, round(width * scale * math.sqrt(aspect)))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.resize, inpt, params["size"], antialias=True)


def train_transforms(
    crop_size: Sequence[int],
    *,
    scale: tuple[float, float] = (0.5, 2.0),
    aspect: tuple[float, float] = (0.9, 1.1),
    flip: bool = True,
    brightness: float = 0.1,
    normalization: Normalization = Normalization(),
    ignore_index: int = 255,
) -> v2.Transform:
    """Random scale -> random crop padded to ``crop_size`` (image 0, mask ignore) -> flip -> brightness -> normalise."""
    steps: list[v2.Transform] = []
    if scale != (1.0, 1.0) or aspect != (1.0, 1.0):
        steps.append(RandomScale(scale, aspect))
    steps.append(v2.RandomCrop(list(crop_size), pad_if_needed=True, fill={tv_tensors.Mask: ignore_index, "others": 0}))
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if brightness > 0:
        steps.append(v2.ColorJitter(brightness=brightness))
    steps.append(normalization.transform())
    return v2.Compose(steps)


def eval_transforms(normalization: Normalization = Normalization()) -> v2.Transform:
    """Whole images at their own size: only normalisation (inference handles scales and windows)."""
    return normalization.transform()
