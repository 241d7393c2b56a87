"""The ANN segmentation network and its ablation variants, one class with options."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from annseg.layers import AFNB, APNB, NonLocal2d, conv_bn_act
from annseg.layers.conv import FoldedContext
from annseg.layers.conv_grad import MatmulWeightGrad
from annseg.layers.folding import fold_conv_batchnorms, relative_change
from annseg.layers.recompute import RecomputeNormAct
from annseg.layers.winograd import WinogradConv
from annseg.models.backbones import Backbone

Variant = Literal["fcn", "nb", "apnb", "afnb", "ann"]
VARIANTS: tuple[str, ...] = get_args(Variant)


class ANN(nn.Module):
    """Asymmetric Non-local Network: backbone -> AFNB -> 3x3 conv -> APNB -> classifier.

    ``variant`` picks the paper's ablation: ``fcn`` (no blocks), ``nb`` (NonLocal2d in place
    of APNB, no AFNB), ``apnb``, ``afnb``, ``ann`` (both blocks). AFNB fuses the backbone's
    last two feature levels (low: layer3, high: layer4 for a ResNet); an auxiliary head on the
    low level helps training. Training mode returns ``(main, aux)`` logits, eval mode the main
    logits, each (B, num_classes, H, W) at the input's size.

    ``backbone`` is one of annseg's ResNet names, which mean the same network everywhere
    (``resnet18``, ``resnet50``/``resnet101``: mmseg's ResNetV1c deep stem, timm's
    ``resnet50c``/``resnet101c``; ``resnet50s``/``resnet101s``: the authors' deep-base stem;
    ``resnet50v1b``/``resnet101v1b``: torchvision's 7x7 stem), or ``timm:NAME`` for any other
    timm model that ``features_only`` supports and can dilate (``timm:convnext_tiny``,
    ``timm:efficientnet_b0``, ...); ``timm:NAME`` is exactly timm's ``NAME``. ``output_stride``
    8 (dilated, the paper's setting) or 16 (faster). ``backbone_weights``: a local state dict
    of the whole timm model (see ``load_backbone_weights``); nothing is downloaded.

    ``channels_last`` (default) keeps weights and activations in NHWC, the layout oneDNN and
    cuDNN convolve fastest; the same function. ``fused_fusion``: the blocks' W and fusion conv
    as one product (see ``APNB``). ``recompute_norm_act`` (default): in training, keep each
    BatchNorm's input and rebuild its ReLU output (and a residual block's output) in the
    backward instead of keeping both (``RecomputeNormAct``): less activation memory (a quarter
    for ANN-R50) for about 2% more time, bit for bit the same gradients. ``matmul_weight_grad``
    (default): in training on the CPU, channels-last convs take their weight gradient as matrix products
    (``MatmulWeightGrad``), where oneDNN's NHWC one is slow. ``winograd_conv`` (default): in
    training on the CPU, 3x3 "same" convs of at least 256 channels (the heads' and the dilated
    stages') on maps of at least 1,024 positions run as Winograd F(2x2, 3x3), forward and
    backward (``WinogradConv``): 2.25x fewer products, the same function up to float
    re-association. Set ``checkpoint_backbone = True`` to recompute the backbone's activations
    in the backward instead of keeping them (less memory, about one more backbone forward of
    time; the same gradients).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        backbone: str = "resnet101",
        backbone_weights: str | Path | None = None,
        output_stride: int = 8,
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
        fused_fusion: bool = True,
        channels_last: bool = True,
        recompute_norm_act: bool = True,
        matmul_weight_grad: bool = True,
        winograd_conv: bool = True,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.variant = variant
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.backbone = Backbone(backbone, weights=backbone_weights, output_stride=output_stride)
        low, high = self._feature_channels(output_stride)  # layer3, layer4: 1024, 2048 for ResNet-50/101
        block = dict(key_channels=key_channels, value_channels=value_channels, dropout=dropout,
                     conv_bias=conv_bias, fused_attention=fused_attention, fused_fusion=fused_fusion)
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
        self.channels_last = channels_last
        self.recompute_norm_act = recompute_norm_act
        self.matmul_weight_grad = matmul_weight_grad
        self.winograd_conv = winograd_conv
        self.checkpoint_backbone = False
        self.folded = False  # set by fuse_for_inference()
        self.afnb_context: FoldedContext | None = None  # AFNB's output + context conv, by fuse_for_inference()
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, image: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        training = self.training and torch.is_grad_enabled()
        # A compiled graph plans its own memory; a checkpointed backbone keeps none of its maps.
        eager_training = training and not torch.compiler.is_compiling()
        memory = RecomputeNormAct() if self.recompute_norm_act and eager_training else contextlib.nullcontext()
        convs = partial(self._conv_paths, eager_training and image.device.type == "cpu")
        if self.checkpoint_backbone and training:
            low, high = self.backbone.checkpointed(image, convs)
            with memory, convs():
                return self._heads(low, high, image)
        with memory, convs():
            low, high = self.backbone(image)  # layer3 (B, C3, h, w), layer4 (B, C4, h, w); h = H/8 at stride 8
            return self._heads(low, high, image)

    @contextlib.contextmanager
    def _conv_paths(self, cpu_training: bool) -> Iterator[None]:
        """The CPU training paths for convs that are on: Winograd first, then the matmul weight gradient."""
        with contextlib.ExitStack() as stack:
            if cpu_training and self.matmul_weight_grad:
                stack.enter_context(MatmulWeightGrad())
            if cpu_training and self.winograd_conv:
                stack.enter_context(WinogradConv())  # entered last, so it sees each conv first
            yield

    def _heads(self, low: Tensor, high: Tensor, image: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Everything after the backbone: eval mode the main logits, training mode (main, aux)."""
        if self.afnb_context is not None:  # folded: AFNB's output is never built, the conv reads O and high
            x = self.context(self.afnb_context(self.afnb.attend(low, high), high))  # context[0] is folded in
        else:
            x = high if self.afnb is None else self.afnb(low, high)  # (B, C4, h, w); AFNB pools low's anchors
            x = self.context(x)  # (B, 512, h, w)
        if self.apnb is not None:
            x = self.apnb(x)
        logits = self._upsample(self.classifier(x), image)
        if not self.training:
            return logits
        return logits, self._upsample(self.aux_head(low), image)

    def fuse_for_inference(self) -> "ANN":
        """Fold for inference: the blocks' ``fuse_for_inference()``, then every other BatchNorm
        into the conv before it (backbone and heads, ``fold_conv_batchnorms``), then AFNB's
        affine output into the context conv that reads it (``FoldedContext``).

        Exact up to rounding (checked on an example input); eval mode only, and the network
        can no longer be trained. ``annseg.load`` returns a folded network. Returns the network.
        """
        if self.training:
            raise RuntimeError("fuse_for_inference() folds BatchNorm running statistics; call .eval() first")
        if self.folded:
            return self
        for block in (self.afnb, self.apnb):
            if block is not None:
                block.fuse_for_inference()
        weight = next(self.parameters())
        example = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
        fold_conv_batchnorms(self, example)
        self._fold_afnb_into_context(example)
        self.folded = True
        return self

    def _fold_afnb_into_context(self, example: Tensor, tolerance: float = 1e-4) -> None:
        """Compose AFNB's folded output (affine: its fusion has no ReLU) with the context conv,
        once that conv's BatchNorm is folded; checked on ``example`` like the BatchNorm folding."""
        output = None if self.afnb is None else self.afnb.folded
        conv = self.context[0]
        if (output is None or output.act or not isinstance(self.context[1], nn.Identity)
                or not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.padding_mode != "zeros"):
            return
        with torch.no_grad():
            before = self(example)
            self.afnb_context, self.context[0] = FoldedContext(output, conv), nn.Identity()
            after = self(example)
        error = relative_change(before, after)
        if not error <= tolerance:
            self.afnb_context, self.context[0] = None, conv
            raise RuntimeError(f"folding AFNB into the context conv changed the output by {error:.2e} of its "
                               f"largest value (tolerance {tolerance:.0e}); the network is left as it was")

    def _feature_channels(self, output_stride: int) -> tuple[int, int]:
        """The backbone's (low, high) channels, checked against what AFNB and the heads need."""
        channels, strides = self.backbone.channels, self.backbone.strides
        if (len(channels) != 2 or not all(isinstance(c, int) and c > 0 for c in channels)
                or strides[-1] != output_stride):
            raise ValueError(f"ANN needs two feature levels (low, high) at output stride {output_stride}; backbone "
                             f"{self.backbone.name!r} gives channels {channels} at strides {strides}")
        return channels[0], channels[1]

    def _upsample(self, logits: Tensor, image: Tensor) -> Tensor:
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=self.align_corners)
