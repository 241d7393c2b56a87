"""mmsegmentation's ANN segmentor re-stated for the tests, independently of annseg.

Written from mmseg's module structure (ResNetV1c, ANNHead with AFNB/APNB built from
SelfAttentionBlock + PPMConcat, FCNHead, ConvModule), so that ``state_dict()`` has mmseg's
exact key names and shapes, and ``forward`` computes what mmseg computes: the value is
projected at every position and then pooled, attention is an explicit softmax(QK^T/sqrt(C))V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvModule(nn.Module):
    """mmcv ConvModule with a norm: conv (no bias) -> bn -> optional ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, padding: int = 0, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.act else x


class PPMConcat(nn.ModuleList):
    def __init__(self, scales: tuple[int, ...]) -> None:
        super().__init__([nn.AdaptiveAvgPool2d(s) for s in scales])

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([pool(x).view(*x.shape[:2], -1) for pool in self], dim=2)


class SelfAttentionBlock(nn.Module):
    def __init__(self, key_in: int, query_in: int, channels: int, out: int, share: bool, scales: tuple[int, ...]) -> None:
        super().__init__()
        self.channels = channels
        self.key_project = ConvModule(key_in, channels, 1)
        self.query_project = self.key_project if share else ConvModule(query_in, channels, 1)
        self.value_project = nn.Conv2d(key_in, channels, 1)
        self.out_project = nn.Conv2d(channels, out, 1)
        self.key_downsample = PPMConcat(scales)

    def forward(self, query_feats: Tensor, key_feats: Tensor) -> Tensor:
        b, _, h, w = query_feats.shape
        query = self.query_project(query_feats).flatten(2).permute(0, 2, 1)  # (B, N, C)
        key = self.key_downsample(self.key_project(key_feats))  # (B, C, S)
        value = self.key_downsample(self.value_project(key_feats)).permute(0, 2, 1)  # (B, S, C)
        sim = F.softmax(self.channels ** -0.5 * torch.matmul(query, key), dim=-1)
        context = torch.matmul(sim, value).permute(0, 2, 1).reshape(b, -1, h, w)
        return self.out_project(context)


class AFNB(nn.Module):
    def __init__(self, low: int, high: int, channels: int, out: int, scales: tuple[int, ...]) -> None:
        super().__init__()
        self.stages = nn.ModuleList([SelfAttentionBlock(low, high, channels, out, False, scales)])
        self.bottleneck = ConvModule(out + high, out, 1, act=False)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        context = torch.stack([stage(high, low) for stage in self.stages]).sum(0)
        return self.bottleneck(torch.cat([context, high], 1))


class APNB(nn.Module):
    def __init__(self, c: int, channels: int, scales: tuple[int, ...]) -> None:
        super().__init__()
        self.stages = nn.ModuleList([SelfAttentionBlock(c, c, channels, c, True, scales)])
        self.bottleneck = ConvModule(2 * c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        context = torch.stack([stage(x, x) for stage in self.stages]).sum(0)
        return self.bottleneck(torch.cat([context, x], 1))


class ANNHead(nn.Module):
    def __init__(self, num_classes: int, channels: int, project: int, scales: tuple[int, ...] = (1, 3, 6, 8)) -> None:
        super().__init__()
        self.fusion = AFNB(1024, 2048, project, 2048, scales)
        self.bottleneck = ConvModule(2048, channels, 3, padding=1)
        self.context = APNB(channels, project, scales)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        x = self.bottleneck(self.dropout(self.fusion(low, high)))
        return self.conv_seg(self.dropout(self.context(x)))


class FCNHead(nn.Module):
    def __init__(self, num_classes: int, channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(ConvModule(1024, channels, 3, padding=1))
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


class Bottleneck(nn.Module):
    """ResNet 'pytorch' style: the stride is in the 3x3 conv."""

    def __init__(self, c_in: int, planes: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or c_in != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetV1c(nn.Module):
    """Deep stem 3->32->32->64, strides (1, 2, 1, 1), dilations (1, 1, 2, 4), contract_dilation."""

    def __init__(self, depth: int = 50) -> None:
        super().__init__()
        blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        for index, (n, planes, stride, dilation) in enumerate(zip(blocks, (64, 128, 256, 512), (1, 2, 1, 1), (1, 1, 2, 4))):
            first = dilation // 2 if dilation > 1 else dilation  # contract_dilation
            layer = [Bottleneck(c_in, planes, stride, first)]
            layer += [Bottleneck(planes * 4, planes, 1, dilation) for _ in range(n - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*layer))
            c_in = planes * 4

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.layer2(self.layer1(self.maxpool(self.stem(x))))
        layer3 = self.layer3(x)
        return layer3, self.layer4(layer3)


class MmsegANN(nn.Module):
    """EncoderDecoder(ResNetV1c, ANNHead, FCNHead auxiliary): logits at the input's size."""

    def __init__(self, num_classes: int, channels: int = 512, project: int = 256, aux: int = 256, depth: int = 50) -> None:
        super().__init__()
        self.backbone = ResNetV1c(depth)
        self.decode_head = ANNHead(num_classes, channels, project)
        self.auxiliary_head = FCNHead(num_classes, aux)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        low, high = self.backbone(image)
        size = image.shape[-2:]
        main = F.interpolate(self.decode_head(low, high), size, mode="bilinear", align_corners=False)
        return main, F.interpolate(self.auxiliary_head(low), size, mode="bilinear", align_corners=False)


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics, so that every tensor matters to the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=generator) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(c, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                m.num_batches_tracked.fill_(1000)
    return module
