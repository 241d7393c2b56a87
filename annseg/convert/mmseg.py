"""mmsegmentation ANN checkpoints (``ann_r50-d8`` / ``ann_r101-d8``, any dataset) as annseg models.

mmseg's ANNHead is the paper's network with other settings, which ``MMSEG_OPTIONS`` selects:
no conv bias before BatchNorm, Dropout2d(0.1) after AFNB and before the classifier (where our
blocks end with their dropout), an FCN auxiliary head of 256 channels with Dropout2d(0.1),
bilinear upsampling with ``align_corners=False``. Its input is RGB with ImageNet mean/std,
annseg's default normalisation. The checkpoint's own config (``meta["cfg"]`` / ``meta["config"]``,
read by ``mmconfig`` without running it) overrides what it sets and must set nothing else
annseg's ANN does not compute. Its backbone, ResNetV1c with ``contract_dilation``, is timm's
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

from annseg.convert.common import build_converted, converted_meta, not_this_format, resolve_classes
from annseg.convert.mmconfig import ABSENT, parse_config_text, setting
from annseg.data.transforms import Normalization
from annseg.engine.config import ModelConfig
from annseg.models.ann import ANN
from annseg.models.backbones import openmmlab_resnet_to_timm
from annseg.models.weights import read_file, unwrap_state_dict
from annseg.models.zoo import MMSEG_OPTIONS

ANN_SIZES = (1, 3, 6, 8)  # ANN's (and mmseg's ANNHead's) default key_pool_scales
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


# mmseg settings that annseg's ANN computes with one value only: (dotted key, mmseg's default
# when the config leaves it out, the values annseg accepts). Lists compare as tuples.
_BATCH_NORMS = ("BN", "BN2d", "SyncBN", "MMSyncBN")  # the same function in eval mode
_FIXED: tuple[tuple[str, Any, tuple[Any, ...]], ...] = (
    ("model.type", "EncoderDecoder", ("EncoderDecoder",)),
    ("model.backbone.type", "ResNetV1c", ("ResNetV1c", "ResNet")),
    ("model.backbone.num_stages", 4, (4,)),
    ("model.backbone.strides", (1, 2, 2, 2), ((1, 2, 1, 1),)),
    ("model.backbone.dilations", (1, 1, 1, 1), ((1, 1, 2, 4),)),
    ("model.backbone.contract_dilation", False, (True,)),
    ("model.backbone.style", "pytorch", ("pytorch",)),
    ("model.backbone.avg_down", False, (False,)),
    ("model.backbone.multi_grid", None, (None,)),
    ("model.backbone.dcn", None, (None,)),
    ("model.backbone.plugins", None, (None,)),
    ("model.backbone.base_channels", 64, (64,)),
    ("model.backbone.norm_cfg.type", "BN", _BATCH_NORMS),
    ("model.decode_head.type", None, ("ANNHead",)),
    ("model.decode_head.in_index", -1, ((2, 3),)),
    ("model.decode_head.query_scales", (1,), ((1,),)),
    ("model.decode_head.conv_cfg", None, (None,)),
    ("model.decode_head.norm_cfg.type", None, _BATCH_NORMS),
    ("model.decode_head.act_cfg.type", "ReLU", ("ReLU",)),
)
_AUX_FIXED: tuple[tuple[str, Any, tuple[Any, ...]], ...] = (
    ("model.auxiliary_head.type", None, ("FCNHead",)),
    ("model.auxiliary_head.in_index", -1, (2,)),
    ("model.auxiliary_head.num_convs", 2, (1,)),
    ("model.auxiliary_head.kernel_size", 3, (3,)),
    ("model.auxiliary_head.dilation", 1, (1,)),
    ("model.auxiliary_head.concat_input", True, (False,)),
    ("model.auxiliary_head.conv_cfg", None, (None,)),
    ("model.auxiliary_head.norm_cfg.type", None, _BATCH_NORMS),
    ("model.auxiliary_head.act_cfg.type", "ReLU", ("ReLU",)),
)
# mmseg dataset classes -> annseg's datasets (mmseg's 60-class PascalContextDataset is not annseg's 59).
DATASET_TYPES = {"CityscapesDataset": "cityscapes", "ADE20KDataset": "ade20k", "PascalContextDataset59": "pascal_context"}
CONFIG_KEYS = ("cfg", "config")  # mmengine (mmseg 1.x) saves meta["cfg"], mmseg 0.x meta["config"]


def read_config(meta: Mapping[str, Any], source: str) -> tuple[dict[str, Any] | None, str | None]:
    """The training config mmseg saved in the checkpoint's meta, parsed safely, and where it was.

    (None, None) when the file holds none; an entry that is not config text is an error.
    """
    for key in CONFIG_KEYS:
        if key in meta:
            text = meta[key]
            if not isinstance(text, str):
                raise ValueError(f"{source}: meta[{key!r}] is a {type(text).__name__}, not the config text mmseg "
                                 "saves; annseg cannot read its settings")
            return parse_config_text(text, f"{source} (meta[{key!r}])"), f"meta[{key!r}]"
    return None, None


def infer_model(
    state: Mapping[str, Tensor], config: Mapping[str, Any] | None, source: str
) -> tuple[ModelConfig, int]:
    """The annseg model (backbone, widths, options) and class count an mmseg ANN checkpoint holds.

    Depth from layer3's block count, stem from its keys, widths from the weight shapes; the
    settings no weight shows (pooling sizes, dropout, align_corners) from the checkpoint's
    ``config`` (``read_config``), which must also agree with the weights and name nothing annseg cannot compute
    (``_FIXED``); without a config, mmseg's ANN defaults.
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ValueError(f"{source} has no {key!r}: it is not an mmseg ANN (ANNHead + FCNHead) checkpoint")
        return tuple(state[key].shape)

    config = config or {}
    _check_fixed(config, source)
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
    _agree(config, "model.backbone.depth", int(depths[len(blocks)]), "backbone layers", source)
    options: dict[str, Any] = dict(MMSEG_OPTIONS)
    options["head_channels"] = shape("decode_head.bottleneck.conv.weight")[0]
    options["key_channels"] = shape(f"{_AFNB}key_project.conv.weight")[0]
    options["value_channels"] = shape(f"{_AFNB}value_project.weight")[0]
    options["aux_channels"] = shape("auxiliary_head.convs.0.conv.weight")[0]
    num_classes = shape("decode_head.conv_seg.weight")[0]
    for key, value, what in (("decode_head.channels", options["head_channels"], "decode_head.bottleneck"),
                             ("decode_head.project_channels", options["key_channels"], "AFNB key_project"),
                             ("decode_head.project_channels", options["value_channels"], "AFNB value_project"),
                             ("decode_head.num_classes", num_classes, "decode_head.conv_seg"),
                             ("auxiliary_head.channels", options["aux_channels"], "auxiliary_head.convs.0"),
                             ("auxiliary_head.num_classes", num_classes, "auxiliary_head.conv_seg")):
        _agree(config, f"model.{key}", value, what, source)
    sizes = _tuple(setting(config, "model.decode_head.key_pool_scales", source, ANN_SIZES))
    if not sizes or not all(isinstance(v, int) and v > 0 for v in sizes):
        raise ValueError(f"{source}: its config's model.decode_head.key_pool_scales is {sizes}; expected positive ints")
    if sizes != ANN_SIZES:
        options["sizes"] = list(sizes)
    for key, option in (("dropout_ratio", "dropout"), ("align_corners", "align_corners")):
        value = setting(config, f"model.decode_head.{key}", source, options[option])
        aux = setting(config, f"model.auxiliary_head.{key}", source, value) if _has_aux(config, source) else value
        if aux != value:
            raise ValueError(f"{source}: its config sets decode_head.{key}={value!r} but auxiliary_head.{key}="
                             f"{aux!r}; annseg's ANN has one {option} option for both heads")
        options[option] = value
    return ModelConfig(backbone=backbone, variant="ann", options=options), num_classes


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _has_aux(config: Mapping[str, Any], source: str) -> bool:
    return isinstance(setting(config, "model.auxiliary_head", source, None), Mapping)


