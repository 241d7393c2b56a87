"""APNB, the Asymmetric Pyramid Non-local Block (paper section 3.3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from annseg.layers.attention import AttentionProbe, attention
from annseg.layers.conv import (FoldedOutput, Projection, can_fuse_fusion, conv_bn_act, fused_fusion, project_and_sample,
                                project_together, to_map, to_tokens)
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
        fused_fusion: compute W and the fusion conv as one product (``conv.fused_fusion``),
            in training too, so that neither W(O) nor concat[W(O), X] is built (default);
            ``False`` builds them literally. The same function up to rounding.

    Set ``probe`` (an ``AttentionProbe``) to record the attention weights of chosen positions
    during the forward.

    Projections that read the same input run as one wider matmul: query and key (when not
    shared), and for the non-local block (``sizes=None``) the value too. With anchors the
    value reads the S pooled positions instead, which costs S/N of a projection of all N.
    ``fuse_for_inference()`` folds BatchNorms, W and the fusion conv into fewer matmuls.
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
        fused_fusion: bool = True,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.fused_attention = fused_attention
        self.fused_fusion = fused_fusion
        self.folded: FoldedOutput | None = None
        self.probe: AttentionProbe | None = None
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
        # Projections that read the same tokens, as one matmul; the query may be the key.
        same_input = [p for p in (self.key, self.query) if p is not None]
        if self.pooled:
            # Sampling is linear and the value projection affine, so pooling X first gives the
            # same anchors as projecting all N positions, at S/N of the projection's cost.
            projected, pooled = project_and_sample(x, same_input, self.sample)
            anchor_values = self.value(pooled.transpose(1, 2))  # (B, S, Cv)
        else:
            projected = project_together(tokens, *same_input, self.value)
            anchor_values = projected.pop()  # (B, N, Cv): every position is an anchor
        key = projected.pop(0)  # (B, N, Ck)
        query = key if self.query is None else projected.pop(0)  # (B, N, Ck)
        anchor_keys = self.sample(to_map(key, H, W)).transpose(1, 2)  # (B, S, Ck)
        if self.probe is not None:  # the weights of a few queries, for a picture of them
            self.probe.record(query, anchor_keys, (H, W), (H, W))
        context = attention(query, anchor_keys, anchor_values, fused=self.fused_attention)  # (B, N, Cv)
        del query, key, anchor_keys, anchor_values  # free them before the wide output is built
        return finish_block(self, context, tokens, x, (H, W))

    @property
    def pooled(self) -> bool:
        """Whether the anchors are pyramid-pooled (APNB) rather than all positions (NB)."""
        return isinstance(self.sample, PyramidSampling)

    def fuse_for_inference(self) -> "APNB":
        """Fold every BatchNorm into its conv, and W into the fusion conv (eval mode only).

        Exact up to rounding; the block can no longer be trained. Returns the block.
        """
        fold_for_inference(self)
        return self


def finish_block(block: nn.Module, context: Tensor, tokens: Tensor, x: Tensor, size: tuple[int, int]) -> Tensor:
    """Shared by APNB and AFNB: W and the fusion of the attention's (B, N, Cv) context with the input x."""
    if block.folded is not None:  # after fuse_for_inference(): W and fusion in one map
        return to_map(block.folded(context, tokens), *size)
    if block.fused_fusion and can_fuse_fusion(block.out, block.fuse):
        return fused_fusion(block.out, block.fuse, context, tokens, size)
    out = to_map(block.out(context), *size)  # W(O): (B, C_out, H, W), zero at init
    if block.fuse is None:
        return out
    return block.fuse(torch.cat([out, x], dim=1))


def fold_for_inference(block: nn.Module) -> None:
    """Shared by APNB and AFNB: fold their key/query BNs, and W + fusion into ``folded``."""
    if block.training:
        raise RuntimeError(f"fuse_for_inference() folds BatchNorm running statistics; call "
                           f"{type(block).__name__}.eval() first")
    if block.folded is not None:
        return
    for projection in (block.key, block.query):
        if projection is not None:
            projection.fold_norm()
    if block.fuse is None:
        block.out.fold_norm()
    else:
        block.folded = FoldedOutput(block.out, block.fuse)
        block.out = block.fuse = None
