"""Named configurations: ``create_model("ann_resnet101", num_classes=19)``."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable

import timm
import torch

from annseg.models.ann import ANN, VARIANTS
from annseg.models.backbones import RESNETS, TIMM_PREFIX

# Zoo names are ``{variant}_{backbone}``: every variant on each of annseg's ResNets (the
# paper's backbones, names in backbones.RESNETS), and the full ANN on a few timm CNNs that
# timm dilates to stride 8, named without the ``timm:`` of their backbone spelling.
TIMM_MODELS = ("convnext_tiny", "efficientnet_b0", "mobilenetv3_large_100", "regnety_008")
MODELS: dict[str, Callable[..., ANN]] = {
    f"{variant}_{name}": partial(ANN, backbone=name, variant=variant) for variant in VARIANTS for name in RESNETS
} | {f"ann_{name}": partial(ANN, backbone=TIMM_PREFIX + name, variant="ann") for name in TIMM_MODELS}
# The options under which an ANN computes mmsegmentation's ANNHead + FCNHead (docs/method.md,
# "Where the authors' code and mmsegmentation differ"): no conv bias before BN, dropout 0.1
# (our blocks end with it, where mmseg drops after AFNB and before the classifier), a
# 256-channel auxiliary head, align_corners=False. mmseg's input normalisation (RGB, ImageNet
# mean/std) is our default.
MMSEG_OPTIONS: dict[str, Any] = {"conv_bias": False, "dropout": 0.1, "aux_channels": 256, "align_corners": False}
_OPTIONS = set(inspect.signature(ANN).parameters) - {"num_classes", "backbone_weights", "backbone", "variant"}


def list_models() -> list[str]:
    """The named models of ``create_model``, sorted (it also takes ``{variant}_timm:NAME``)."""
    return sorted(MODELS)


def create_model(
    name: str, num_classes: int = 19, backbone_weights: str | Path | None = None, **options: Any
) -> ANN:
    """Build a named model; ``options`` are ANN's keyword arguments (e.g. ``sizes=(1, 3)``).

    Besides ``list_models()``, ``{variant}_timm:NAME`` (``ann_timm:convnext_small``) puts a
    variant on any timm backbone: the name a config's ``{variant}_{backbone}`` spells.
    """
    variant, _, backbone = name.partition("_")
    if name in MODELS:
        build = MODELS[name]
    elif variant in VARIANTS and backbone.startswith(TIMM_PREFIX):
        build = partial(ANN, backbone=backbone, variant=variant)
    else:
        bare = variant in VARIANTS and timm.is_model(backbone)  # a timm name without its timm: (convnext_atto)
        hint = f"; for timm's {backbone!r} write '{variant}_{TIMM_PREFIX}{backbone}'" if bare else ""
        raise ValueError(f"unknown model {name!r}{hint}; choose from {sorted(MODELS)}, or {{variant}}_timm:NAME for any "
                         f"timm backbone (e.g. 'ann_timm:convnext_small'), variant one of {list(VARIANTS)}")
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {name!r}; valid options: {sorted(_OPTIONS)}")
    return build(num_classes=num_classes, backbone_weights=backbone_weights, **options)


def parameter_count(name: str, num_classes: int = 19, **options: Any) -> int:
    """The parameters of ``create_model(name, num_classes, **options)``, from shapes alone.

    Built on the meta device with the initialisers of ``torch.nn.init`` skipped: no memory is
    taken and no random numbers drawn, which makes ``annseg models`` quick (the counts equal
    those of the built models; a test checks it).
    """
    with _initialisers_skipped(), torch.device("meta"):
        model = create_model(name, num_classes=num_classes, **options)
    return sum(p.numel() for p in model.parameters())


@contextmanager
def _initialisers_skipped() -> Iterator[None]:
    """``torch.nn.init``'s in-place initialisers as no-ops for the block (restored after it)."""
    names = [n for n in vars(torch.nn.init) if n.endswith("_") and not n.startswith("_")
             and callable(getattr(torch.nn.init, n))]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, function in saved.items():
            setattr(torch.nn.init, n, function)
