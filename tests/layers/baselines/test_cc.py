import pytest
import torch
import torch.nn.functional as F

from annseg.layers.baselines import CrissCrossAttention
from tests.layers.baselines.checks import assert_equals_restatement, assert_trains_at_odd_size
from tests.layers.reference import project, randomize


def plain_criss_cross(block: CrissCrossAttention, x: torch.Tensor) -> torch.Tensor:
    """Each position's softmax over its own row and column (itself once), one position at a time."""
    conv, bn = block.reduce[0], block.reduce[1]
    y = F.conv2d(x, conv.weight, conv.bias, padding=conv.padding)
    y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps).relu()
    B, _, H, W = y.shape
    for _ in range(block.recurrence):
        q, k, v = (project(p, y) for p in (block.query, block.key, block.value))  # (B, c, H, W)
        out = torch.empty_like(y)
        for h in range(H):
            for w in range(W):
                seen = [(h, j) for j in range(W)] + [(i, w) for i in range(H) if i != h]  # H + W - 1
                keys = torch.stack([k[:, :, i, j] for i, j in seen], dim=2)  # (B, c, H + W - 1)
                values = torch.stack([v[:, :, i, j] for i, j in seen], dim=2)
                weights = torch.einsum("bc,bcs->bs", q[:, :, h, w], keys).softmax(dim=1)
                out[:, :, h, w] = torch.einsum("bs,bcs->bc", weights, values)
        y = block.gamma * out + y
    return y


@pytest.mark.parametrize("recurrence", [1, 2])
@pytest.mark.parametrize("shape", [(2, 6, 7, 11), (1, 6, 1, 5), (1, 6, 4, 1)])
def test_equals_explicit_row_and_column_softmax(recurrence, shape):
    block = randomize(CrissCrossAttention(6, channels=16, recurrence=recurrence)).double().eval()
    assert_equals_restatement(block, torch.randn(*shape, dtype=torch.float64), plain_criss_cross, 16)


def test_paper_defaults_and_gradients_at_odd_size():
    block = CrissCrossAttention(2048)
    assert block.recurrence == 2 and block.reduce[0].kernel_size == (3, 3)
    assert (block.query.conv.out_channels, block.value.conv.out_channels, block.gamma.item()) == (64, 512, 0.0)
    small = randomize(CrissCrossAttention(5, channels=8))
    assert_trains_at_odd_size(small, 5)
    assert small.query.conv.weight.grad.abs().sum() > 0  # the attention is trained, not bypassed
    with pytest.raises(ValueError, match="recurrence"):
        CrissCrossAttention(8, recurrence=0)
