"""mmsegmentation ANN checkpoints (``ann_r50-d8`` / ``ann_r101-d8``, any dataset) as annseg models.

mmseg's ANNHead is the paper's network with other settings, which ``MMSEG_OPTIONS`` selects:
no conv bias before BatchNorm, Dropout2d(0.1) after AFNB and before the classifier (where our
blocks end with their dropout), an FCN auxiliary head of 256 channels with Dropout2d(0.1),
bilinear upsampling with ``align_corners=False``. Its input is RGB with ImageNet mean/std,
annseg's default normalisation. Its backbone, ResNetV1c with ``contract_dilation``, is timm's
``resnet50c``/``resnet101c`` dilated to stride 8 (our ``resnet50``/``resnet101``).

Key names (mmseg -> annseg), written from mmseg's module structure:
- ``backbone.stem.*``/``backbone.layerN.*`` -> ``backbone.body.*`` (``openmmlab_resnet_to_timm``)
- ConvModule ``X.conv`` + ``X.bn`` -> our conv + BatchNorm; plain convs keep weight and bias
- ``decode_head.fusion.stages.0.{query,key,value,out}_project`` -> ``afnb.{query,key,value,out}``,
  ``decode_head.fusion.bottleneck`` -> ``afnb.fuse``
- ``decode_head.bottleneck`` -> ``context``
- ``decode_head.context.stages.0.*`` -> ``apnb.*``; its ``query_project`` IS its
  ``key_project`` (one shared module saved under both names): checked equal, read once
- ``decode_head.conv_seg`` -> ``classifier``; ``auxiliary_head.convs.0`` / ``.conv_seg`` -> ``aux_head``
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from annseg.convert.common import build_converted, converted_meta, resolve_classes
from annseg.engine.config import ModelConfig
from annseg.models.ann import ANN
from annseg.models.backbones import openmmlab_resnet_to_timm
from annseg.models.weights import read_file, unwrap_state_dict
from annseg.models.zoo import MMSEG_OPTIONS

_AFNB = "decode_head.fusion.stages.0."
_APNB = "decode_head.context.stages.0."
# mmseg ConvModule (conv without bias, BN, [ReLU]) -> our conv and our BatchNorm.
_CONV_MODULES = {
    f"{_AFNB}query_project": ("afnb.query.conv", "afnb.query.bn"),
    f"{_AFNB}key_project": ("afnb.key.conv", "afnb.key.bn"),
    "decode_head.fusion.bottleneck": ("afnb.fuse.0", "afnb.fuse.1"),
    "decode_head.bottleneck": ("context.0", "context.1"),
    f"{_APNB}key_project": ("apnb.key.conv", "apnb.key.bn"),
    "decode_head.context.bottleneck": ("apnb.fuse.0", "apnb.fuse.1"),
    "auxiliary_head.convs.0": ("aux_head.0.0", "aux_head.0.1"),
}
# mmseg plain nn.Conv2d (with bias) -> ours.
_CONVS = {
    f"{_AFNB}value_project": "afnb.value.conv",
    f"{_AFNB}out_project": "afnb.out.conv",
    f"{_APNB}value_project": "apnb.value.conv",
    f"{_APNB}out_project": "apnb.out.conv",
    "decode_head.conv_seg": "classifier",
    "auxiliary_head.conv_seg": "aux_head.1",
}
_PREFIXES = {
    **{f"{m}.conv.": f"{conv}." for m, (conv, _) in _CONV_MODULES.items()},
    **{f"{m}.bn.": f"{bn}." for m, (_, bn) in _CONV_MODULES.items()},
    **{f"{m}.": f"{conv}." for m, conv in _CONVS.items()},
}
_SHARED = f"{_APNB}query_project."  # the same module as {_APNB}key_project.


def mmseg_to_annseg(state: Mapping[str, Tensor], source: str = "mmseg checkpoint") -> dict[str, Tensor]:
    """An mmseg ANN state dict with annseg's key names. Keys it does not know keep their
    name (the strict load then lists them); APNB's shared query/key must be equal."""
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(_SHARED):
            twin = f"{_APNB}key_project." + key[len(_SHARED):]
            if twin in state and not torch.equal(state[twin], value):
                raise ValueError(f"{source}: {key} differs from {twin}; mmseg's APNB shares one module as query "
                                 "and key, so this is not an mmseg ANNHead checkpoint")
            if twin in state:
                continue
        if key.startswith("backbone."):
            body = openmmlab_resnet_to_timm({key.removeprefix("backbone."): value})
            renamed.update({f"backbone.body.{k}": v for k, v in body.items()})
            continue
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        renamed[key if prefix is None else _PREFIXES[prefix] + key[len(prefix):]] = value
    return renamed


