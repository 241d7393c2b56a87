import math

import torch

from annseg.engine.metrics import SegmentationMetrics, format_table


def test_miou_equals_hand_computed_confusion() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    preds = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    metrics = SegmentationMetrics(4)
    metrics.update(preds[None], target[None])
    scores = metrics.compute_scores(["a", "b", "c", "d"])
    # valid pixels: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (1,1); target row, pred column
    # class 0: tp 1, fn 1 (0->1), fp 1 (2->0): IoU 1/3; class 1: tp 3, fp 1: 3/4; class 2: tp 1, fn 1: 1/2
    assert math.isclose(scores["IoU"]["a"], 1 / 3) and math.isclose(scores["IoU"]["b"], 3 / 4)
    assert math.isclose(scores["IoU"]["c"], 1 / 2) and math.isnan(scores["IoU"]["d"])
    assert math.isclose(scores["mIoU"], (1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert math.isclose(scores["aAcc"], 5 / 7) and scores["pixels"] == 7


def test_logits_are_argmaxed_and_table_lists_classes() -> None:
    metrics = SegmentationMetrics(2)
    logits = torch.tensor([[[[2.0, -1.0]], [[0.0, 3.0]]]])  # (1, 2, 1, 2): predictions 0, 1
    metrics.update(logits, torch.tensor([[[0, 1]]]))
    scores = metrics.compute_scores(["road", "sky"])
    assert scores["mIoU"] == 1.0
    table = format_table(scores)
    assert "road" in table and "sky" in table and "mIoU 100.0" in table