def _check_fixed(config: Mapping[str, Any], source: str) -> None:
    """Refuse a config that sets anything annseg's ANN does not compute, naming the setting and value."""
    if not config:
        return
    fixed = _FIXED + (_AUX_FIXED if _has_aux(config, source) else ())
    for key, default, accepted in fixed:
        value = _tuple(setting(config, key, source, ABSENT))
        if value is ABSENT and default not in accepted:
            given = f"does not set {key} (mmseg's default: {default!r})"
        elif value not in accepted and value is not ABSENT:
            given = f"sets {key}={value!r}"
        else:
            continue
        choices = " or ".join(repr(a) for a in accepted)
        raise ValueError(f"{source}: its config {given}; annseg converts only {choices}, so this network would "
                         "compute something else")


def _agree(config: Mapping[str, Any], key: str, expected: int, what: str, source: str) -> None:
    """The config's ``key`` (when set) must be what the weights show."""
    value = setting(config, key, source, expected)
    if value != expected:
        raise ValueError(f"{source}: its config sets {key}={value!r} but its {what} weights give {expected}; "
                         "the file's config and weights disagree")


def config_dataset(config: Mapping[str, Any] | None, source: str) -> str | None:
    """The mmseg dataset class the config trained on (``dataset_type``, else the test data's type)."""
    for key in ("dataset_type", "test_dataloader.dataset.type", "data.test.type"):
        try:
            value = setting(config or {}, key, source)
        except ValueError:
            continue  # an expression: another key may name it
        if isinstance(value, str):
            return value
    return None


