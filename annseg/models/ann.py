"""The ANN segmentation network and its ablation variants, one class with options."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import torch.nn.functional as F
from torch import Tensor, nn

from annseg.layers import AFNB, APNB, NonLocal2d, conv_bn_act
from annseg.models.backbones import Backbone

Variant = Literal["fcn", "nb", "apnb", "afnb", "ann"]
VARIANTS: tuple[str, ...] = get_args(Variant)


class ANN(nn.Module):
    """Asymmetric Non-local Network: backbone -> AFNB -> 3x3 conv -> APNB -> classifier.

    ``variant`` picks the paper's ablation: ``fcn`` (no blocks), ``nb`` (NonLocal2d in place
    of APNB, no AFNB), ``apnb``, ``afnb``, ``ann`` (both blocks). An auxiliary head on layer3
    helps training. Training mode returns ``(main, aux)`` logits, eval mode the main logits,
    each (B, num_classes, H, W) at the input's size.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        backbone: str = "resnet101c",
        backbone_weights: str | Path | None = None,
        variant: Variant = "ann",
        head_channels: int = 512,
        key_channels: int = 256,
        value_channels: int = 256,
        sizes: tuple[int, ...] = (1, 3, 6, 8),
        dropout: float = 0.05,
        aux_channels: int = 512,
        norm_after_w: bool = False,
        conv_bias: bool = True,
        align_corners: bool = True,
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.variant = variant
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.backbone = Backbone(backbone, weights=backbone_weights)
        if len(self.backbone.channels) != 2 or self.backbone.strides != (8, 8):
            raise ValueError(
                f"ANN needs layer3 and layer4 at stride 8; backbone {backbone!r} gives channels "
                f"{self.backbone.channels} at strides {self.backbone.strides}"
            )
        low, high = self.backbone.channels  # layer3, layer4: 1024, 2048 for ResNet-50/101
        block = dict(key_channels=key_channels, value_channels=value_channels, dropout=dropout,
                     conv_bias=conv_bias, fused_attention=fused_attention)
        self.afnb = (
            AFNB(low, high, high, sizes=sizes, norm_after_w=norm_after_w, **block)
            if variant in ("afnb", "ann")
            else None
        )
        self.context = conv_bn_act(high, head_channels, 3, bias=conv_bias)
        self.apnb: nn.Module | None = None
        if variant in ("apnb", "ann"):
            self.apnb = APNB(head_channels, head_channels, sizes=sizes, **block)
        elif variant == "nb":
            self.apnb = NonLocal2d(head_channels, head_channels, **block)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.aux_head = nn.Sequential(
            conv_bn_act(low, aux_channels, 3, bias=conv_bias, dropout=dropout),
            nn.Conv2d(aux_channels, num_classes, 1),
        )

    def forward(self, image: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        low, high = self.backbone(image)  # layer3 (B, C3, H/8, W/8), layer4 (B, C4, H/8, W/8)
        x = high if self.afnb is None else self.afnb(low, high)  # (B, C4, H/8, W/8)
        x = self.context(x)  # (B, 512, H/8, W/8)
        if self.apnb is not None:
            x = self.apnb(x)
        logits = self._upsample(self.classifier(x), image)
        if not self.training:
            return logits
        return logits, self._upsample(self.aux_head(low), image)

    def fuse_for_inference(self) -> "ANN":
        """``fuse_for_inference()`` of the AFNB and APNB (or NB) blocks: fewer matmuls per forward.

        Exact up to rounding; eval mode only, and the network can no longer be trained (for
        benchmarks and ONNX export). Returns the network.
        """
        for block in (self.afnb, self.apnb):
            if block is not None:
                block.fuse_for_inference()
        return self

    def _upsample(self, logits: Tensor, image: Tensor) -> Tensor:
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=self.align_corners)
