"""Label maps for image files: where each output goes (checked before writing), inference, palette PNGs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision import tv_tensors

from annseg.data.base import dangling_link_error, find_files
from annseg.data.transforms import Normalization
from annseg.engine.config import EvalConfig
from annseg.engine.inference import infer_with

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def folder_images(folder: Path) -> list[Path]:
    """The image files below ``folder``, recursively, sorted, through the datasets' walk
    (``annseg.data.base.find_files``): linked sub-folders are read, a loop is named and skipped,
    and a dangling image link is an error naming it (an image asked for cannot be left out).
    """
    files, dangling = find_files(folder, IMAGE_SUFFIXES)
    if dangling:
        raise dangling_link_error(dangling[0], "image")
    return files


def find_images(inputs: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """(image file, its path relative to the output folder) for the files named and those found in
    the folders named.

    Outputs mirror the inputs' tree: one folder's images keep their paths relative to it; any
    other inputs keep theirs relative to the deepest folder holding them all (for files of one
    folder: that folder; for ``a/x.png b/x.png x.jpg``: ``a/x``, ``b/x``, ``x``). A file named twice
    (directly or through a folder) is read once.
    """
    items = [Path(item) for item in inputs]
    for item in items:
        if not item.exists():
            raise FileNotFoundError(f"input {item} does not exist")
    if len(items) == 1 and items[0].is_dir():
        base = Path(os.path.abspath(items[0]))
    else:
        base = Path(os.path.commonpath([Path(os.path.abspath(item)).parent for item in items]))
    found: list[tuple[Path, Path]] = []
    seen: set[str] = set()
    for item in items:
        if item.is_dir():
            files = folder_images(item)
            if not files:
                raise FileNotFoundError(f"folder {item} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        else:
            files = [item]
        for file in files:
            if (real := os.path.realpath(file)) not in seen:
                seen.add(real)
                found.append((file, Path(os.path.abspath(file)).relative_to(base)))
    return found


@dataclass(frozen=True)
class PlannedImage:
    """One input image and every file predict writes for it."""

    source: Path
    labels: Path
    overlay: Path | None


def plan_outputs(inputs: Sequence[str | Path], out: Path, overlays: bool) -> list[PlannedImage]:
    """Where each image's label PNG (``<out>/<relative path>.png``) and overlay
    (``<out>/<relative path>_overlay.png``) go, checked before anything is written.

    Raises ValueError naming both inputs when two of them would write the same file (``x.png``
    and ``x.jpg`` of one folder; ``x_overlay.png`` beside ``x.png``), or naming the input a file
    would overwrite (an ``--out`` inside the inputs).
    """
    plan: list[PlannedImage] = []
    writers: dict[str, Path] = {}
    images = find_images(inputs)
    sources = {os.path.realpath(file): file for file, _ in images}
    for file, relative in images:
        stem = relative.parent / relative.stem
        item = PlannedImage(file, out / f"{stem}.png", out / f"{stem}_overlay.png" if overlays else None)
        for target in filter(None, (item.labels, item.overlay)):
            real = os.path.realpath(target)
            if real in writers:
                raise ValueError(f"inputs {writers[real]} and {file} would both write {target}; rename one, or "
                                 "predict them in separate runs with different --out folders")
            if real in sources:
                raise ValueError(f"predicting {file} would overwrite the input {sources[real]} with {target}; "
                                 "choose an --out folder outside the inputs")
            writers[real] = file
        plan.append(item)
    return plan


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
