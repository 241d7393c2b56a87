import pytest
import torch

from annseg.layers import attention
from tests.conftest import CUDA

SHAPES = [  # (B, N, S, Ck, Cv)
    (2, 37, 110, 16, 24),  # the paper's 110 anchors
    (1, 45 * 21, 45 * 21, 8, 8),  # non-local: S = N, odd map
    (3, 1, 1, 4, 4),  # one position
    (1, 5, 7, 3, 9),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_equals_reference_fp32(shape):
    B, N, S, Ck, Cv = shape
    q, k, v = torch.randn(B, N, Ck), torch.randn(B, S, Ck), torch.randn(B, S, Cv)
    fused = attention(q, k, v, fused=True)
    reference = attention(q, k, v, fused=False)
    assert fused.shape == (B, N, Cv)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


def test_reference_is_scaled_softmax():
    q, k, v = torch.randn(2, 6, 5), torch.randn(2, 4, 5), torch.randn(2, 4, 3)
    expected = torch.softmax(q @ k.transpose(1, 2) / 5**0.5, dim=-1) @ v
    torch.testing.assert_close(attention(q, k, v, fused=False), expected)


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_autocast_close_to_fp32(fused):
    q, k, v = torch.randn(2, 50, 32), torch.randn(2, 110, 32), torch.randn(2, 110, 16)
    expected = attention(q, k, v, fused=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, fused=fused)
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


def test_gradients_agree():
    inputs = [torch.randn(2, 9, 4, requires_grad=True), torch.randn(2, 5, 4, requires_grad=True),
              torch.randn(2, 5, 6, requires_grad=True)]
    grads = []
    for fused in (True, False):
        attention(*inputs, fused=fused).square().sum().backward()
        grads.append([t.grad.clone() for t in inputs])
        for t in inputs:
            t.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_wrong_rank_is_a_clear_error():
    with pytest.raises(ValueError, match="query \\(B, N, Ck\\)"):
        attention(torch.randn(5, 4), torch.randn(1, 5, 4), torch.randn(1, 5, 4))


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_equals_reference(dtype):
    q, k, v = (torch.randn(2, n, 64, device="cuda") for n in (300, 110, 110))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        fused = attention(q, k, v, fused=True)
    reference = attention(q, k, v, fused=False)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fused.float(), reference, atol=tol, rtol=tol)


def test_one_anchor_with_odd_strides():
    """S = 1 (pooling size 1 alone): the pooled key arrives as a transposed (B, 1, Ck) view."""
    q = torch.randn(2, 30, 8)
    k, v = torch.randn(2, 8, 1).transpose(1, 2), torch.randn(2, 6, 1).transpose(1, 2)
    torch.testing.assert_close(attention(q, k, v), v.expand(2, 30, 6))


@CUDA
def test_cuda_one_anchor():
    """CUDA's memory-efficient kernel rejects size-1 axes with odd strides; the kernel must not."""
    q = torch.randn(1, 300, 64, device="cuda")
    k, v = (torch.randn(1, 64, 1, device="cuda").transpose(1, 2) for _ in range(2))
    torch.testing.assert_close(attention(q, k, v), v.expand(1, 300, 64))


@pytest.mark.parametrize("which", ["apnb", "afnb"])
def test_a_probe_records_the_blocks_weights_and_changes_nothing(which):
    """With W alone as the output (fusion off), the block's output at a recorded position is W applied
    to the recorded weights times the anchor values: the weights are those the forward used."""
    from annseg.layers import AFNB, APNB, AttentionProbe

    torch.manual_seed(0)
    low, high = torch.randn(2, 6, 7, 9), torch.randn(2, 5, 5, 7)
    block = (APNB(5, 5, key_channels=4, value_channels=3, fusion=False) if which == "apnb"
             else AFNB(6, 5, 5, key_channels=4, value_channels=3, fusion=False)).eval()
    torch.nn.init.normal_(block.out.conv.weight)  # W is zero at init
    inputs = (high,) if which == "apnb" else (low, high)
    values = {}
    block.value.register_forward_hook(lambda m, i, output: values.update(anchors=output))
    before = block(*inputs)
    block.probe = probe = AttentionProbe(lambda h, w: torch.tensor([0, h * w - 1, 2 * w + 3]))
    after = block(*inputs)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert probe.weights.shape == (2, 3, 110) and probe.query_size == (5, 7)
    assert probe.anchor_size == ((5, 7) if which == "apnb" else (7, 9))
    torch.testing.assert_close(probe.weights.sum(-1), torch.ones(2, 3))
    expected = block.out(probe.weights @ values["anchors"])  # (B, P, C_out)
    flat = after.flatten(2).transpose(1, 2)[:, [0, 34, 17]]  # positions 0, 5 * 7 - 1, 2 * 7 + 3
    torch.testing.assert_close(flat, expected, atol=1e-5, rtol=1e-5)
