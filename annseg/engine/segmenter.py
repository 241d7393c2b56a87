"""A trained network ready to label images: ``annseg.load(path).predict(image)``.

The network alone expects normalised tensors and knows nothing of class names or test-time
settings; a checkpoint carries both. ``Segmenter`` keeps them together, so a user of the
library loads one object and calls ``predict`` on a Pillow image or a numpy array.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from annseg.data.base import array_as_rgb, as_rgb
from annseg.data.transforms import Normalization
from annseg.engine.attention import AttentionMaps, attention_maps
from annseg.engine.checkpoint import load_model
from annseg.engine.config import EvalConfig
from annseg.engine.predict import palette_png, view_count, view_sum

ImageLike = Union[Image.Image, np.ndarray, Tensor]
Output = Literal["labels", "probabilities", "logits"]
OUTPUTS = ("labels", "probabilities", "logits")


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
    def from_checkpoint(cls, path: str | Path, settings: EvalConfig | None = None, fuse: bool = True) -> Segmenter:
        """The model of an annseg checkpoint (from ``annseg train`` or ``save_model``), on the CPU.

        ``settings`` default to the checkpoint's ``config.eval``. ``fuse`` (default): BatchNorms
        folded into their convs (``ANN.fuse_for_inference``), the same function up to rounding.
        """
        return cls.from_meta(*load_model(path, fuse=fuse), settings=settings)

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

    def predict(self, image: ImageLike | Sequence[ImageLike], output: Output = "labels",
                batch_size: int | None = None) -> np.ndarray | list[np.ndarray]:
        """Label one image, or each image of a list, with the checkpoint's test-time ``settings``.

        ``image``: a Pillow image of any mode (gray, palette, RGBA, 16-bit), a numpy array
        (H, W) gray / (H, W, 3) RGB / (H, W, 4) RGBA of uint8, uint16 or float in [0, 1], or a
        (3, H, W) RGB tensor, uint8 or float in [0, 1] (as ``annseg.data.read_image`` returns
        the former). A list (or tuple) gives a list, in order; images of one size run through the
        network together, ``batch_size`` at a time (default: ``settings.batch_size``), with the
        same result as one by one.

        ``output``: ``"labels"``, an (H, W) int64 map of class indices (into ``classes``);
        ``"logits"``, (K, H, W) float32, the mean over the test-time views (scales x flips);
        ``"probabilities"``, their softmax over the K classes. The labels are the argmax of the
        logits. Raises TypeError for another type or dtype and ValueError for another shape,
        out-of-range floats or an unknown ``output``.
        """
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r}; choose one of {list(OUTPUTS)}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r}; expected a positive int")
        if not isinstance(image, (list, tuple)):
            return self._predict_batch([_as_rgb(image)], output)[0]
        rgbs = [_as_rgb(item, f"image {index}: ") for index, item in enumerate(image)]
        groups: dict[tuple, list[int]] = {}
        for index, rgb in enumerate(rgbs):  # one batch per size and dtype (uint8 / float)
            groups.setdefault((tuple(rgb.shape), rgb.dtype), []).append(index)
        results: list[np.ndarray | None] = [None] * len(rgbs)
        step = batch_size or self.settings.batch_size
        for indices in groups.values():
            for start in range(0, len(indices), step):
                chunk = indices[start: start + step]
                for index, result in zip(chunk, self._predict_batch([rgbs[i] for i in chunk], output)):
                    results[index] = result
        return results  # type: ignore[return-value]

    def _predict_batch(self, rgbs: list[Tensor], output: Output) -> list[np.ndarray]:
        """``output`` for equal-sized (3, H, W) RGB tensors, run through the network as one batch."""
        logits = view_sum(self.network, torch.stack(rgbs), self.num_classes, self.normalization, self.settings,
                          self.device)
        if output == "labels":
            result = logits.argmax(1)
        else:
            logits = logits / view_count(self.settings)
            result = logits.softmax(1) if output == "probabilities" else logits
        return list(result.cpu().numpy())

    def attention(self, image: ImageLike, points: Sequence[Sequence[float]], block: str = "apnb") -> AttentionMaps:
        """Where each query point attends: the softmax weights over ``block``'s S pyramid anchors.

        ``points``: (x, y) image pixels. ``block``: ``"apnb"`` (queries and anchors from the context
        map) or ``"afnb"`` (queries from the high-level map, anchors from the low-level map). One
        forward of the network at the image's own size (the test-time views of ``settings`` do not
        apply); a point maps to feature row ``floor(y * H_f / H)`` and column ``floor(x * W_f / W)``.
        ``image`` as for ``predict``. Raises ValueError for a point outside the image, an unknown
        block or a model without that block.
        """
        return attention_maps(self.network, _as_rgb(image), self.normalization, points, block)

    def colorize(self, labels: np.ndarray) -> Image.Image:
        """A paletted image of a label map: pixel values are class ids, shown in the class colours."""
        return palette_png(labels, self.palette)


def _as_rgb(image: ImageLike, where: str = "") -> Tensor:
    """(3, H, W) RGB, uint8 or float32 in [0, 1], from any image type ``predict`` takes."""
    if isinstance(image, Image.Image):
        return as_rgb(image)
    if isinstance(image, np.ndarray):
        try:
            return array_as_rgb(image)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}{error}") from None
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or 0 in image.shape:
            raise ValueError(f"{where}image tensor has shape {tuple(image.shape)}; expected (3, H, W) RGB")
        if image.dtype == torch.uint8:
            return image.cpu()
        if not image.is_floating_point():
            raise TypeError(f"{where}image tensor has dtype {image.dtype}; expected uint8 (0-255) or float in [0, 1]")
        rgb = image.detach().cpu().float()
        low, high = float(rgb.min()), float(rgb.max())
        if not (0.0 <= low and high <= 1.0):  # also false for NaN
            raise ValueError(f"{where}float image tensor has values in [{low}, {high}]; expected values in [0, 1] "
                             "(divide 8-bit data by 255)")
        return rgb
    raise TypeError(f"{where}cannot predict on a {type(image).__name__}; expected a Pillow image, a numpy array "
                    "or a (3, H, W) tensor")


def load(path: str | Path, fuse: bool = True) -> Segmenter:
    """``annseg.load(path)``: the ready model of an annseg checkpoint (eval mode, CPU).

    ``model.predict(image)`` labels an image, ``model.classes`` names the labels;
    ``model.to("cuda")`` moves it. Its BatchNorms are folded into their convolutions
    (``fuse=False`` keeps them): the same function up to rounding, and faster.
    """
    return Segmenter.from_checkpoint(path, fuse=fuse)
