"""Backbones through timm: the last two feature levels, dilated to output stride 8 or 16.

A backbone is named by annseg's ResNet names (``RESNETS``: the paper's stems, with the same
meaning in ``ANN``, the model zoo and the config) or, for any other timm model, ``timm:NAME``
(e.g. ``timm:convnext_tiny``), which means exactly timm's ``NAME``. Weights come only from a
local file the user names; nothing is ever downloaded (timm's ``pretrained`` is always off).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import timm
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from annseg.models.weights import load_exactly, read_state_dict

# annseg's backbone names -> timm's. Plain names use mmseg's ResNetV1c deep stem (timm 'c',
# 3->32->32->64), 's' the authors' deep-base stem (3->64->64->128, whose 3x3 max-pool rounds
# up: ceil mode), 'v1b' (mmseg's name) torchvision's plain 7x7 stem, so that torchvision
# ImageNet weights have a home; ResNet-18 keeps the plain stem.
RESNETS: dict[str, str] = {
    "resnet18": "resnet18",
    "resnet50": "resnet50c",
    "resnet50s": "resnet50s",
    "resnet50v1b": "resnet50",
    "resnet101": "resnet101c",
    "resnet101s": "resnet101s",
    "resnet101v1b": "resnet101",
}
CEIL_MODE_STEMS = ("resnet50s", "resnet101s")  # annseg names: the authors' max-pool rounds up
TIMM_PREFIX = "timm:"
OUTPUT_STRIDES = (8, 16)


def resolve_backbone(name: str) -> str:
    """The timm model that the backbone ``name`` means, or a ValueError that names it.

    ``name`` is one of annseg's ResNet names (``RESNETS``) or ``timm:NAME`` for any timm model.
    A bare timm name that is not annseg's (``convnext_tiny``) is refused with the spelling to
    use, so that a spelling never means two networks (annseg's ``resnet50`` is timm's ``resnet50c``).
    """
    if not isinstance(name, str):
        raise TypeError(f"backbone must be a str, got {type(name).__name__} {name!r}")
    if name in RESNETS:
        return RESNETS[name]
    if name.startswith(TIMM_PREFIX):
        timm_name = name.removeprefix(TIMM_PREFIX)
        if not timm.is_model(timm_name):
            close = difflib.get_close_matches(timm_name, timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
            raise ValueError(f"unknown backbone {name!r}: timm {timm.__version__} has no model {timm_name!r}"
                             f" (timm.list_models() lists them){hint}")
        return timm_name
    if timm.is_model(name):
        same = [ours for ours, theirs in RESNETS.items() if theirs == name]
        also = f" (annseg's {same[0]!r} is that network)" if same else ""
        hint = f"; for timm's {name!r} write {TIMM_PREFIX + name!r}{also}"
    else:
        hint = ""
    raise ValueError(f"unknown backbone {name!r}; annseg's backbones are {sorted(RESNETS)} and any other "
                     f"timm model is written 'timm:NAME' (e.g. 'timm:convnext_tiny'){hint}")


class Backbone(nn.Module):
    """A timm model's last two feature levels, dilated to ``output_stride`` (8 or 16).

    ``forward(image)`` returns ``[low, high]`` (for a ResNet: layer3, layer4); ``channels``
    and ``strides`` say what each one is, e.g. (1024, 2048) and (8, 8) for ResNet-50/101 at
    output stride 8. ``body`` is timm's ``features_only`` model.
    """

    def __init__(self, name: str = "resnet101", weights: str | Path | None = None, output_stride: int = 8) -> None:
        super().__init__()
        self.timm_name = resolve_backbone(name)
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES} (8: dilated, the paper's; 16: faster), "
                             f"got {output_stride!r}")
        self.name = name
        self.body = _features(name, self.timm_name, output_stride)
        if name in CEIL_MODE_STEMS:
            self.body.maxpool.ceil_mode = True
        self.channels: tuple[int, ...] = tuple(self.body.feature_info.channels())
        self.strides: tuple[int, ...] = tuple(self.body.feature_info.reduction())
        if self.strides[-1] != output_stride:
            raise ValueError(f"backbone {name!r} cannot run at output stride {output_stride}: timm's {self.timm_name!r} "
                             f"accepts output_stride but gives features at strides {self.strides}. Choose a "
                             "backbone timm can dilate (ResNets, ConvNeXt, EfficientNet, RegNet, MobileNetV3, ...)")
        if weights is not None:
            load_backbone_weights(self, weights)

    def forward(self, image: Tensor) -> list[Tensor]:
        return self.body(image)

    def checkpointed(self, image: Tensor, context: Callable[[], ContextManager] = nullcontext) -> list[Tensor]:
        """``forward`` whose stages keep only their inputs: activations are recomputed in the backward.

        Each of timm's stages (its top-level ``nn.Sequential`` children: layer1 ... layer4 and a
        deep stem's convs for a ResNet) runs under ``torch.utils.checkpoint``; the few modules
        between them run as usual. The BatchNorms' running statistics are restored after the
        recomputation, so they are updated once per step as without checkpointing. Every stage
        runs, and is recomputed, inside a fresh ``context()`` (the network's conv paths), so
        the recomputation computes what the forward did.
        """
        features, x = [], image
        wanted = set(self.body.return_layers) if hasattr(self.body, "return_layers") else None
        if wanted is None:
            raise ValueError(f"backbone {self.name!r}: timm's {type(self.body).__name__} cannot be checkpointed by stage")
        for name, stage in self.body.items():
            if isinstance(stage, (nn.Sequential, nn.ModuleList)) and any(True for _ in stage.parameters()):
                x = checkpoint(stage, x, use_reentrant=False, context_fn=partial(_recompute_context, stage, context))
            else:
                with context():
                    x = stage(x)
            if name in wanted:
                features.append(x)
        return features


def _features(name: str, timm_name: str, output_stride: int) -> nn.Module:
    """timm's features_only model of the last two levels at ``output_stride``, or a ValueError saying why not."""
    try:
        return timm.create_model(timm_name, pretrained=False, features_only=True, out_indices=(-2, -1),
                                 output_stride=output_stride)
    except TypeError as error:
        if "output_stride" not in str(error):
            raise ValueError(f"backbone {name!r}: timm cannot build {timm_name!r} as a feature extractor: {error}") from None
        raise ValueError(
            f"backbone {name!r} cannot be dilated to output stride {output_stride}: timm's {timm_name!r} has no "
            f"output_stride option ({error}), so its features would stay at their native strides and ANN's "
            "output would be coarser than asked. Choose a backbone timm can dilate (ResNets, ConvNeXt, "
            "EfficientNet, RegNet, MobileNetV3, ...)"
        ) from None
    except Exception as error:  # timm raises RuntimeError/KeyError/... by model
        raise ValueError(f"backbone {name!r}: timm cannot build {timm_name!r} as a dilated feature extractor "
                         f"(features_only, output stride {output_stride}): {type(error).__name__}: {error}") from None


def load_backbone_weights(backbone: Backbone, path: str | Path) -> None:
    """Load a state dict of the whole timm model strictly into ``backbone``'s feature extractor.

    The file holds the keys of timm's model (``timm.create_model(NAME).state_dict()``); the
    classifier and any other part the feature extractor drops (e.g. a head conv) are ignored,
    every other key must be there with its shape, and no key may be foreign. ResNets also load
    from torchvision (same key names) and OpenMMLab (mmpretrain / mmcv ResNetV1c, or a whole
    mmseg model): with ``backbone.*`` keys only those are read, and the deep stem's ``stem.*``
    keys are renamed to timm's, as are those of the authors' deep-base stem (``conv1`` ...
    ``bn3``). A file that fits another of annseg's ResNets says which (``resnet_in_state_dict``).
    """
    state = read_state_dict(path, "backbone weights")
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    if backbone.name in RESNETS:
        state = openmmlab_resnet_to_timm(deep_base_resnet_to_timm(state))
    hint = f"Pass a state dict of timm's {backbone.timm_name!r}"
    if backbone.name in RESNETS:
        hint += ", torchvision or OpenMMLab whose stem and depth match the backbone."
        held = resnet_in_state_dict(state)
        if held is not None and held[0] != backbone.name:
            hint = f"The file holds {held[1]}: use backbone {held[0]!r} (--set model.backbone={held[0]}), or {hint[0].lower()}{hint[1:]}"
    to_model, ignored = _timm_key_names(backbone)
    state = {to_model.get(k, k): v for k, v in state.items() if k not in ignored}
    to_timm = {ours: theirs for theirs, ours in to_model.items()}
    load_exactly(backbone.body, state, f"backbone weights {path}", f"timm {backbone.timm_name!r}", hint=hint,
                 names=lambda key: to_timm.get(key, key))


# (blocks per stage, bottleneck blocks) -> depth of the standard ResNets
_RESNET_DEPTHS = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
                  ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}
