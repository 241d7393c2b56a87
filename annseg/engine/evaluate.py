"""Evaluate a trained network on a dataset split with the config's test-time inference."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from annseg.engine.config import EvalConfig
from annseg.engine.datamodule import collate
from annseg.engine.inference import infer_with
from annseg.engine.metrics import SegmentationMetrics


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
    classes = getattr(dataset, "classes", None)
    if classes is not None and len(classes) != len(class_names):
        raise ValueError(f"the model predicts {len(class_names)} classes ({_names(class_names)}) but the dataset has "
                         f"{len(classes)} ({_names(classes)}); evaluate on the dataset the model was trained for")
    model = model.to(device).eval()
    metrics = SegmentationMetrics(len(class_names)).to(device)
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers, collate_fn=collate)
    for batch in progress(loader):
        images = batch["image"].to(device)
        logits = infer_with(model, images, len(class_names), settings)
        metrics.update(logits.argmax(1), batch["mask"].to(device))
    return metrics.compute_scores(class_names)


def _names(names: Sequence[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")
