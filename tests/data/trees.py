"""Write tiny dataset trees in each dataset's real layout, for tests anywhere in the suite.

Every writer takes ``masks``: item name -> raw mask ids (H, W), and writes a random RGB image of
the same size beside each mask; it returns the dataset root.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 8, 12


def stripes(values: Sequence[int], height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """A uint8 (H, W) mask whose column j holds ``values[j % len(values)]``."""
    row = np.resize(np.asarray(values, dtype=np.uint8), width)
    return np.tile(row, (height, 1))


def write_image(path: Path, height: int = HEIGHT, width: int = WIDTH) -> Path:
    """A random RGB image; JPEG or PNG by the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(path.name)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_mask(path: Path, ids: np.ndarray) -> Path:
    """An 8-bit single-channel ('L') PNG of raw ids."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(ids, dtype=np.uint8)).save(path)
    return path


def _write_tree(root: Path, masks: dict[str, np.ndarray], image: str, mask: str) -> Path:
    """Write each mask and an image of its size at ``root / image`` and ``root / mask``, where
    ``{name}`` in those templates is the item's name."""
    for name, ids in masks.items():
        write_image(root / image.format(name=name), *ids.shape)
        write_mask(root / mask.format(name=name), ids)
    return root


def write_cityscapes(
    root: Path, split: str = "train", masks: dict[str, np.ndarray] | None = None, kind: str = "labelIds"
) -> Path:
    """``leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png`` + ``gtFine/.../{stem}_gtFine_{kind}.png``;
    names are ``city/stem``; ``kind`` is "labelIds" or "labelTrainIds"."""
    masks = {"aachen/aachen_000000_000019": stripes([7, 26])} if masks is None else masks
    image, mask = f"leftImg8bit/{split}/{{name}}_leftImg8bit.png", f"gtFine/{split}/{{name}}_gtFine_{kind}.png"
    return _write_tree(root, masks, image, mask)


def write_ade20k(root: Path, folder: str = "training", masks: dict[str, np.ndarray] | None = None) -> Path:
    """ADEChallengeData2016: ``images/{folder}/{name}.jpg`` + ``annotations/{folder}/{name}.png``."""
    masks = {"ADE_train_00000001": stripes([0, 1, 150])} if masks is None else masks
    return _write_tree(root, masks, f"images/{folder}/{{name}}.jpg", f"annotations/{folder}/{{name}}.png")


def write_pascal_context(root: Path, split: str = "train", masks: dict[str, np.ndarray] | None = None) -> Path:
    """``JPEGImages/{name}.jpg`` + ``SegmentationClassContext/{name}.png`` and the split's stem list."""
    masks = {"2008_000002": stripes([0, 1, 59])} if masks is None else masks
    split_file = root / "ImageSets" / "SegmentationContext" / f"{split}.txt"
    split_file.parent.mkdir(parents=True, exist_ok=True)
    split_file.write_text("".join(f"{name}\n" for name in masks))
    return _write_tree(root, masks, "JPEGImages/{name}.jpg", "SegmentationClassContext/{name}.png")


def write_folder(
    root: Path,
    split: str = "train",
    masks: dict[str, np.ndarray] | None = None,
    classes: str = "background\ncat 255 0 0\n",
    suffix: str = ".png",
) -> Path:
    """``images/{split}/{name}{suffix}`` + ``masks/{split}/{name}.png`` and ``classes.txt``."""
    masks = {"a": stripes([0, 1, 255])} if masks is None else masks
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(classes)
    return _write_tree(root, masks, f"images/{split}/{{name}}{suffix}", f"masks/{split}/{{name}}.png")
