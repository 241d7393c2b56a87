import pytest
import torch
import torch.nn.functional as F

from annseg.layers.baselines import DenseASPP
from tests.layers.baselines.checks import assert_equals_restatement, assert_trains_at_odd_size
from tests.layers.reference import randomize


def plain_denseaspp(block: DenseASPP, x: torch.Tensor, rates: tuple[int, ...]) -> torch.Tensor:
    """The paper's layers composed by hand: BN-ReLU-1x1, BN-ReLU-dilated 3x3, dense concat."""
    def bn(t, m):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    outputs = []
    for layer, rate in zip(block.layers, rates):
        norm1, _, conv1, norm2, _, conv2 = list(layer)[:6]
        seen = torch.cat([*reversed(outputs), x], dim=1)  # newest first, then the input
        y = F.conv2d(bn(seen, norm1).relu(), conv1.weight, conv1.bias)
        y = F.conv2d(bn(y, norm2).relu(), conv2.weight, conv2.bias, padding=rate, dilation=rate)
        outputs.append(y)
    return torch.cat([*reversed(outputs), x], dim=1)


@pytest.mark.parametrize("rates", [(3, 6, 12, 18, 24), (1, 2)])
def test_equals_hand_composed_layers(rates):
    block = randomize(DenseASPP(6, rates=rates, reduce_channels=5, growth=3)).double().eval()
    x = torch.randn(2, 6, 13, 21, dtype=torch.float64)
    out = assert_equals_restatement(block, x, lambda b, t: plain_denseaspp(b, t, rates), block.out_channels)
    assert block.out_channels == 6 + 3 * len(rates)
    assert torch.equal(out[:, -6:], x)  # the input passes through, last


def test_paper_defaults_and_gradients_at_odd_size():
    block = DenseASPP(2048)
    assert [layer[2].in_channels for layer in block.layers] == [2048, 2176, 2304, 2432, 2560]
    assert [layer[5].dilation for layer in block.layers] == [(r, r) for r in (3, 6, 12, 18, 24)]
    assert block.out_channels == 2048 + 5 * 128 and block.layers[0][2].out_channels == 512
    assert_trains_at_odd_size(DenseASPP(4, reduce_channels=3, growth=2), 4)
