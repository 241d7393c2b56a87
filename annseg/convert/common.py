"""What every converter of a published checkpoint shares: classes, config, strict loading.

A converter renames a foreign state dict to annseg's keys and infers the model's options
from the tensor shapes; this module turns that into a ready model and the metadata of an
ordinary annseg checkpoint (``engine.checkpoint.save_model`` writes both).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from annseg.data.meta import generated_palette
from annseg.data.transforms import Normalization
from annseg.engine.builders import build_model
from annseg.engine.checkpoint import model_meta
from annseg.engine.config import Config, DataConfig, ModelConfig, load_config
from annseg.models.ann import ANN
from annseg.models.weights import load_exactly

# The datasets whose classes annseg knows, by class count (the count a classifier's shape gives).
DATASET_BY_CLASSES = {19: "cityscapes", 150: "ade20k", 59: "pascal_context"}


def known_datasets() -> dict[str, Any]:
    """Dataset name -> its class (with ``classes`` and ``palette``), for the known ones."""
    from annseg.data import DATASETS

    return {name: DATASETS[name] for name in DATASET_BY_CLASSES.values()}


def resolve_classes(
    num_classes: int,
    dataset: str | None,
    classes: Sequence[str] | None,
    palette: Sequence[Sequence[int]] | None,
    source: str,
    infer: bool = True,
) -> tuple[str | None, list[str], list[list[int]]]:
    """(dataset, class names, palette) for a converted model of ``num_classes`` classes.

    Names and colours come from the checkpoint (``classes``/``palette``) when it has them,
    else from ``dataset``, else (with ``infer``: the file names no other dataset) from the
    dataset ``num_classes`` suggests (19 Cityscapes, 150 ADE20K, 59 PASCAL Context), else
    they are generic ``class_i`` with generated colours.
    """
    datasets = known_datasets()
    if dataset is not None:
        if dataset not in datasets:
            raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(datasets)}")
        if len(datasets[dataset].classes) != num_classes:
            raise ValueError(f"{source} classifies {num_classes} classes but dataset {dataset!r} has "
                             f"{len(datasets[dataset].classes)}; leave out the dataset or pick the right one")
    dataset = dataset or (DATASET_BY_CLASSES.get(num_classes) if infer else None)
    if classes is not None and len(classes) != num_classes:
        raise ValueError(f"{source} names {len(classes)} classes in its metadata but its classifier has "
                         f"{num_classes} outputs")
    if classes is None and dataset is not None:
        classes, palette = datasets[dataset].classes, palette or datasets[dataset].palette
    if classes is None:
        classes = [f"class_{i}" for i in range(num_classes)]
    if palette is None or len(palette) != num_classes:
        palette = generated_palette(num_classes)
    return dataset, [str(c) for c in classes], [[int(v) for v in colour] for colour in palette]


def converted_meta(
    model: ModelConfig,
    dataset: str | None,
    classes: list[str],
    palette: list[list[int]],
    source: dict[str, Any],
    normalization: Normalization = Normalization(),
) -> dict[str, Any]:
    """``model_meta`` of a converted model, as ``save_model`` writes it: its config, names,
    colours, and where it came from (``source``: ``format``, ``path``, ``tensors``, ...).

    The config is the packaged config of ``dataset`` (its crop, eval protocol and training
    settings; ``annseg configs`` lists them) with the converted ``model`` and input
    ``normalization`` (ImageNet RGB by default); for an unknown dataset (``folder``) the
    built-in defaults, whose eval windows fit only the built-in dataset.
    """
    config = load_config(dataset) if dataset is not None else Config(data=DataConfig(dataset="folder"))
    config.model = model
    config.data.mean, config.data.std = normalization.mean, normalization.std
    config.data.val_batch_size = config.eval.batch_size = 1
    meta = model_meta(config, classes, palette)
    meta["converted_from"] = {**source, "eval_from": f"packaged config {dataset}" if dataset else "built-in defaults"}
    return meta


def not_this_format(source: str, expected: str, content: Any, state: Mapping[str, Tensor] | None = None) -> ValueError:
    """The one-line error for a file of another kind than a converter reads, saying what it looks like."""
    keys = list(state or ())
    if isinstance(content, dict) and "annseg" in content:
        kind = "an annseg checkpoint, which annseg eval / predict / annseg.load read without conversion"
    elif (isinstance(content, dict) and "config_dict" in content) or any(
            k.startswith(("backbone.prefix.", "dsn.", "context.2.stages.")) for k in keys):
        kind = "the authors' (MendelXu/ANN) checkpoint: convert it with `annseg convert authors`"
    elif any(k.startswith("decode_head.") for k in keys):
        kind = "an mmsegmentation checkpoint: convert it with `annseg convert mmseg`"
    elif any(k.startswith(("conv1.", "stem.", "layer1.")) for k in keys):
        kind = "ImageNet backbone weights (a ResNet state dict): give them to training as model.backbone_weights"
    else:
        kind = f"a state dict of {len(keys)} tensors with keys like {', '.join(keys[:3]) or 'none'}"
    return ValueError(f"{source} is not {expected}; it looks like {kind}")


def build_converted(
    model: ModelConfig,
    num_classes: int,
    state: Mapping[str, Tensor],
    source: str,
    file_key: Callable[[str], str] | None = None,
) -> ANN:
    """The model ``model`` describes, holding the tensors of ``state`` (annseg's key names), in eval mode.

    Built on the meta device, so no weight is initialised only to be overwritten and a file
    that does not fit costs no memory; the file's tensors become the weights (cast to the
    model's float dtype). Every key and shape must match, except BatchNorm's
    ``num_batches_tracked``, which torch < 0.4.1 did not save and which does not change the
    function: otherwise a ValueError lists the differences, in the file's key names when
    ``file_key`` maps annseg's back to them.
    """
    with torch.device("meta"):
        network = build_model(model, num_classes, load_backbone_weights=False)
    expected = network.state_dict()
    given = {k: v.to(expected[k].dtype) if k in expected and v.is_floating_point() else v for k, v in state.items()}
    given |= {k: torch.zeros((), dtype=torch.long) for k in expected
              if k.endswith(".num_batches_tracked") and k not in given}
    load_exactly(network, given, source, f"annseg {model.name} with options {model.options} ({num_classes} classes)",
                 hint="The file's layout is not one this converter knows; the keys above show where it differs.",
                 names=file_key, assign=True)
    unloaded = [name for name, t in (*network.named_parameters(), *network.named_buffers()) if t.is_meta]
    assert not unloaded, f"tensors outside the state dict were not loaded: {unloaded}"
    return network.eval()
