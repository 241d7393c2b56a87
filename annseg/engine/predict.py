"""Label maps for image files, written as palette PNGs, colour overlays or Cityscapes label ids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision import tv_tensors

from annseg.data.transforms import Normalization
from annseg.engine.config import EvalConfig
from annseg.engine.inference import infer_with

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in the folders named."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise FileNotFoundError(f"folder {item} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            found += files
        elif item.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    return found


def predict_labels(
    model: nn.Module,
    image: Tensor,
    num_classes: int,
    normalization: Normalization,
    settings: EvalConfig,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Label map (H, W) int64 for an RGB ``image`` (3, H, W), uint8 or float in [0, 1], on the CPU."""
    return view_sum(model, image.unsqueeze(0), num_classes, normalization, settings, device).argmax(1)[0].cpu()


def view_sum(
    model: nn.Module,
    images: Tensor,
    num_classes: int,
    normalization: Normalization,
    settings: EvalConfig,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Logits (B, K, H, W) float32 on ``device`` for RGB ``images`` (B, 3, H, W), uint8 or float in [0, 1],
    summed over the test-time views (scales x flips) of ``settings``: their argmax is the label map
    (the authors' protocol). Divide by ``view_count(settings)`` for their mean."""
    normalized = normalization.transform()(tv_tensors.Image(images)).as_subclass(Tensor).to(device)
    return infer_with(model, normalized, num_classes, settings)


def view_count(settings: EvalConfig) -> int:
    """How many views ``infer`` sums: one per scale, twice with flip."""
    return len(settings.scales) * (2 if settings.flip else 1)


def palette_png(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """A paletted PNG: pixel values are class ids, viewers show the class colours."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [value for colour in palette for value in colour]
    image.putpalette(flat + [0] * (768 - len(flat)))
    return image


def overlay(image: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5) -> Image.Image:
    """``image`` (H, W, 3) uint8 blended with the class colours of ``labels`` (H, W)."""
    colours = np.asarray(palette, dtype=np.float32)[labels]
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def comparison_sheet(
    image: np.ndarray, truth: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]]
) -> Image.Image:
    """image | ground truth | prediction side by side; ignored truth pixels are black."""
    colours = np.concatenate([np.asarray(palette, np.uint8), np.zeros((256 - len(palette), 3), np.uint8)])
    return Image.fromarray(np.concatenate([image, colours[truth], colours[labels]], axis=1))
