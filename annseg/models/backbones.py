"""Dilated ResNet backbones through timm, returning layer3 and layer4 at output stride 8.

Weights come only from a local file the user names; nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import timm
from torch import Tensor, nn

from annseg.models.weights import load_exactly, read_state_dict

# timm's names for the ResNet stems PAPER.md uses: 'c' is mmseg's ResNetV1c deep stem
# (3->32->32->64), 's' the authors' deep-base stem (3->64->64->128), whose 3x3 max-pool
# rounds up (ceil mode).
RESNET_STEMS = ("resnet18", "resnet50c", "resnet50s", "resnet101c", "resnet101s")
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
    """Load a timm ResNet state dict (classifier keys ignored) strictly into ``backbone``."""
    state = {k: v for k, v in read_state_dict(path, "backbone weights").items() if not k.startswith("fc.")}
    load_exactly(backbone.body, state, f"backbone weights {path}", f"timm {backbone.name!r}",
                 hint=f"Pass a state dict saved from timm.create_model({backbone.name!r}).")
