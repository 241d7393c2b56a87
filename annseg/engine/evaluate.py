"""Evaluate a trained network on a dataset split with the config's test-time inference."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from annseg.engine.config import EvalConfig
from annseg.engine.datamodule import collate
from annseg.engine.inference import infer_with
from annseg.engine.metrics import SegmentationMetrics

log = logging.getLogger(__name__)


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    class_names: Sequence[str],
    settings: EvalConfig,
    *,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: Callable[[Iterable], Iterable] = lambda items: items,
) -> dict:
    """mIoU, per-class IoU and pixel accuracy of ``model`` over ``dataset`` (one image at a time).

    ``dataset`` yields normalised images and train-id masks at their original size; inference
    follows ``settings`` (whole / slide, scales, flip) and predictions are compared at full
    resolution, as the benchmarks do.
    """
    check_classes(class_names, getattr(dataset, "classes", None))
    model = model.to(device).eval()
    metrics = SegmentationMetrics(len(class_names)).to(device)
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers, collate_fn=collate)
    for batch in progress(loader):
        images = batch["image"].to(device)
        logits = infer_with(model, images, len(class_names), settings)
        metrics.update(logits.argmax(1), batch["mask"].to(device))
    return metrics.compute_scores(class_names)


def check_classes(model_classes: Sequence[str], dataset_classes: Sequence[str] | None) -> None:
    """The model's classes must be the dataset's, by name and order, not only by count: scoring
    train id i of the model against another class i of the dataset gives a meaningless number.

    Names match ignoring case and spacing ("Traffic  light" is "traffic light"; mmseg writes
    "bed "). A converted model whose source named no classes (``class_0``, ``class_1``, ...)
    has no names to compare; only its count is checked, and a log line says so.
    """
    if dataset_classes is None:
        return
    if len(dataset_classes) != len(model_classes):
        raise ValueError(f"the model predicts {len(model_classes)} classes ({_names(model_classes)}) but the dataset "
                         f"has {len(dataset_classes)} ({_names(dataset_classes)}); evaluate on the dataset the model "
                         "was trained for")
    if list(model_classes) == [f"class_{i}" for i in range(len(model_classes))]:
        log.warning("the model's classes are unnamed (class_0, class_1, ...); scoring them as the dataset's "
                    "classes in order (%s)", _names(dataset_classes))
        return
    differ = [(i, m, d) for i, (m, d) in enumerate(zip(model_classes, dataset_classes)) if _key(m) != _key(d)]
    if differ:
        shown = "; ".join(f"id {i} is {m!r} in the model, {d!r} in the dataset" for i, m, d in differ[:3])
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        raise ValueError(f"the model's classes differ from the dataset's: {shown}{more}; evaluate on the dataset "
                         "the model was trained for, with its class names in the same order")


def _key(name: str) -> str:
    return " ".join(name.split()).casefold()


def _names(names: Sequence[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")
