"""DenseASPP (Yang et al., CVPR 2018): densely connected atrous convolutions."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DenseASPP(nn.Module):
    """Atrous 3x3 convolutions at growing rates, each reading the input and every earlier output.

    (B, C_in, H, W) -> (B, C_in + len(rates) * growth, H, W): the input and the outputs of
    all layers, concatenated (newest first, as the authors' code). Layer k reads the
    C_in + k * growth channels so far: BN -> ReLU -> 1x1 conv (-> reduce_channels) -> BN ->
    ReLU -> 3x3 conv with dilation ``rates[k]`` (-> growth) -> Dropout2d.

    Choices where the paper leaves them open:
    - widths: ``reduce_channels`` = 512 and ``growth`` = 128, the published DenseASPP-161
      model's (the paper ties them to its DenseNet backbone, not to a 2048-channel map);
    - every layer starts with BN -> ReLU. The authors' code skips the first layer's BN because
      its DenseNet backbone ends in one; this block may read any map, a ResNet's included;
    - convolutions have a bias, as in the authors' code; dropout 0.1 after each layer.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        rates: tuple[int, ...] = (3, 6, 12, 18, 24),
        reduce_channels: int = 512,
        growth: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            _atrous_layer(in_channels + k * growth, reduce_channels, growth, rate, dropout)
            for k, rate in enumerate(rates)
        )
        self.out_channels = in_channels + len(rates) * growth

    def forward(self, x: Tensor) -> Tensor:
        features = x  # (B, C_in, H, W)
        for layer in self.layers:  # each layer sees the input and every earlier output
            features = torch.cat([layer(features), features], dim=1)  # (B, C_in + (k+1) growth, H, W)
        return features


def _atrous_layer(in_channels: int, reduce_channels: int, growth: int, rate: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, reduce_channels, 1),
        nn.BatchNorm2d(reduce_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(reduce_channels, growth, 3, padding=rate, dilation=rate),
    ]
    if dropout > 0:
        layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)
