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

    def __init__(self, num_classes: int, channels: int = 512, project: int = 256, aux: int = 256, depth: int = 50,
                 scales: tuple[int, ...] = (1, 3, 6, 8)) -> None:
        super().__init__()
        self.backbone = ResNetV1c(depth)
        self.decode_head = ANNHead(num_classes, channels, project, scales)
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


def config_text(num_classes: int, channels: int = 512, project: int = 256, aux: int = 256, depth: int = 50,
                key_pool_scales: str = "(1, 3, 6, 8)", query_scales: str = "(1, )",
                dataset: str = "CityscapesDataset", **decode_head: str) -> str:
    """An mmseg 1.x config's ``pretty_text`` (what mmengine saves as ``meta["cfg"]``) for this network,
    laid out as mmengine formats ``configs/ann/ann_r50-d8_4xb2-40k_cityscapes-512x1024.py``.
    ``decode_head`` adds or replaces ANNHead settings, written as Python source."""
    head = {"type": "'ANNHead'", "in_channels": "[1024, 2048]", "in_index": "[2, 3]", "channels": str(channels),
            "project_channels": str(project), "query_scales": query_scales, "key_pool_scales": key_pool_scales,
            "dropout_ratio": "0.1", "num_classes": str(num_classes),
            "norm_cfg": "dict(type='SyncBN', requires_grad=True)", "align_corners": "False",
            "loss_decode": "dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)", **decode_head}
    fields = ",\n        ".join(f"{k}={v}" for k, v in head.items())
    preprocessor = ("type='SegDataPreProcessor'", "mean=[123.675, 116.28, 103.53]", "std=[58.395, 57.12, 57.375]",
                    "bgr_to_rgb=True", "pad_val=0", "seg_pad_val=255", "size=(512, 1024)")  # inlined in model too
    outer, inner = ",\n    ".join(preprocessor), ",\n        ".join(preprocessor)
    return f"""norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    {outer})
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(
        {inner}),
    pretrained='open-mmlab://resnet{depth}_v1c',
    backbone=dict(
        type='ResNetV1c',
        depth={depth},
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        dilations=(1, 1, 2, 4),
        strides=(1, 2, 1, 1),
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        norm_eval=False,
        style='pytorch',
        contract_dilation=True),
    decode_head=dict(
        {fields}),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=1024,
        in_index=2,
        channels={aux},
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes={num_classes},
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
dataset_type = '{dataset}'
data_root = 'data/cityscapes/'
crop_size = (512, 1024)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 1024), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
test_dataloader = dict(
    batch_size=1,
    num_workers=4,
    dataset=dict(
        type='{dataset}',
        data_root='data/cityscapes/',
        data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val'),
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='Resize', scale=(2048, 1024), keep_ratio=True),
            dict(type='LoadAnnotations'),
            dict(type='PackSegInputs')
        ]))
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0005))
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=4000))
launcher = 'pytorch'
work_dir = './work_dirs/ann_r{depth}-d8_4xb2-40k_cityscapes-512x1024'
"""
