"""The authors' ANN checkpoints (github.com/MendelXu/ANN) as annseg models computing the same function.

Their network, read from their code (``models/seg/nets/annn.py``, ``models/seg/utils/afnb.py``,
``models/seg/utils/apnb.py``, ``hypes/seg/*/fs_annn_*_seg.json``) — verified:
- ``backbone`` (deepbase_resnet{50,101}_dilated8) -> AFNB ``fusion`` (one ``stages.0`` of
  ``f_query``/``f_key`` = conv + BNReLU, ``f_value``/``W`` = conv, pyramid (1, 3, 6, 8);
  ``conv_bn_dropout`` = conv + BN + Dropout2d) -> ``context`` = 3x3 conv + BNReLU + APNB (its
  ``f_query`` IS its ``f_key`` module, so their state dict holds both copies; fusion
  ``conv_bn_dropout`` = conv + BNReLU + Dropout2d) -> ``cls``; aux head ``dsn`` = 3x3 conv +
  BNReLU + Dropout2d + 1x1 conv on layer3; bilinear upsampling, align_corners=True. Every conv
  before a norm has a bias. This is annseg's ANN with its default options, block for block.
- ``ModuleHelper.BNReLU`` is ``Sequential(norm, nn.ReLU())`` (hence ``.1.0`` names); the
  configs use norm_type sync_batchnorm / encsync_batchnorm / batchnorm, all BatchNorm with the
  usual weight/bias/running_mean/running_var; no InPlaceABN (its leaky ReLU is commented out).
- Input: cv2 BGR uint8 values, ``(img / div_value - mean) / std`` with div_value 1, BGR mean
  (102.9801, 115.9465, 122.7717), std 1. A checkpoint saved by their runner carries this as
  ``config_dict["data"]["normalize"]`` and ``input_mode``; it is read from there when present.
  annseg feeds RGB in [0, 1] minus mean over std, so mean = their RGB mean * div / 255 and
  std = their std * div / 255 give the same tensor up to the channel order, and the first stem
  conv's input channels are flipped (BGR -> RGB).
- Checkpoints: ``{"config_dict", "state_dict", "runner_state"}``, keys with DataParallel's
  ``module.`` prefix; ``runner_state`` may hold numpy scalars, allowed when reading.
Read from torchcv/openseg-style code of the same family, not from their repository (not
available) — assumed: the deep stem is ``backbone.prefix.{conv1,bn1,conv2,bn2,conv3,bn3}``
(3->64->64->128; ``resinit`` is accepted too) with a ceil-mode 3x3 max-pool, Bottlenecks with
the stride on the 3x3 conv and a 1x1 conv + BN downsample, dilated by ``_nostride_dilate``
(layer3 dilation 2, layer4 4, first block of each half; multi_grid [1, 1, 1] or none): the
layout of timm's ``resnet{50,101}s`` at output stride 8; BatchNorm eps 1e-5.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from annseg.convert.common import build_converted, converted_meta, not_this_format, resolve_classes
from annseg.data.transforms import Normalization
from annseg.engine.config import ModelConfig
from annseg.models.ann import ANN
from annseg.models.weights import read_file, unwrap_state_dict

# Their hypes/seg/*/fs_annn_*_seg.json (all three datasets), used when the file has no config_dict.
THEIR_NORMALIZE = {"div_value": 1.0, "mean": [102.9801, 115.9465, 122.7717], "std": [1.0, 1.0, 1.0]}
# ResNet depth -> blocks per layer, and the annseg backbone with that stem.
DEPTHS = {(3, 4, 6, 3): "resnet50s", (3, 4, 23, 3): "resnet101s"}

# (their key prefix, annseg key prefix); a key takes the first pair whose prefix it starts with.
RENAMES: tuple[tuple[str, str], ...] = (
    ("backbone.prefix.conv1.", "backbone.body.conv1.0."),  # their named deep stem -> timm's Sequential
    ("backbone.prefix.bn1.", "backbone.body.conv1.1."),
    ("backbone.prefix.conv2.", "backbone.body.conv1.3."),
    ("backbone.prefix.bn2.", "backbone.body.conv1.4."),
    ("backbone.prefix.conv3.", "backbone.body.conv1.6."),
    ("backbone.prefix.bn3.", "backbone.body.bn1."),
    ("backbone.layer", "backbone.body.layer"),  # Bottlenecks: same names below layerN.M
    ("fusion.stages.0.f_query.0.", "afnb.query.conv."),
    ("fusion.stages.0.f_query.1.0.", "afnb.query.bn."),
    ("fusion.stages.0.f_key.0.", "afnb.key.conv."),
    ("fusion.stages.0.f_key.1.0.", "afnb.key.bn."),
    ("fusion.stages.0.f_value.", "afnb.value.conv."),
    ("fusion.stages.0.W.", "afnb.out.conv."),
    ("fusion.conv_bn_dropout.0.", "afnb.fuse.0."),
    ("fusion.conv_bn_dropout.1.", "afnb.fuse.1."),  # a plain norm: AFNB's fusion has no ReLU
    ("context.0.", "context.0."),
    ("context.1.0.", "context.1."),
    ("context.2.stages.0.f_key.0.", "apnb.key.conv."),
    ("context.2.stages.0.f_key.1.0.", "apnb.key.bn."),
    ("context.2.stages.0.f_value.", "apnb.value.conv."),
    ("context.2.stages.0.W.", "apnb.out.conv."),
    ("context.2.conv_bn_dropout.0.", "apnb.fuse.0."),
    ("context.2.conv_bn_dropout.1.0.", "apnb.fuse.1."),
    ("cls.", "classifier."),
    ("dsn.0.", "aux_head.0.0."),
    ("dsn.1.0.", "aux_head.0.1."),
    ("dsn.3.", "aux_head.1."),
)
STEM_CONV = "backbone.body.conv1.0.weight"  # the first conv, whose input channels are BGR in theirs
SHARED_QUERY = ("context.2.stages.0.f_query.", "context.2.stages.0.f_key.")  # APNB: one module, two names


def rename(key: str, direction: int = 1) -> str:
    """Their key -> annseg's (``direction=1``) or back (``-1``); keys no rule covers are unchanged."""
    for pair in RENAMES:
        source, target = pair[::direction]
        if key.startswith(source):
            return target + key[len(source):]
    return key


