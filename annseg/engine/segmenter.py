"""A trained network ready to label images: ``annseg.load(path).predict(image)``.

The network alone expects normalised tensors and knows nothing of class names or test-time
settings; a checkpoint carries both. ``Segmenter`` keeps them together, so a user of the
library loads one object and calls ``predict`` on a Pillow image or a numpy array.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from annseg.data.base import array_as_rgb, as_rgb
from annseg.data.transforms import Normalization
from annseg.engine.checkpoint import load_model
from annseg.engine.config import EvalConfig
from annseg.engine.predict import palette_png, predict_labels


class Segmenter(nn.Module):
    """A network in eval mode with its ``classes``, ``palette``, ``normalization`` and eval ``settings``.

    ``forward(images)`` is one pass of the network: normalised (B, 3, H, W) -> logits
    (B, K, H, W), the function ``annseg export onnx`` exports. ``predict(image)`` labels one
    image with the test-time ``settings`` (whole / sliding window, scales, flip) of the
    checkpoint's ``eval`` config; replace ``settings`` (a dataclass) to change them.
    ``.to(device)`` moves the network; ``predict`` runs where it lives.
    """

    def __init__(self, network: nn.Module, classes: Sequence[str], palette: Sequence[Sequence[int]],
                 normalization: Normalization, settings: EvalConfig | None = None) -> None:
        super().__init__()
        if len(palette) < len(classes):
            raise ValueError(f"palette has {len(palette)} colours for {len(classes)} classes; give one per class")
        self.network = network.eval()
        self.classes = list(classes)
        self.palette = [tuple(int(v) for v in colour) for colour in palette]
        self.normalization = normalization
        self.settings = settings if settings is not None else EvalConfig()
        self.eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, settings: EvalConfig | None = None) -> Segmenter:
        """The model of an annseg checkpoint (from ``annseg train`` or ``save_model``), on the CPU.

        ``settings`` default to the checkpoint's ``config.eval``.
        """
        return cls.from_meta(*load_model(path), settings=settings)

    @classmethod
    def from_meta(cls, network: nn.Module, meta: dict[str, Any], settings: EvalConfig | None = None) -> Segmenter:
        """``network`` with the metadata ``load_model`` returns beside it; ``settings``: its config's eval."""
        normalization = Normalization(tuple(meta["normalization"]["mean"]), tuple(meta["normalization"]["std"]))
        return cls(network, meta["classes"], meta["palette"], normalization,
                   meta["config"].eval if settings is None else settings)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def metadata(self) -> dict[str, Any]:
        """What a runtime needs besides the graph: class names, palette, input normalisation."""
        return {"classes": self.classes, "palette": [list(c) for c in self.palette],
                "normalization": {"mean": list(self.normalization.mean), "std": list(self.normalization.std)}}

    def forward(self, images: Tensor) -> Tensor:
        """Logits (B, K, H, W) for normalised images (B, 3, H, W): RGB in [0, 1], minus mean, over std."""
        return self.network(images)

    def predict(self, image: Image.Image | np.ndarray | Tensor) -> np.ndarray:
        """Label map (H, W) int64 of class indices (into ``classes``) for one image.

        ``image``: a Pillow image of any mode (gray, palette, RGBA, 16-bit), a numpy array
        (H, W) gray / (H, W, 3) RGB / (H, W, 4) RGBA of uint8, uint16 or float in [0, 1], or a
        (3, H, W) uint8 tensor as ``annseg.data.read_image`` returns. Raises TypeError for
        another type or dtype and ValueError for another shape or out-of-range floats.
        """
        if isinstance(image, Image.Image):
            rgb = as_rgb(image)
        elif isinstance(image, np.ndarray):
            rgb = array_as_rgb(image)
        elif isinstance(image, Tensor):
            if image.dtype != torch.uint8:
                raise TypeError(f"image tensor has dtype {image.dtype}; expected a (3, H, W) uint8 RGB tensor "
                                "(or pass a numpy array: floats in [0, 1] are accepted there)")
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"image tensor has shape {tuple(image.shape)}; expected (3, H, W) RGB")
            rgb = image
        else:
            raise TypeError(f"cannot predict on a {type(image).__name__}; expected a Pillow image, a numpy array "
                            "or a (3, H, W) uint8 tensor")
        labels = predict_labels(self.network, rgb, self.num_classes, self.normalization, self.settings, self.device)
        return labels.numpy()

    def colorize(self, labels: np.ndarray) -> Image.Image:
        """A paletted image of a label map: pixel values are class ids, shown in the class colours."""
        return palette_png(labels, self.palette)


def load(path: str | Path) -> Segmenter:
    """``annseg.load(path)``: the ready model of an annseg checkpoint (eval mode, CPU).

    ``model.predict(image)`` labels an image, ``model.classes`` names the labels;
    ``model.to("cuda")`` moves it.
    """
    return Segmenter.from_checkpoint(path)
