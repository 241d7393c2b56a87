"""Segmentation metrics from one confusion matrix: per-class IoU, mIoU, pixel accuracy.

torchmetrics keeps the confusion matrix (and sums it across processes under DDP); the scores
are derived here so that every number in a report comes from the same counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix


class SegmentationMetrics(MulticlassConfusionMatrix):
    """Confusion matrix over valid pixels; ``compute_scores`` gives the paper's metrics.

    ``update(preds (B, H, W) class ids or (B, K, H, W) logits, target (B, H, W))``; pixels
    labelled ``ignore_index`` never count.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__(num_classes=num_classes, ignore_index=ignore_index, validate_args=False)

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        if preds.dim() == target.dim() + 1:
            preds = preds.argmax(1)
        super().update(preds, target)

    def compute_scores(self, class_names: Sequence[str] | None = None) -> dict:
        """``{"mIoU", "aAcc", "mAcc", "IoU": {name: iou}, "Acc": {...}}`` as floats in [0, 1].

        Classes absent from both prediction and target have no IoU (NaN) and are left out of
        the mean, as in the Cityscapes and mmseg evaluators.
        """
        return scores_from_confusion(self.compute(), class_names)


def scores_from_confusion(confusion: Tensor, class_names: Sequence[str] | None = None) -> dict:
    """Scores from a (K, K) confusion matrix, rows = target, columns = prediction."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    target_total = confusion.sum(1)
    union = target_total + confusion.sum(0) - true_positive
    iou = true_positive / union  # NaN where the class never appears
    accuracy = true_positive / target_total
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    if len(names) != len(iou):
        raise ValueError(f"{len(names)} class names for a {len(iou)}-class confusion matrix")
    return {
        "mIoU": float(torch.nanmean(iou)),
        "aAcc": float(true_positive.sum() / confusion.sum().clamp(min=1)),
        "mAcc": float(torch.nanmean(accuracy)),
        "IoU": {name: float(value) for name, value in zip(names, iou)},
        "Acc": {name: float(value) for name, value in zip(names, accuracy)},
        "pixels": int(confusion.sum()),
    }


def format_table(scores: dict) -> str:
    """Per-class IoU / accuracy table with the summary line, for the terminal and the README."""
    width = max(len("class"), *(len(name) for name in scores["IoU"]))
    lines = [f"| {'class':<{width}} |   IoU |   Acc |", f"|{'-' * (width + 2)}|------:|------:|"]
    for name, iou in scores["IoU"].items():
        acc = scores["Acc"][name]
        lines.append(f"| {name:<{width}} | {_pct(iou)} | {_pct(acc)} |")
    lines.append(f"| {'**mean**':<{width}} | {_pct(scores['mIoU'])} | {_pct(scores['mAcc'])} |")
    lines.append(f"\nmIoU {_pct(scores['mIoU']).strip()}  pixel accuracy {_pct(scores['aAcc']).strip()}")
    return "\n".join(lines)


def _pct(value: float) -> str:
    return "   - " if value != value else f"{100 * value:5.1f}"