def config_normalization(config: Mapping[str, Any] | None, source: str) -> Normalization:
    """annseg's mean/std (RGB in [0, 1]) from mmseg's data_preprocessor (1.x) or img_norm_cfg (0.x)."""
    config = config or {}
    for key, rgb_key, rgb_default in (("model.data_preprocessor", "bgr_to_rgb", False),
                                      ("data_preprocessor", "bgr_to_rgb", False), ("img_norm_cfg", "to_rgb", True)):
        values = setting(config, key, source)
        if isinstance(values, Mapping) and "mean" in values:
            if values.get(rgb_key, rgb_default) is not True:
                raise ValueError(f"{source}: its config sets {key}.{rgb_key}={values.get(rgb_key, rgb_default)!r}: "
                                 "the network was trained on BGR input; annseg converts RGB-input mmseg models")
            try:
                mean = tuple(round(float(v) / 255, 12) for v in values["mean"])
                std = tuple(round(float(v) / 255, 12) for v in values["std"])
            except (TypeError, KeyError):
                raise ValueError(f"{source}: its config's {key} mean/std are {values.get('mean')!r} / "
                                 f"{values.get('std')!r}; expected three numbers each") from None
            if len(mean) != 3 or len(std) != 3:
                raise ValueError(f"{source}: its config's {key} mean/std have {len(mean)}/{len(std)} values; "
                                 "expected 3 each (RGB)")
            return Normalization(mean, std)  # type: ignore[arg-type]
    return Normalization()


def load_mmseg_checkpoint(path: str | Path, dataset: str | None = None) -> tuple[ANN, dict[str, Any]]:
    """An mmseg ANN checkpoint as an annseg model (eval mode) and its metadata.

    The metadata is ``common.converted_meta``'s (``save_model`` writes both as an annseg checkpoint).
    Class names and colours come from the checkpoint (mmseg 0.x ``meta.CLASSES``/``PALETTE``,
    1.x ``meta.dataset_meta``), else from ``dataset`` or the class count (see
    ``resolve_classes``). The training config the file holds (``read_config``) gives the
    settings no weight shows, the input mean/std and the dataset (``dataset_type``), whose
    packaged config then sets the eval protocol; a setting annseg cannot compute or read is a
    ValueError naming it. Every tensor must find its place and every weight of the model
    must be given: otherwise a ValueError lists the keys left over on either side. A file
    of another kind is a ValueError saying what it looks like.
    """
    source = f"mmseg checkpoint {path}"
    content = read_file(path, "mmseg checkpoint")
    if isinstance(content, dict) and "annseg" in content:
        raise not_this_format(source, "an mmseg checkpoint", content)
    state = unwrap_state_dict(content, path, "mmseg checkpoint")
    if not any(k.startswith("decode_head.") for k in state):
        raise not_this_format(source, "an mmseg checkpoint (no decode_head weights)", content, state)
    meta = content.get("meta") if isinstance(content, dict) and isinstance(content.get("meta"), dict) else {}
    config, config_key = read_config(meta, source)
    model_config, num_classes = infer_model(state, config, source)
    normalization = config_normalization(config, source)
    named = config_dataset(config, source)
    known = DATASET_TYPES.get(named) if named else None
    if dataset is not None and known is not None and dataset != known:
        raise ValueError(f"{source} was trained on {named} (its config's dataset) but --dataset is {dataset!r}; "
                         f"leave out --dataset or give {known!r}")
    dataset_meta = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), dict) else {}
    classes = meta.get("CLASSES", dataset_meta.get("classes"))
    palette = meta.get("PALETTE", dataset_meta.get("palette"))
    dataset, classes, palette = resolve_classes(num_classes, dataset or known, classes, palette, source,
                                                infer=named is None)
    model = build_converted(model_config, num_classes, mmseg_to_annseg(state, source), source)
    info = {"format": "mmseg", "path": str(path), "tensors": len(state), "config": config_key, "dataset_type": named}
    return model, converted_meta(model_config, dataset, classes, palette, info, normalization)
