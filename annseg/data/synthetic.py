"""The built-in dataset: generated scenes whose labels need long-range context.

Each scene has one *beacon* near the left edge, red or blue, and a few grey objects near the
right edge that all look alike. The objects are ``object_red`` when the beacon is red and
``object_blue`` when it is blue, so a pixel's class depends on a cue 20-90 pixels away: far
beyond what a small dilated ResNet's effective receptive field reaches, in easy reach of a
non-local block's global anchors. The FCN baseline can only guess between the two object
classes; ANN can read the beacon. Horizontal flips keep that relation, so the usual
augmentation applies.

Everything is drawn from ``numpy.random.default_rng((seed, split, index))``: item ``i`` of a
split is the same image on every machine and in every worker, and needs no files.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

SPLITS: dict[str, int] = {"train": 2000, "val": 200, "test": 200}


class Synthetic(Dataset):
    """Generated (image, mask) pairs; see the module docstring for what makes them hard.

    ``size`` is (height, width); the width must be at least 1.5x the height so that beacon and
    objects sit in separate bands. ``length`` overrides the split's default number of items.
    """

    classes: tuple[str, ...] = ("background", "beacon", "object_red", "object_blue")
    palette: tuple[tuple[int, int, int], ...] = ((40, 40, 40), (255, 200, 0), (220, 40, 40), (40, 90, 230))
    ignore_index: int = 255

    def __init__(
        self,
        split: str = "train",
        *,
        size: tuple[int, int] = (64, 96),
        length: int | None = None,
        seed: int = 0,
        transforms: Callable | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} of the built-in dataset; choose from {list(SPLITS)}")
        check_size(size)
        height, width = size
        if length is not None and length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        self.split, self.size, self.seed = split, (height, width), seed
        self.length = SPLITS[split] if length is None else length
        self.transforms = transforms

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        image, mask = self.generate(index)
        image = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(mask).long())
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return {"image": image, "mask": mask, "name": f"{self.split}_{index:05d}"}

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``index`` as an RGB uint8 (H, W, 3) image and a uint8 (H, W) mask of class ids."""
        rng = np.random.default_rng((self.seed, list(SPLITS).index(self.split), index))
        height, width = self.size
        yy, xx = np.mgrid[:height, :width]
        # Background: a random grey level with pixel noise, the same in every scene type.
        image = rng.normal(rng.uniform(70, 150), 14, (height, width, 3))
        mask = np.zeros((height, width), np.uint8)

        red = bool(rng.integers(2))
        side = int(rng.integers(height // 6, height // 4 + 1))
        top, left = int(rng.integers(2, height - side - 2)), int(rng.integers(2, width // 6))
        beacon = (yy >= top) & (yy < top + side) & (xx >= left) & (xx < left + side)
        colour = (rng.uniform(170, 240), rng.uniform(20, 70), rng.uniform(20, 70))
        image[beacon] = colour if red else colour[::-1]
        mask[beacon] = 1

        for _ in range(int(rng.integers(2, 5))):
            radius = rng.uniform(height / 14, height / 8)
            cy = rng.uniform(radius, height - radius)
            cx = rng.uniform(width * 0.55 + radius, width - radius)
            if rng.integers(2):
                shape = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
            else:
                shape = (np.abs(yy - cy) <= radius) & (np.abs(xx - cx) <= radius)
            image[shape] = rng.uniform(200, 240) + rng.normal(0, 6, (int(shape.sum()), 3))
            mask[shape] = 2 if red else 3
        return np.clip(image, 0, 255).astype(np.uint8), mask


def check_size(size: tuple[int, int]) -> None:
    """The layout needs room: beacon and objects side by side (also checked when a config loads)."""
    height, width = size
    if height < 32 or width < 1.5 * height:
        raise ValueError(f"size {list(size)} is too small: need height >= 32 and width >= 1.5 x height")
