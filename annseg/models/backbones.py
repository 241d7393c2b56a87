"""Dilated ResNet backbones through timm, returning layer3 and layer4 at output stride 8.

Weights come only from a local file the user names; nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import Tensor, nn

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


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from a .pth/.pt/.bin (torch.save) or .safetensors file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read backbone weights {path}: {error}") from error
    for wrapper in ("state_dict", "model"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"backbone weights {path} do not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_weights(backbone: Backbone, path: str | Path) -> None:
    """Load a timm ResNet state dict (classifier keys ignored) strictly into ``backbone``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights file {path} does not exist; pass the path of a local "
            f"{backbone.name} state dict (annseg never downloads weights)"
        )
    state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("fc.")}
    expected = backbone.body.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{len(items)} {what} (e.g. {', '.join(items[:3])})"
            for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                ("shape mismatches", mismatched))
            if items
        ]
        raise ValueError(
            f"backbone weights {path} do not match timm {backbone.name!r}: {'; '.join(problems)}. "
            f"Pass a state dict saved from timm.create_model({backbone.name!r})."
        )
    backbone.body.load_state_dict(state)
