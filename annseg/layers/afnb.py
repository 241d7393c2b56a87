"""AFNB, the Asymmetric Fusion Non-local Block (paper section 3.4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from annseg.layers.apnb import finish_block, fold_for_inference
from annseg.layers.attention import AttentionProbe, attention
from annseg.layers.conv import FoldedOutput, Projection, conv_bn_act, project_and_sample, project_together, to_map, to_tokens
from annseg.layers.pyramid import PyramidSampling


class AFNB(nn.Module):
    """Fuse low-level into high-level features: high-level queries attend to low-level anchors.

    ``forward(low, high)``: low (B, C_low, H_l, W_l) gives keys and values, high
    (B, C_high, H, W) gives queries; returns (B, C_out, H, W). The two maps may differ in size.

    Args:
        low_channels: C_low (ResNet layer3: 1024).
        high_channels: C_high (ResNet layer4: 2048).
        out_channels: C_out; defaults to C_high.
        key_channels: Ck, width of query and key (separate projections).
        value_channels: Cv.
        sizes: pyramid pooling sizes for the anchors; ``None`` attends to every low-level position.
        norm_after_w: BatchNorm after W. The authors found it helps when AFNB is used without
            APNB (their issue #16); their released model has none, so it is off by default.
        dropout: Dropout2d probability after the fusion.
        fusion: concat[W(O), X_high] -> 1x1 conv -> BN -> dropout (no ReLU). ``False`` returns W(O).
        conv_bias: bias in convolutions followed by BatchNorm.
        fused_attention: ``scaled_dot_product_attention`` (default) or the plain reference.
        fused_fusion: W and the fusion conv as one product, without W(O) or the concatenated
            map (as ``APNB``; not with ``norm_after_w``, whose BatchNorm sits in between).

    Set ``probe`` (an ``AttentionProbe``) to record the attention weights of chosen high-level
    positions over the low-level anchors during the forward.
    """

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        out_channels: int | None = None,
        *,
        key_channels: int = 256,
        value_channels: int = 256,
        sizes: tuple[int, ...] | None = (1, 3, 6, 8),
        norm_after_w: bool = False,
        dropout: float = 0.05,
        fusion: bool = True,
        conv_bias: bool = True,
        fused_attention: bool = True,
        fused_fusion: bool = True,
    ) -> None:
        super().__init__()
        out_channels = high_channels if out_channels is None else out_channels
        self.fused_attention = fused_attention
        self.fused_fusion = fused_fusion
        self.folded: FoldedOutput | None = None
        self.probe: AttentionProbe | None = None
        self.query = Projection(high_channels, key_channels, bias=conv_bias)
        self.key = Projection(low_channels, key_channels, bias=conv_bias)
        self.value = Projection(low_channels, value_channels, norm=False, act=False)
        self.sample = nn.Flatten(2) if sizes is None else PyramidSampling(sizes)
        self.out = Projection(
            value_channels, out_channels, norm=norm_after_w, act=False, bias=True, zero_init=True
        )
        self.fuse = (
            conv_bn_act(out_channels + high_channels, out_channels, bias=conv_bias, act=False, dropout=dropout)
            if fusion
            else None
        )

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        context = self.attend(low, high)  # (B, N, Cv)
        return finish_block(self, context, to_tokens(high), high, tuple(high.shape[-2:]))

    def attend(self, low: Tensor, high: Tensor) -> Tensor:
        """The attention's output O, (B, N, Cv) at high's N positions, before W and the fusion.

        ``ANN.fuse_for_inference`` composes what follows (W, fusion, the context conv) into
        one conv (``FoldedContext``) that reads O and ``high``.
        """
        H, W = high.shape[-2:]
        (query,), _ = project_and_sample(high, [self.query])  # (B, N, Ck); its gradient in high's layout
        if isinstance(self.sample, PyramidSampling):
            # Pool first, then project: exact, since sampling is linear and the projection affine.
            (key,), pooled = project_and_sample(low, [self.key], self.sample)  # (B, N_low, Ck), (B, C_low, S)
            anchor_values = self.value(pooled.transpose(1, 2))  # (B, S, Cv)
        else:  # every low-level position is an anchor: key and value in one matmul
            key, anchor_values = project_together(to_tokens(low), self.key, self.value)
        anchor_keys = self.sample(to_map(key, *low.shape[-2:])).transpose(1, 2)  # (B, S, Ck)
        if self.probe is not None:  # the weights of a few queries, for a picture of them
            self.probe.record(query, anchor_keys, (H, W), tuple(low.shape[-2:]))
        return attention(query, anchor_keys, anchor_values, fused=self.fused_attention)  # (B, N, Cv)

    def fuse_for_inference(self) -> "AFNB":
        """Fold every BatchNorm into its conv, and W into the fusion conv (eval mode only).

        Exact up to rounding; the block can no longer be trained. Returns the block.
        """
        fold_for_inference(self)
        return self
