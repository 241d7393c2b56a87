"""Dilated ResNet backbones through timm, returning layer3 and layer4 at output stride 8.

Weights come only from a local file the user names; nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import timm
from torch import Tensor, nn

from annseg.models.weights import load_exactly, read_state_dict

# timm's names for the ResNet stems docs/method.md describes: 'c' is mmseg's ResNetV1c deep stem
# (3->32->32->64), 's' the authors' deep-base stem (3->64->64->128), whose 3x3 max-pool
# rounds up (ceil mode); no letter is the plain 7x7 stem of torchvision (mmseg's ResNetV1b).
RESNET_STEMS = ("resnet18", "resnet50", "resnet50c", "resnet50s", "resnet101", "resnet101c", "resnet101s")
CEIL_MODE_STEMS = ("resnet50s", "resnet101s")


class Backbone(nn.Module):
    """A timm ResNet dilated to output stride 8 (layer3 dilation 2, layer4 dilation 4).

    ``forward(image)`` returns ``[layer3, layer4]``; ``channels`` and ``strides`` say what
    each one is, e.g. (1024, 2048) and (8, 8) for ResNet-50/101.
    """

    def __init__(self, name: str = "resnet101c", weights: str | Path | None = None) -> None:
        super().__init__()
        try:
            self.body = timm.create_model(
                name, pretrained=False, features_only=True, out_indices=(3, 4), output_stride=8
            )
        except Exception as error:  # timm raises RuntimeError/KeyError/TypeError by model
            raise ValueError(
                f"backbone {name!r} cannot be built as a dilated feature extractor (layer3, layer4 "
                f"at output stride 8) by timm: {error}. Use a ResNet such as {', '.join(RESNET_STEMS)}"
            ) from error
        self.name = name
        if name in CEIL_MODE_STEMS:
            self.body.maxpool.ceil_mode = True
        self.channels: tuple[int, ...] = tuple(self.body.feature_info.channels())
        self.strides: tuple[int, ...] = tuple(self.body.feature_info.reduction())
        if weights is not None:
            load_backbone_weights(self, weights)

    def forward(self, image: Tensor) -> list[Tensor]:
        return self.body(image)


def load_backbone_weights(backbone: Backbone, path: str | Path) -> None:
    """Load a ResNet state dict strictly into ``backbone``, whichever library saved it.

    timm and torchvision ResNets share key names (their ``fc`` classifier is ignored).
    OpenMMLab checkpoints (mmpretrain / mmcv ResNetV1c, or a whole mmseg model) are told
    apart by their keys: with ``backbone.*`` keys only those are read (the rest is heads),
    and the deep stem's ``stem.*`` keys are renamed to timm's.
    """
    state = read_state_dict(path, "backbone weights")
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    state = openmmlab_resnet_to_timm({k: v for k, v in state.items() if not k.startswith("fc.")})
    load_exactly(backbone.body, state, f"backbone weights {path}", f"timm {backbone.name!r}",
                 hint=f"Pass a ResNet state dict from timm ({backbone.name!r}), torchvision or OpenMMLab "
                      "whose stem and depth match the backbone.")


# OpenMMLab's deep stem is one Sequential: conv, BN, ReLU three times. timm keeps the first
# two convs' BNs inside ``conv1`` and names the last BN ``bn1``.
_STEM_TO_TIMM = {"stem.0.": "conv1.0.", "stem.1.": "conv1.1.", "stem.3.": "conv1.3.", "stem.4.": "conv1.4.",
                 "stem.6.": "conv1.6.", "stem.7.": "bn1."}


def openmmlab_resnet_to_timm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """OpenMMLab ResNet key names (ResNetV1c ``stem.*``, ``layerN.M.*``) as timm's.

    The residual layers already have timm's names (``conv1``/``bn1``..., ``downsample.0/1``);
    keys that fit neither stay as they are, for the strict loader to report.
    """
    renamed = {}
    for key, value in state.items():
        prefix = next((p for p in _STEM_TO_TIMM if key.startswith(p)), None)
        renamed[key if prefix is None else _STEM_TO_TIMM[prefix] + key[len(prefix):]] = value
    return renamed
