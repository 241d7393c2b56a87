import pytest
import torch

from annseg.layers.baselines import PointwiseSpatialAttention
from tests.layers.baselines.checks import assert_equals_restatement, assert_trains_at_odd_size
from tests.layers.reference import project, randomize


def plain_psa(block: PointwiseSpatialAttention, x: torch.Tensor) -> torch.Tensor:
    """PSA position by position: read mask_i at offset j - i, normalise, collect and distribute."""
    B, _, h, w = x.shape
    H, W = block.size
    out = []
    for branch, direction in ((block.collect, "collect"), (block.distribute, "distribute")):
        features = project(branch.reduce, x)  # (B, C, h, w)
        masks = project(branch.mask, project(branch.hidden, features))  # (B, (2H-1)(2W-1), h, w)
        a = torch.empty(B, h * w, h * w, dtype=x.dtype)  # a[i, j] = mask_i[j - i]
        for i in range(h * w):
            ai, bi = divmod(i, w)
            for j in range(h * w):
                aj, bj = divmod(j, w)
                a[:, i, j] = masks[:, (H - 1 + aj - ai) * (2 * W - 1) + (W - 1 + bj - bi), ai, bi]
        x_flat = features.flatten(2)  # (B, C, N)
        z = torch.zeros_like(x_flat)
        for target in range(h * w):
            if direction == "collect":  # z_i = sum_j softmax_j(a_ij) x_j
                weights = a[:, target, :].softmax(dim=1)
            else:  # z_j = sum_i softmax_i(a_ij) x_i
                weights = a[:, :, target].softmax(dim=1)
            z[:, :, target] = torch.einsum("bn,bcn->bc", weights, x_flat)
        out.append(z.unflatten(2, (h, w)))
    return project(block.out, torch.cat(out, dim=1))


@pytest.mark.parametrize("size, shape", [((5, 7), (2, 6, 5, 7)), ((6, 9), (1, 6, 4, 7)), ((1, 4), (1, 6, 1, 4))])
def test_equals_per_position_loop(size, shape):
    block = randomize(PointwiseSpatialAttention(6, size, 5, channels=4)).double().eval()
    assert_equals_restatement(block, torch.randn(*shape, dtype=torch.float64), plain_psa, 5)


def test_paper_defaults_and_gradients_at_odd_size():
    block = PointwiseSpatialAttention(2048, (13, 21))
    assert block.collect.mask.conv.out_channels == 25 * 41 and block.collect.reduce.conv.out_channels == 512
    assert block.out.conv.in_channels == 1024 and block.out.conv.out_channels == 2048
    small = randomize(PointwiseSpatialAttention(5, (13, 21), channels=3))
    assert_trains_at_odd_size(small, 5)
    assert small.distribute.mask.conv.weight.grad.abs().sum() > 0


def test_map_larger_than_built_for_is_an_error():
    block = PointwiseSpatialAttention(4, (6, 6), channels=2)
    with pytest.raises(ValueError, match="up to 6x6, got 6x7"):
        block(torch.randn(1, 4, 6, 7))
