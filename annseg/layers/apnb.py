"""APNB, the Asymmetric Pyramid Non-local Block (paper section 3.3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from annseg.layers.attention import attention
from annseg.layers.conv import Projection, conv_bn_act, to_map, to_tokens
from annseg.layers.pyramid import PyramidSampling


class APNB(nn.Module):
    """Self-attention from every position to S pyramid-pooled anchors of the same map.

    (B, C_in, H, W) -> (B, C_out, H, W). Cost O(C N S) instead of the non-local block's
    O(C N^2); the paper's defaults give S = 110.

    Args:
        in_channels: C_in.
        out_channels: C_out; defaults to C_in.
        key_channels: Ck, width of query and key.
        value_channels: Cv, width of the value.
        sizes: pyramid pooling sizes. ``None`` attends to all N positions: the standard
            non-local block (see ``NonLocal2d``).
        share_query_key: one projection serves as query and key (the authors' code). It is
            computed once per forward.
        dropout: Dropout2d probability after the fusion.
        fusion: concat[W(O), X] -> 1x1 conv -> BN -> ReLU -> dropout. ``False`` returns W(O),
            the attention part alone (what the paper's efficiency table measures).
        conv_bias: bias in convolutions followed by BatchNorm (the authors' code has one).
        fused_attention: ``scaled_dot_product_attention`` (default) or the plain reference.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        key_channels: int = 256,
        value_channels: int = 256,
        sizes: tuple[int, ...] | None = (1, 3, 6, 8),
        share_query_key: bool = True,
        dropout: float = 0.05,
        fusion: bool = True,
        conv_bias: bool = True,
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.fused_attention = fused_attention
        self.key = Projection(in_channels, key_channels, bias=conv_bias)
        self.query = None if share_query_key else Projection(in_channels, key_channels, bias=conv_bias)
        self.value = Projection(in_channels, value_channels, norm=False, act=False)
        # Keys and values are sampled the same way; flattening keeps all N positions.
        self.sample = nn.Flatten(2) if sizes is None else PyramidSampling(sizes)
        self.out = Projection(value_channels, out_channels, norm=False, act=False, zero_init=True)
        self.fuse = (
            conv_bn_act(out_channels + in_channels, out_channels, bias=conv_bias, dropout=dropout)
            if fusion
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        tokens = to_tokens(x)  # (B, N, C_in)
        key = self.key(tokens)  # (B, N, Ck)
        query = key if self.query is None else self.query(tokens)  # (B, N, Ck)
        anchor_keys = self.sample(to_map(key, H, W)).transpose(1, 2)  # (B, S, Ck)
        # Sampling is linear and the value projection affine, so pooling X first gives the
        # same anchors as projecting all N positions, at S/N of the projection's cost.
        anchor_values = self.value(self.sample(x).transpose(1, 2))  # (B, S, Cv)
        context = attention(query, anchor_keys, anchor_values, fused=self.fused_attention)  # (B, N, Cv)
        out = to_map(self.out(context), H, W)  # W(O): (B, C_out, H, W), zero at init
        if self.fuse is None:
            return out
        return self.fuse(torch.cat([out, x], dim=1))
