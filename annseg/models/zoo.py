"""Named configurations: ``create_model("ann_resnet101", num_classes=19)``."""

from __future__ import annotations

import inspect
from functools import partial
from pathlib import Path
from typing import Any, Callable

from annseg.models.ann import ANN, VARIANTS

# Our name -> timm backbone. Plain names use mmseg's ResNetV1c deep stem (timm 'c'), the
# 's' names the authors' deep-base stem, 'v1b' (mmseg's name) torchvision's plain 7x7 stem,
# so that torchvision ImageNet weights have a home; ResNet-18 keeps the plain stem.
BACKBONES = {
    "resnet18": "resnet18",
    "resnet50": "resnet50c",
    "resnet50s": "resnet50s",
    "resnet50v1b": "resnet50",
    "resnet101": "resnet101c",
    "resnet101s": "resnet101s",
    "resnet101v1b": "resnet101",
}
MODELS: dict[str, Callable[..., ANN]] = {
    f"{variant}_{name}": partial(ANN, backbone=timm_name, variant=variant)
    for variant in VARIANTS
    for name, timm_name in BACKBONES.items()
}
# The options under which an ANN computes mmsegmentation's ANNHead + FCNHead (docs/method.md,
# "Where the authors' code and mmsegmentation differ"): no conv bias before BN, dropout 0.1
# (our blocks end with it, where mmseg drops after AFNB and before the classifier), a
# 256-channel auxiliary head, align_corners=False. mmseg's input normalisation (RGB, ImageNet
# mean/std) is our default.
MMSEG_OPTIONS: dict[str, Any] = {"conv_bias": False, "dropout": 0.1, "aux_channels": 256, "align_corners": False}
_OPTIONS = set(inspect.signature(ANN).parameters) - {"num_classes", "backbone_weights", "backbone", "variant"}


def list_models() -> list[str]:
    """Names accepted by ``create_model``, sorted."""
    return sorted(MODELS)


def create_model(
    name: str, num_classes: int = 19, backbone_weights: str | Path | None = None, **options: Any
) -> ANN:
    """Build a named model; ``options`` are ANN's keyword arguments (e.g. ``sizes=(1, 3)``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {name!r}; valid options: {sorted(_OPTIONS)}")
    return MODELS[name](num_classes=num_classes, backbone_weights=backbone_weights, **options)
