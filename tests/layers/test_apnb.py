import pytest
import torch
from torch import nn

from annseg.layers import APNB, NonLocal2d, conv
from tests.layers import reference
from tests.layers.reference import randomize


def make(**options) -> APNB:
    return randomize(APNB(12, 10, key_channels=6, value_channels=5, **options)).eval()


@pytest.mark.parametrize("shape", [(2, 12, 45, 21), (1, 12, 2, 3), (1, 12, 8, 8)])
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_matches_plain_reference(shape, share, fused):
    block = make(share_query_key=share, fused_attention=fused)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference.apnb(block, x, (1, 3, 6, 8)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("sizes", [(1,), (1, 2), (1, 3, 6, 8, 12)])
def test_other_pooling_sizes_match_plain_reference(sizes):
    block = make(sizes=sizes)
    x = torch.randn(2, 12, 13, 10)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference.apnb(block, x, sizes), atol=1e-5, rtol=1e-4)


def test_attention_part_alone():
    block = make(fusion=False)
    assert block.fuse is None
    x = torch.randn(2, 12, 9, 11)
    with torch.no_grad():
        out = block(x)
    assert out.shape == (2, 10, 9, 11)
    torch.testing.assert_close(out, reference.apnb(block, x, (1, 3, 6, 8)), atol=1e-5, rtol=1e-4)


def test_identity_sampling_equals_nonlocal():
    apnb = make(sizes=(1, 3, 6, 8))
    nonlocal_block = NonLocal2d(12, 10, key_channels=6, value_channels=5).eval()
    nonlocal_block.load_state_dict(apnb.state_dict())
    apnb.sample = nn.Flatten(2)  # every position is an anchor
    x = torch.randn(2, 12, 7, 13)
    with torch.no_grad():
        torch.testing.assert_close(apnb(x), nonlocal_block(x), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(nonlocal_block(x), reference.apnb(nonlocal_block, x, None), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fused_fusion", [False, True])
def test_output_projection_is_zero_at_init(fused_fusion):
    block = APNB(12, 12, key_channels=6, value_channels=5, fusion=False)
    assert block.out.conv.weight.abs().sum() == 0 and block.out.conv.bias.abs().sum() == 0
    assert block(torch.randn(2, 12, 9, 9)).abs().max() == 0
    fused = APNB(12, 12, key_channels=6, value_channels=5, fused_fusion=fused_fusion).eval()
    x = torch.randn(2, 12, 9, 9)
    with torch.no_grad():  # the attention branch contributes zero: output = fuse([0, x])
        expected = fused.fuse(torch.cat([torch.zeros_like(x), x], 1))
        # Exact for the literal concatenation; the fused product computes F_x X as a matmul, not a conv.
        tolerance = dict(rtol=1e-5, atol=1e-6) if fused_fusion else dict(rtol=0, atol=0)
        torch.testing.assert_close(fused(x), expected, **tolerance)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("sizes", [(1, 3, 6, 8), None])
def test_projections_of_the_same_input_are_one_matmul(monkeypatch, share, sizes):
    """Key (+ query unless shared, + value for the non-local block) read X once, in one matmul."""
    block = make(share_query_key=share, sizes=sizes)
    widths = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(conv.F, "linear", lambda x, w, b=None: widths.append(tuple(w.shape)) or linear(x, w, b))
    block(torch.randn(1, 12, 6, 6))
    first = 6 * (1 if share else 2) + (5 if sizes is None else 0)  # Ck (+ Ck) (+ Cv)
    assert widths[0] == (first, 12)
    assert len(widths) == (2 if sizes is None else 3)  # + pooled value (APNB), + the fusion's F_x X
    assert (block.query is None) == share


def test_backward_reaches_every_parameter():
    block = randomize(APNB(12, 10, key_channels=6, value_channels=5)).train()
    block(torch.randn(2, 12, 11, 7)).square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_bf16_autocast_close_to_fp32():
    block = make()
    x = torch.randn(2, 12, 16, 20)
    with torch.no_grad():
        expected = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x)
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


def test_channels_last_input():
    block = make()
    x = torch.randn(2, 12, 9, 10)
    with torch.no_grad():
        torch.testing.assert_close(block(x.to(memory_format=torch.channels_last)), block(x), atol=1e-5, rtol=1e-5)


def test_nonlocal_rejects_sizes():
    with pytest.raises(TypeError, match="APNB"):
        NonLocal2d(8, sizes=(1, 2))
