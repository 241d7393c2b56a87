import pytest
import torch

from annseg.layers import AFNB
from tests.layers import reference
from tests.layers.reference import randomize


def make(**options) -> AFNB:
    return randomize(AFNB(6, 10, 8, key_channels=4, value_channels=5, **options)).eval()


@pytest.mark.parametrize("low_size, high_size", [((45, 21), (45, 21)), ((12, 9), (7, 5)), ((2, 3), (2, 3))])
@pytest.mark.parametrize("fused", [True, False])
def test_matches_plain_reference(low_size, high_size, fused):
    block = make(fused_attention=fused)
    low, high = torch.randn(2, 6, *low_size), torch.randn(2, 10, *high_size)
    with torch.no_grad():
        out = block(low, high)
    assert out.shape == (2, 8, *high_size)
    torch.testing.assert_close(out, reference.afnb(block, low, high, (1, 3, 6, 8)), atol=1e-5, rtol=1e-4)


def test_fusion_has_no_relu_and_attention_part_alone():
    assert not any(isinstance(m, torch.nn.ReLU) for m in make().fuse)
    block = make(fusion=False)
    low, high = torch.randn(1, 6, 5, 5), torch.randn(1, 10, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(block(low, high), reference.afnb(block, low, high, (1, 3, 6, 8)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("norm_after_w", [False, True])
@pytest.mark.parametrize("fused_fusion", [False, True])
def test_attention_branch_is_zero_at_init(norm_after_w, fused_fusion):
    block = AFNB(6, 10, key_channels=4, value_channels=5, norm_after_w=norm_after_w, fused_fusion=fused_fusion).eval()
    assert (block.out.bn is not None) == norm_after_w
    low, high = torch.randn(2, 6, 8, 8), torch.randn(2, 10, 8, 8)
    with torch.no_grad():
        expected = block.fuse(torch.cat([torch.zeros(2, 10, 8, 8), high], 1))
        # The literal concatenation is exact; the fused product computes F_x X as a matmul, not a conv.
        exact = not fused_fusion or norm_after_w
        torch.testing.assert_close(block(low, high), expected, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)


def test_norm_after_w_starts_with_a_bounded_gradient():
    """The zero start sits in the norm's affine, not under it (a zero conv under BN has no variance)."""
    block = AFNB(6, 10, key_channels=4, value_channels=5, norm_after_w=True).train()
    assert block.out.conv.weight.abs().sum() > 0 and block.out.bn.weight.abs().sum() == 0
    low, high = torch.randn(2, 6, 8, 8), torch.randn(2, 10, 8, 8)
    block(low, high).square().mean().backward()
    plain = AFNB(6, 10, key_channels=4, value_channels=5).train()
    plain(low, high).square().mean().backward()
    assert block.out.bn.weight.grad.norm() < 10 * plain.out.conv.weight.grad.norm()


def test_backward_reaches_every_parameter():
    block = randomize(AFNB(6, 10, key_channels=4, value_channels=5, norm_after_w=True)).train()
    block(torch.randn(2, 6, 9, 7), torch.randn(2, 10, 9, 7)).square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
