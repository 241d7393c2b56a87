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


def test_class_only_predicted_counts_in_miou_but_has_no_accuracy_and_the_table_says_why() -> None:
    metrics = SegmentationMetrics(4)
    metrics.update(torch.tensor([[[0, 0, 2]]]), torch.tensor([[[0, 0, 0]]]))  # 2 predicted, absent from the truth
    scores = metrics.compute_scores(["a", "b", "c", "d"])
    assert math.isclose(scores["IoU"]["a"], 2 / 3) and scores["IoU"]["c"] == 0.0 and math.isnan(scores["Acc"]["c"])
    assert math.isnan(scores["IoU"]["b"]) and math.isnan(scores["Acc"]["b"])
    assert math.isclose(scores["mIoU"], (2 / 3 + 0) / 2) and math.isclose(scores["mAcc"], 2 / 3)
    lines = format_table(scores).splitlines()
    assert "| b     |     - |     - |" in lines and "| c     |   0.0 |     - |" in lines
    assert lines[-2:] == ["-: class absent from ground truth and prediction, left out of the means: b, d",
                          "-: class absent from ground truth (its IoU counts, it was predicted), left out of mAcc: c"]


def test_no_labelled_pixels_gives_no_score_not_zero() -> None:
    metrics = SegmentationMetrics(2)
    metrics.update(torch.tensor([[[0, 1]]]), torch.tensor([[[255, 255]]]))
    scores = metrics.compute_scores(["road", "sky"])
    assert scores["pixels"] == 0 and all(math.isnan(scores[key]) for key in ("mIoU", "mAcc", "aAcc"))
    as_json = {**scores, "aAcc": None, "IoU": {"road": None, "sky": None}}  # what metrics.json gives back
    for table in (format_table(scores), format_table(as_json)):
        assert "mIoU -  pixel accuracy -" in table and table.endswith("-: no labelled pixels (every mask pixel is "
                                                                       "ignore), so there is nothing to score")
