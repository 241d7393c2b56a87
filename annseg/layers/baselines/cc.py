"""CCNet's recurrent criss-cross attention (Huang et al., ICCV 2019)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from annseg.layers.conv import Projection, conv_bn_act, project_together, to_tokens


class CrissCrossAttention(nn.Module):
    """Each position attends to the H + W - 1 positions of its row and column, ``recurrence`` times.

    (B, C_in, H, W) -> (B, channels, H, W). A ``reduce_kernel_size`` conv -> BN -> ReLU takes
    the input to ``channels`` (CCNet's 3x3 "conva"); then the same criss-cross attention is
    applied ``recurrence`` times, so that after two passes every position has heard from
    every other. One pass, with q = Wq x, k = Wk x (channels // 8 wide) and v = Wv x:

        a_ij = softmax over j in row(i) + column(i) of q_i . k_j   (i itself counted once)
        x_i <- gamma * sum_j a_ij v_j + x_i

    Choices: R = 2 (``recurrence``), the paper's default; the reduction is CCNet's 3x3 conv
    with BN and ReLU and no bias; the similarity is not scaled by 1/sqrt(d) and ``gamma``
    starts at 0, as in the authors' code. CCNet's second 3x3 conv and its fusion with the
    input (its "bottleneck") are left out, as APNB's fusion is: this is the context part.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        channels: int = 512,
        recurrence: int = 2,
        reduce_kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if recurrence < 1:
            raise ValueError(f"recurrence must be at least 1, got {recurrence}")
        self.recurrence = recurrence
        self.reduce = conv_bn_act(in_channels, channels, reduce_kernel_size, bias=False)
        self.query = Projection(channels, max(channels // 8, 1), norm=False, act=False)
        self.key = Projection(channels, max(channels // 8, 1), norm=False, act=False)
        self.value = Projection(channels, channels, norm=False, act=False)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        grid = to_tokens(self.reduce(x)).unflatten(1, x.shape[-2:])  # (B, H, W, C), a view
        for _ in range(self.recurrence):  # shared weights: R passes of the same attention
            grid = self.attend(grid)
        return grid.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last

    def attend(self, grid: Tensor) -> Tensor:
        """One criss-cross pass on a (B, H, W, C) grid."""
        H, W = grid.shape[1:3]
        q, k, v = (t.unflatten(1, (H, W)) for t in
                   project_together(grid.flatten(1, 2), self.query, self.key, self.value))  # (B, H, W, c)
        column = q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3)  # (B, W, H, H): (i, w) . (h, w)
        own = torch.eye(H, dtype=torch.bool, device=grid.device)
        column = column.masked_fill(own, float("-inf"))  # i itself is counted in its row
        row = q @ k.transpose(2, 3)  # (B, H, W, W)
        weights = torch.cat([column.transpose(1, 2), row], dim=-1).softmax(dim=-1)  # (B, H, W, H + W)
        from_column, from_row = weights.split([H, W], dim=-1)
        context = (from_column.transpose(1, 2) @ v.transpose(1, 2)).transpose(1, 2) + from_row @ v  # (B, H, W, C)
        return self.gamma * context + grid