def load_authors_checkpoint(path: str | Path, dataset: str | None = None) -> tuple[ANN, dict[str, Any]]:
    """The authors' ANN checkpoint at ``path`` as an annseg model (eval mode) and its metadata.

    The metadata is ``common.converted_meta``'s (``save_model`` writes both): a config for
    ``ann_resnet{50,101}s`` with the head widths read from the weights and the input
    normalization that reproduces theirs, ``classes``, ``palette``, ``normalization``,
    ``converted_from``. ``dataset`` names the classes; by default the class count does
    (see ``resolve_classes``; the ``dataset`` of their training config would add nothing:
    annseg's datasets differ in class count).
    Raises ValueError naming the keys (their names) that do not match on either side.
    """
    source = f"authors' checkpoint {path}"
    with torch.serialization.safe_globals(_NUMPY_SCALARS):
        content = read_file(path, "authors' checkpoint")
    if isinstance(content, dict) and "annseg" in content:
        raise not_this_format(source, "an authors' ANN checkpoint", content)
    state = unwrap_state_dict(content, path, "authors' checkpoint")
    if not any(k.startswith(("cls.", "dsn.", "context.", "fusion.")) for k in state):
        raise not_this_format(source, "an authors' ANN checkpoint (no cls / dsn / context / fusion weights)",
                              content, state)
    config = content.get("config_dict") if isinstance(content, dict) else None
    training: dict[str, Any] = config if isinstance(config, dict) else {}
    _check_network(training, source)
    normalization = _normalization(training, source)
    tensors = len(state)
    _drop_shared_query(state, source)
    backbone, options, num_classes = _architecture(state, source)
    dataset, classes, palette = resolve_classes(num_classes, dataset, None, None, source)
    model_config = ModelConfig(backbone=backbone, variant="ann", options=options)
    model = build_converted(model_config, num_classes, _to_annseg(state, _input_mode(training), source), source,
                            file_key=partial(rename, direction=-1))
    info = {"format": "authors", "path": str(path), "tensors": tensors}
    return model, converted_meta(model_config, dataset, classes, palette, info, normalization)


