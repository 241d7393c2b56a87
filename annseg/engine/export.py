"""ONNX export of a trained network, checked against PyTorch with onnxruntime.

The graph is the network's eval forward on NORMALISED input: ``image`` float32 (B, 3, H, W),
RGB in [0, 1] minus ``mean`` over ``std`` -> ``logits`` float32 (B, K, H, W) at the input's
size; the label map is their argmax over K. Test-time scales, flips and sliding windows stay
outside the graph. Class names, palette and normalisation travel in the file's
``metadata_props`` (JSON strings), which onnxruntime shows as
``session.get_modelmeta().custom_metadata_map``.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), the maintained
one; the TorchScript exporter is deprecated. Its native opset is 18, the default here.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from annseg import __version__

DEFAULT_OPSET = 18
OPSETS = range(17, 24)  # 18-23 written natively, 17 by onnx's version converter; each checked by tests
INPUT_NAME, OUTPUT_NAME = "image", "logits"
INSTALL_HINT = 'pip install "annseg[onnx]"'


def require_onnx() -> None:
    """Raise ImportError naming the extra to install when onnx, onnxscript or onnxruntime is missing."""
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}, which is not installed: {INSTALL_HINT}")


def validate_opset(opset: int) -> None:
    """Raise ValueError unless ``opset`` is one this exporter writes and the tests check."""
    if opset not in OPSETS:
        raise ValueError(f"opset {opset} is not supported; choose {OPSETS.start} to {OPSETS.stop - 1} "
                         f"(default {DEFAULT_OPSET})")


@dataclass(frozen=True)
class OnnxGraphInfo:
    """What an exported file holds: its opset and each input's and output's name and shape.

    A shape lists ints for fixed axes and names ("batch", "height", "width") for dynamic ones.
    """

    opset: int
    inputs: list[tuple[str, list[int | str]]]
    outputs: list[tuple[str, list[int | str]]]
    metadata: dict[str, str]


@dataclass(frozen=True)
class OnnxCheck:
    """onnxruntime against PyTorch: the largest absolute logit difference and the logits' scale."""

    max_abs_diff: float
    max_abs_logit: float
    sizes: list[tuple[int, ...]]


def _network(model: nn.Module) -> nn.Module:
    """The bare network of a ``Segmenter`` (its forward is the network's anyway) or ``model``."""
    return getattr(model, "network", model)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    height: int,
    width: int,
    *,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, Any] | None = None,
    fuse: bool = True,
) -> OnnxGraphInfo:
    """Write ``model``'s eval forward on normalised (B, 3, H, W) input to ``path`` as ONNX.

    ``model``: a ``Segmenter`` (its classes, palette and normalisation become metadata) or a
    bare network. ``dynamic``: batch, height and width are free (traced at ``height`` x
    ``width``); otherwise the file takes exactly (1, 3, height, width). ``fuse``: fold the
    blocks' BatchNorms and W first (``fuse_for_inference``; exact up to rounding, fewer
    ops). The model itself is not changed. ``metadata`` adds to the file's metadata_props.
    """
    require_onnx()
    validate_opset(opset)
    if height < 1 or width < 1:
        raise ValueError(f"export size must be positive, got height={height}, width={width}")
    network = copy.deepcopy(_network(model)).cpu().float().eval()
    if fuse and hasattr(network, "fuse_for_inference"):
        network.fuse_for_inference()
    # A dynamic axis must not be traced at size 1: torch.export would specialise it to 1.
    example = torch.randn(2 if dynamic else 1, 3, height, width)
    axes = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    with torch.no_grad():
        program = torch.onnx.export(
            network, (example,), dynamo=True, opset_version=opset, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=(axes,) if dynamic else None)
    props = {
        "annseg_version": __version__,
        "input": f"{INPUT_NAME}: float32 (B, 3, H, W), RGB in [0, 1] minus normalization.mean over normalization.std",
        "output": f"{OUTPUT_NAME}: float32 (B, K, H, W) class scores; the label map is their argmax over K",
    }
    if hasattr(model, "metadata"):
        props.update({key: json.dumps(value) for key, value in model.metadata().items()})
    props.update({key: value if isinstance(value, str) else json.dumps(value) for key, value in (metadata or {}).items()})
    program.model.metadata_props.update(props)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path)
    return describe_onnx(path)


def describe_onnx(path: str | Path) -> OnnxGraphInfo:
    """The opset, input/output names and shapes, and metadata of an ONNX file."""
    require_onnx()
    import onnx

    proto = onnx.load(str(path), load_external_data=False)

    def shapes(values: Sequence[Any]) -> list[tuple[str, list[int | str]]]:
        return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return OnnxGraphInfo(opset, shapes(proto.graph.input), shapes(proto.graph.output),
                         {p.key: p.value for p in proto.metadata_props})


def check_onnx(path: str | Path, model: nn.Module, inputs: Sequence[Tensor]) -> OnnxCheck:
    """Run each normalised (B, 3, H, W) tensor of ``inputs`` through onnxruntime and ``model``.

    ``model`` is the PyTorch network (or ``Segmenter``) as trained, unfused; the CPU
    execution provider runs the file. Returns the largest absolute difference of the logits
    over all inputs, and the largest absolute logit, which gives it a scale.
    """
    require_onnx()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    network = _network(model)
    if network.training:
        raise ValueError("check_onnx compares the eval forward: call model.eval() first")
    device = next(network.parameters()).device
    diff = scale = 0.0
    for images in inputs:
        with torch.no_grad():
            expected = network(images.to(device)).float().cpu().numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.cpu().float().numpy()})
        if got.shape != expected.shape:
            raise ValueError(f"{path}: onnxruntime gave logits of shape {got.shape} for input "
                             f"{tuple(images.shape)}; PyTorch gave {expected.shape}")
        diff = max(diff, float(np.abs(got - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
    return OnnxCheck(diff, scale, [tuple(images.shape) for images in inputs])