# the stem, as timm's name suffix ("" for the plain stem), in words
_STEMS = {"plain": "the plain 7x7 stem (timm / torchvision resnetNN)",
          "c": "the deep stem 3->32->32->64 (OpenMMLab ResNetV1c, timm resnetNNc)",
          "s": "the deep-base stem 3->64->64->128 (the authors' resnetNN-deep, timm resnetNNs)"}


def resnet_in_state_dict(state: Mapping[str, Tensor]) -> tuple[str, str] | None:
    """The backbone that fits a ResNet state dict with timm's key names, read from its stem and
    block counts: ``(name, description)``, e.g. ``("resnet50v1b", "a ResNet-50 with the plain 7x7
    stem ...")``. The name is annseg's where it has one, else ``timm:resnetNN``. None when the
    file is no standard ResNet.

    The stem's first conv tells the three apart: ``conv1.weight`` 7x7 is the plain stem,
    ``conv1.0.weight`` (32, 3, 3, 3) the ResNetV1c deep stem, (64, 3, 3, 3) the deep-base stem.
    """
    if "conv1.weight" in state and state["conv1.weight"].shape[-2:] == (7, 7):
        stem = "plain"
    elif "conv1.0.weight" in state and tuple(state["conv1.0.weight"].shape) in ((32, 3, 3, 3), (64, 3, 3, 3)):
        stem = "c" if state["conv1.0.weight"].shape[0] == 32 else "s"
    else:
        return None
    blocks = tuple(1 + max((int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.") and k.split(".")[1].isdigit()),
                           default=-1) for i in range(1, 5))
    depth = _RESNET_DEPTHS.get((blocks, "layer1.0.conv3.weight" in state))
    if depth is None:
        return None
    ours = [name for name, theirs in RESNETS.items() if theirs == f"resnet{depth}{'' if stem == 'plain' else stem}"]
    name = ours[0] if ours else f"{TIMM_PREFIX}resnet{depth}{'' if stem == 'plain' else stem}"
    if not ours and not timm.is_model(name.removeprefix(TIMM_PREFIX)):
        return None
    return name, f"a ResNet-{depth} with {_STEMS[stem].replace('NN', str(depth))}"


def _timm_key_names(backbone: Backbone) -> tuple[dict[str, str], set[str]]:
    """(timm model key -> feature extractor key, the timm model's keys the extractor drops).

    The whole model is built on the meta device (no memory, no initialisation) to read its
    key names. timm's feature extractors keep the model's names, except that a top-level
    Sequential's children are lifted into the extractor (``stages.0`` becomes ``stages_0``).
    """
    with torch.device("meta"):
        whole = timm.create_model(backbone.timm_name, pretrained=False)
    ours = {key.replace(".", "_"): key for key in backbone.body.state_dict()}
    to_model = {theirs: ours[theirs.replace(".", "_")] for theirs in whole.state_dict() if theirs.replace(".", "_") in ours}
    if len(to_model) != len(ours):  # a feature extractor that renames otherwise (none of the dilatable ones)
        raise ValueError(f"backbone {backbone.name!r}: annseg cannot match the keys of timm's {backbone.timm_name!r} "
                         "feature extractor to the model's state dict, so it cannot load weights for it")
    ignored = set(whole.state_dict()) - set(to_model)
    classifier = whole.pretrained_cfg.get("classifier") or ()
    for prefix in (classifier,) if isinstance(classifier, str) else classifier:  # any class count, or none
        ignored |= {k for k in whole.state_dict() if k.startswith(f"{prefix}.")}
    return to_model, ignored


# OpenMMLab's deep stem is one Sequential: conv, BN, ReLU three times. timm keeps the first
# two convs' BNs inside ``conv1`` and names the last BN ``bn1``.
_STEM_TO_TIMM = {"stem.0.": "conv1.0.", "stem.1.": "conv1.1.", "stem.3.": "conv1.3.", "stem.4.": "conv1.4.",
                 "stem.6.": "conv1.6.", "stem.7.": "bn1."}


# The authors' deep-base ResNet (and PSPNet's / CCNet's ImageNet files) names its stem's
# three conv + BN pairs at the top level: conv1 bn1 conv2 bn2 conv3 bn3.
_DEEP_BASE_TO_TIMM = {"conv1.": "conv1.0.", "bn1.": "conv1.1.", "conv2.": "conv1.3.", "bn2.": "conv1.4.",
                      "conv3.": "conv1.6.", "bn3.": "bn1."}


def deep_base_resnet_to_timm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A deep-base ResNet with the stem named ``conv1 bn1 conv2 bn2 conv3 bn3`` in timm's names
    (a top-level ``conv3.weight`` marks it: timm's and torchvision's have none); others unchanged."""
    if "conv3.weight" not in state:
        return dict(state)
    renamed = {}
    for key, value in state.items():
        prefix = next((p for p in _DEEP_BASE_TO_TIMM if key.startswith(p)), None)
        renamed[key if prefix is None else _DEEP_BASE_TO_TIMM[prefix] + key[len(prefix):]] = value
    return renamed


def openmmlab_resnet_to_timm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """OpenMMLab ResNet key names (ResNetV1c ``stem.*``, ``layerN.M.*``) as timm's.

    The residual layers already have timm's names (``conv1``/``bn1``..., ``downsample.0/1``);
    keys that fit neither stay as they are, for the strict loader to report.
    """
    renamed = {}
    for key, value in state.items():
        prefix = next((p for p in _STEM_TO_TIMM if key.startswith(p)), None)
        renamed[key if prefix is None else _STEM_TO_TIMM[prefix] + key[len(prefix):]] = value
    return renamed


def _recompute_context(stage: nn.Module, context: Callable[[], ContextManager]) -> tuple:
    """``checkpoint``'s contexts: the forward in ``context()``; the recomputation in it too, without
    running-statistics updates."""
    return context(), _recomputing(stage, context)


@contextmanager
def _recomputing(stage: nn.Module, context: Callable[[], ContextManager]) -> Iterator[None]:
    with _frozen_statistics(stage), context():
        yield


@contextmanager
def _frozen_statistics(stage: nn.Module) -> Iterator[None]:
    """The recomputation normalises as the forward did; the BatchNorms' running statistics and
    batch counts it updates are put back afterwards (the forward already updated them)."""
    buffers = [b for m in stage.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)