def infer_model(state: Mapping[str, Tensor], meta: Mapping[str, Any], source: str) -> tuple[ModelConfig, int]:
    """The annseg model (backbone, widths) and class count an mmseg ANN state dict holds.

    Depth from layer3's block count, stem from its keys, widths from the weight shapes;
    the pooling sizes from the checkpoint's config text when it has one (no weights show them).
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ValueError(f"{source} has no {key!r}: it is not an mmseg ANN (ANNHead + FCNHead) checkpoint")
        return tuple(state[key].shape)

    blocks = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))}
    depths = {6: "50", 23: "101"}
    if len(blocks) not in depths:
        raise ValueError(f"{source}: backbone layer3 has {len(blocks)} blocks; annseg converts ResNet-50 (6) and "
                         "ResNet-101 (23) backbones")
    if "backbone.stem.0.weight" in state:
        if shape("backbone.stem.0.weight")[0] != 32:
            raise ValueError(f"{source}: deep stem of width {shape('backbone.stem.0.weight')[0]}; annseg's "
                             "ResNetV1c backbones have mmseg's default width 32")
        backbone = f"resnet{depths[len(blocks)]}"
    else:  # ResNetV1b: torchvision's plain 7x7 stem
        backbone = f"resnet{depths[len(blocks)]}v1b"
    options: dict[str, Any] = dict(MMSEG_OPTIONS)
    options["head_channels"] = shape("decode_head.bottleneck.conv.weight")[0]
    options["key_channels"] = shape(f"{_AFNB}key_project.conv.weight")[0]
    options["value_channels"] = shape(f"{_AFNB}value_project.weight")[0]
    options["aux_channels"] = shape("auxiliary_head.convs.0.conv.weight")[0]
    config_text = meta.get("config") if isinstance(meta.get("config"), str) else ""
    sizes = _tuple_setting(config_text, "key_pool_scales", source)
    if sizes is not None:
        options["sizes"] = list(sizes)
    if _tuple_setting(config_text, "query_scales", source) not in (None, (1,)):
        raise ValueError(f"{source}: its config sets query_scales other than (1,) (queries max-pooled); annseg's "
                         "ANN attends from every position")
    num_classes = shape("decode_head.conv_seg.weight")[0]
    return ModelConfig(backbone=backbone, variant="ann", options=options), num_classes


def _tuple_setting(config_text: str, name: str, source: str) -> tuple[int, ...] | None:
    """``name=(1, 3, 6, 8)`` in an mmseg config's text, None when it is absent."""
    found = {m.group(1) for m in re.finditer(rf"{name}\s*=\s*[(\[]([\d\s,]*)[)\]]", config_text)}
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"{source}: its config sets {name} to several values {sorted(found)}")
    return tuple(int(v) for v in found.pop().replace(",", " ").split())


def load_mmseg_checkpoint(path: str | Path, dataset: str | None = None) -> tuple[ANN, dict[str, Any]]:
    """An mmseg ANN checkpoint as an annseg model (eval mode) and its metadata.

    The metadata is ``common.converted_meta``'s (``save_model`` writes both as an annseg checkpoint).
    Class names and colours come from the checkpoint (mmseg 0.x ``meta.CLASSES``/``PALETTE``,
    1.x ``meta.dataset_meta``), else from ``dataset`` or the class count (see
    ``resolve_classes``). Every tensor must find its place and every weight of the model
    must be given: otherwise a ValueError lists the keys left over on either side.
    """
    source = f"mmseg checkpoint {path}"
    content = read_file(path, "mmseg checkpoint")
    state = unwrap_state_dict(content, path, "mmseg checkpoint")
    meta = content.get("meta") if isinstance(content, dict) and isinstance(content.get("meta"), dict) else {}
    model_config, num_classes = infer_model(state, meta, source)
    dataset_meta = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), dict) else {}
    classes = meta.get("CLASSES", dataset_meta.get("classes"))
    palette = meta.get("PALETTE", dataset_meta.get("palette"))
    dataset, classes, palette = resolve_classes(num_classes, dataset, classes, palette, source)
    model = build_converted(model_config, num_classes, mmseg_to_annseg(state, source), source)
    info = {"format": "mmseg", "path": str(path), "tensors": len(state)}
    return model, converted_meta(model_config, dataset, classes, palette, info)
