"""PSANet's point-wise spatial attention (Zhao et al., ECCV 2018), bi-directional."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from annseg.layers.conv import Projection, to_map, to_tokens


class PointwiseSpatialAttention(nn.Module):
    """Every position predicts how much it collects from, and distributes to, every other.

    (B, C_in, h, w) -> (B, C_out, h, w) for maps up to ``size`` = (H, W). Two branches,
    collect and distribute, each with its own weights:

    - reduce: 1x1 conv -> BN -> ReLU, C_in -> ``channels``: x;
    - mask: 1x1 conv -> BN -> ReLU, then a 1x1 conv to (2H - 1)(2W - 1) channels: at each
      position i an over-complete mask with one value per relative offset;
    - at each position i, the h x w window of its mask centred on i gives a_ij = mask_i[j - i]
      for every position j (the authors' "psamask", here a strided view of the masks);
    - collect:    z_i = sum_j softmax_j(a_ij) x_j   (what i gathers from every j);
      distribute: z_j = sum_i softmax_i(a_ij) x_i   (what every i sends to j);

    then both z, concatenated, -> 1x1 conv -> BN -> ReLU, 2 ``channels`` -> C_out.

    Choices: the mask is normalised by a softmax over the N gathered values (the authors'
    ``psa_softmax``, with no further normalisation factor); it is predicted at the map's own
    resolution, as the paper defines it (the authors' code can also shrink the map 2x before
    the attention to save memory; not done here); ``channels`` = 512 and the 1x1 convs
    without bias, as the authors'. The fusion with the input (concat + 3x3 conv) is left out,
    as APNB's fusion is: this is the context part. The mask's width depends on ``size``, so the
    block is built for the largest map it will see.
    """

    def __init__(
        self,
        in_channels: int,
        size: tuple[int, int],
        out_channels: int | None = None,
        *,
        channels: int = 512,
    ) -> None:
        super().__init__()
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be the map's (height, width), got {size}")
        self.size = tuple(size)
        self.collect = _Branch(in_channels, channels, self.size)
        self.distribute = _Branch(in_channels, channels, self.size)
        self.out = Projection(2 * channels, in_channels if out_channels is None else out_channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h > self.size[0] or w > self.size[1]:
            raise ValueError(f"PointwiseSpatialAttention was built for maps up to {self.size[0]}x{self.size[1]}, "
                             f"got {h}x{w}; build it with size=({h}, {w}) or larger")
        tokens = to_tokens(x)  # (B, N, C_in)
        features, masks = self.collect(tokens, h, w)  # (B, N, C), (B, N, N): a_ij
        collected = masks.softmax(dim=2) @ features  # z_i = sum_j softmax_j(a_ij) x_j
        del features, masks  # one branch's N x N masks at a time
        features, masks = self.distribute(tokens, h, w)
        distributed = masks.softmax(dim=1).transpose(1, 2) @ features  # z_j = sum_i softmax_i(a_ij) x_i
        del features, masks
        return to_map(self.out(torch.cat([collected, distributed], dim=2)), h, w)  # (B, C_out, h, w)


def centred_window(masks: Tensor, size: tuple[int, int], height: int, width: int) -> Tensor:
    """(B, N, (2H-1)(2W-1)) masks of a height x width map -> (B, N, N): a_ij = mask_i[j - i].

    Position i = (a, b) reads its mask at offset (c - a, d - b) for every j = (c, d), i.e. at
    flat index (H - 1 + c - a)(2W - 1) + (W - 1 + d - b), (H, W) = ``size``. That index is
    linear in a, b, c and d, so the whole (a, b, c, d) table is one strided view of the masks:
    indexing without an index tensor, and no copy until it is laid out as (N, N).
    """
    H, W = size
    masks = masks.contiguous()
    M, mask_width = masks.shape[2], 2 * W - 1
    assert M == (2 * H - 1) * mask_width and height <= H and width <= W
    view = masks.as_strided(
        (masks.shape[0], height, width, height, width),
        (masks.stride(0), width * M - mask_width, M - 1, mask_width, 1),
        masks.storage_offset() + (H - 1) * mask_width + (W - 1),
    )
    return view.reshape(masks.shape[0], height * width, height * width)


class _Branch(nn.Module):
    """One direction of PSA: the reduced features and every position's gathered mask."""

    def __init__(self, in_channels: int, channels: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size
        self.reduce = Projection(in_channels, channels, bias=False)
        self.hidden = Projection(channels, channels, bias=False)
        self.mask = Projection(channels, (2 * size[0] - 1) * (2 * size[1] - 1), norm=False, act=False, bias=False)

    def forward(self, tokens: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """(B, N, C_in) -> features x (B, N, channels), masks a (B, N, N)."""
        features = self.reduce(tokens)
        masks = self.mask(self.hidden(features))  # (B, N, (2H-1)(2W-1)): the over-complete masks
        return features, centred_window(masks, self.size, height, width)
