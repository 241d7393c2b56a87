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

        A score with nothing to count is NaN and left out of its mean, as in the Cityscapes and
        mmseg evaluators: the IoU of a class absent from both target and prediction (mIoU averages
        the classes present in either), the accuracy of a class absent from the target (mAcc
        averages the classes in the target), and every score when no pixel is labelled.
        ``train.write_json`` writes NaN as null; ``format_table`` shows "-" and says why.
        """
        return scores_from_confusion(self.compute(), class_names)


def scores_from_confusion(confusion: Tensor, class_names: Sequence[str] | None = None) -> dict:
    """Scores from a (K, K) confusion matrix, rows = target, columns = prediction."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    target_total = confusion.sum(1)
    union = target_total + confusion.sum(0) - true_positive
    iou = true_positive / union  # NaN where the class is in neither target nor prediction
    accuracy = true_positive / target_total  # NaN where the class is not in the target
    pixels = confusion.sum()
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    if len(names) != len(iou):
        raise ValueError(f"{len(names)} class names for a {len(iou)}-class confusion matrix")
    return {
        "mIoU": float(torch.nanmean(iou)),
        "aAcc": float(true_positive.sum() / pixels),  # NaN without labelled pixels
        "mAcc": float(torch.nanmean(accuracy)),
        "IoU": {name: float(value) for name, value in zip(names, iou)},
        "Acc": {name: float(value) for name, value in zip(names, accuracy)},
        "pixels": int(pixels),
    }


def format_table(scores: dict) -> str:
    """Per-class IoU / accuracy table with the summary line, for the terminal and the README.

    A missing score (NaN in memory, null in JSON) shows as "-", with a line below saying why.
    """
    width = max(len("class"), *(len(name) for name in scores["IoU"]))
    lines = [f"| {'class':<{width}} |   IoU |   Acc |", f"|{'-' * (width + 2)}|------:|------:|"]
    for name, iou in scores["IoU"].items():
        acc = scores["Acc"][name]
        lines.append(f"| {name:<{width}} | {_pct(iou)} | {_pct(acc)} |")
    lines.append(f"| {'**mean**':<{width}} | {_pct(scores['mIoU'])} | {_pct(scores['mAcc'])} |")
    lines.append(f"\nmIoU {_pct(scores['mIoU']).strip()}  pixel accuracy {_pct(scores['aAcc']).strip()}")
    return "\n".join(lines + _missing_notes(scores))


def _missing_notes(scores: dict) -> list[str]:
    """One line per reason a score is missing ("-" in the table)."""
    if scores.get("pixels") == 0:
        return ["-: no labelled pixels (every mask pixel is ignore), so there is nothing to score"]
    neither = [name for name, iou in scores["IoU"].items() if _missing(iou)]
    predicted_only = [name for name, acc in scores["Acc"].items() if _missing(acc) and name not in neither]
    notes = []
    if neither:
        notes.append(f"-: class absent from ground truth and prediction, left out of the means: {_names(neither)}")
    if predicted_only:
        notes.append(f"-: class absent from ground truth (its IoU counts, it was predicted), left out of mAcc: "
                     f"{_names(predicted_only)}")
    return notes


def _missing(value: float | None) -> bool:
    return value is None or value != value


def _names(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f", ... {len(names) - most} more" if len(names) > most else "")


def _pct(value: float | None) -> str:
    return "    -" if _missing(value) else f"{100 * value:5.1f}"
