import math

import pytest
import torch
import torch.nn.functional as F

from annseg.losses import ANNLoss, OhemCrossEntropy


def two_class_logits(probs: list[float]) -> torch.Tensor:
    """(1, 2, 1, P) logits whose class-0 probability at pixel i is probs[i]."""
    p = torch.tensor(probs, dtype=torch.float64)
    return torch.stack([torch.log(p), torch.log1p(-p)]).reshape(1, 2, 1, -1)


PROBS = [0.9, 0.8, 0.6, 0.3, 0.95]
TARGET = torch.zeros(1, 1, 5, dtype=torch.long)


def mean_nll(probs) -> float:
    return sum(-math.log(p) for p in probs) / len(probs)


def test_threshold_rule_keeps_pixels_under_point_seven():
    loss = OhemCrossEntropy(threshold=0.7, min_kept=1)(two_class_logits(PROBS), TARGET)
    assert loss.item() == pytest.approx(mean_nll([0.6, 0.3]))


def test_min_kept_raises_the_threshold():
    loss = OhemCrossEntropy(threshold=0.7, min_kept=3)(two_class_logits(PROBS), TARGET)
    assert loss.item() == pytest.approx(mean_nll([0.8, 0.6, 0.3]))  # 3rd smallest p = 0.8


def test_min_kept_above_valid_count_keeps_all():
    loss = OhemCrossEntropy(threshold=0.7, min_kept=100)(two_class_logits(PROBS), TARGET)
    assert loss.item() == pytest.approx(mean_nll(PROBS))


def test_ignore_index_never_counts():
    target = TARGET.clone()
    target[0, 0, 3] = 255  # the hardest pixel (p = 0.3) is ignored
    loss = OhemCrossEntropy(threshold=0.7, min_kept=1)(two_class_logits(PROBS), target)
    assert loss.item() == pytest.approx(mean_nll([0.6]))


def test_all_ignored_gives_zero_not_nan():
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    target = torch.full((2, 3, 3), 255)
    for loss_fn in (OhemCrossEntropy(), ANNLoss()):
        outputs = logits if isinstance(loss_fn, OhemCrossEntropy) else (logits, logits * 2)
        loss = loss_fn(outputs, target)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(logits.grad, torch.zeros_like(logits))
        logits.grad = None


def test_class_weights_give_weighted_mean():
    logits = two_class_logits([0.6, 0.3, 0.2])
    target = torch.tensor([[[0, 0, 1]]])  # p(true) = 0.6, 0.3, 0.8
    loss = OhemCrossEntropy(threshold=0.7, min_kept=1, class_weights=[2.0, 5.0])(logits, target)
    assert loss.item() == pytest.approx((2 * -math.log(0.6) + 2 * -math.log(0.3)) / 4)
    loss = OhemCrossEntropy(threshold=0.9, min_kept=1, class_weights=[2.0, 5.0])(logits, target)
    expected = (2 * -math.log(0.6) + 2 * -math.log(0.3) + 5 * -math.log(0.8)) / 9
    assert loss.item() == pytest.approx(expected)


def test_ann_loss_is_main_plus_point_four_aux():
    main, aux = torch.randn(2, 5, 6, 7), torch.randn(2, 5, 6, 7)
    target = torch.randint(0, 5, (2, 6, 7))
    target[0, 0] = 255
    ohem = OhemCrossEntropy(min_kept=10)
    expected = ohem(main, target) + 0.4 * F.cross_entropy(aux, target, ignore_index=255)
    torch.testing.assert_close(ANNLoss(min_kept=10)((main, aux), target), expected)
    torch.testing.assert_close(ANNLoss(min_kept=10)(main, target), ohem(main, target))


def test_without_ohem_is_plain_cross_entropy():
    main = torch.randn(2, 5, 6, 7)
    target = torch.randint(0, 5, (2, 6, 7))
    torch.testing.assert_close(ANNLoss(ohem=False)(main, target), F.cross_entropy(main, target, ignore_index=255))


@pytest.mark.parametrize("kwargs, match", [
    ({"threshold": 0.0}, "threshold"), ({"min_kept": -1}, "min_kept"), ({"class_weights": [1.0, -2.0]}, "class_weights"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OhemCrossEntropy(**kwargs)