def _to_annseg(state: dict[str, Tensor], input_mode: str, source: str) -> dict[str, Tensor]:
    """Their state dict in annseg's key names; for BGR input the stem conv takes RGB instead."""
    converted: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        name = rename(key.replace("backbone.resinit.", "backbone.prefix.", 1))  # openseg's name for the stem
        if name in converted:
            raise ValueError(f"{source}: its keys {origin[name]} and {key} both mean annseg's {name}; "
                             "a checkpoint of their annn network holds only one of them")
        converted[name], origin[name] = (value.flip(1) if name == STEM_CONV and input_mode == "BGR" else value), key
    return converted


def _drop_shared_query(state: dict[str, Tensor], source: str) -> None:
    """Remove APNB's ``f_query`` copies, which must equal ``f_key`` (the same module in their code)."""
    query, key = SHARED_QUERY
    for name in [k for k in state if k.startswith(query)]:
        twin = key + name[len(query):]
        if twin in state and not torch.equal(state[name], state[twin]):
            raise ValueError(f"{source}: {name} differs from {twin}; the authors' APNB shares one module for "
                             "query and key, so this checkpoint is not from their network")
        del state[name]


def _architecture(state: dict[str, Tensor], source: str) -> tuple[str, dict[str, int], int]:
    """annseg backbone name, ANN width options and class count, read from the weights' shapes."""
    needed = ("cls.weight", "context.0.weight", "context.2.stages.0.f_key.0.weight",
              "context.2.stages.0.f_value.weight", "dsn.0.weight")
    absent = [k for k in needed if k not in state]
    if absent:
        raise ValueError(f"{source} is not an authors' ANN checkpoint: no {', '.join(absent)} "
                         f"(it has e.g. {', '.join(sorted(state)[:5])})")
    blocks = tuple(len({k.split(".")[2] for k in state if k.startswith(f"backbone.layer{i}.")}) for i in range(1, 5))
    if blocks not in DEPTHS:
        raise ValueError(f"{source}: backbone layers have {blocks} blocks; annseg converts the deep-base "
                         f"ResNets {sorted(DEPTHS.values())} with {sorted(DEPTHS)}")
    options = {
        "head_channels": state["context.0.weight"].shape[0],
        "key_channels": state["context.2.stages.0.f_key.0.weight"].shape[0],
        "value_channels": state["context.2.stages.0.f_value.weight"].shape[0],
        "aux_channels": state["dsn.0.weight"].shape[0],
    }
    return DEPTHS[blocks], options, state["cls.weight"].shape[0]


def _check_network(training: dict[str, Any], source: str) -> None:
    """Refuse training configs whose network annseg's ANN does not compute."""
    network = training.get("network", {})
    name, backbone = network.get("model_name", "annn"), network.get("backbone", "deepbase_resnet101_dilated8")
    grid = network.get("multi_grid") or [1]
    if name != "annn" or not (backbone.startswith("deepbase_resnet") and backbone.endswith("_dilated8")) \
            or any(g != 1 for g in grid):
        raise ValueError(f"{source} was trained as network {name!r} with backbone {backbone!r} and multi_grid "
                         f"{network.get('multi_grid')}; annseg reproduces 'annn' on deepbase_resnet*_dilated8 "
                         "without multi-grid dilation only")


def _input_mode(training: dict[str, Any]) -> str:
    return training.get("data", {}).get("input_mode", "BGR")


def _normalization(training: dict[str, Any], source: str) -> Normalization:
    """annseg's mean/std (RGB, [0, 1] input) that give their network input exactly."""
    normalize = {**THEIR_NORMALIZE, **training.get("data", {}).get("normalize", {})}
    mode = _input_mode(training)
    if mode not in ("BGR", "RGB"):
        raise ValueError(f"{source}: input_mode {mode!r} in its config_dict; expected 'BGR' or 'RGB'")
    order = slice(None, None, -1) if mode == "BGR" else slice(None)
    scale = float(normalize["div_value"]) / 255.0
    mean = tuple(float(m) * scale for m in normalize["mean"][order])
    std = tuple(float(s) * scale for s in normalize["std"][order])
    return Normalization(mean, std)  # type: ignore[arg-type]


def _numpy_scalar_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` needs for numpy scalars (their ``runner_state``)."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtypes = [getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType", "Int32DType")
              if hasattr(np, "dtypes")]
    # Files written under numpy 1 name the scalar constructor numpy.core.multiarray.scalar.
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]


_NUMPY_SCALARS = _numpy_scalar_globals()
