"""The blocks' restructured paths compute the plain path's function and gradients.

``fused_fusion`` (W and the fusion conv as one product) and ``project_and_sample`` (one
gradient buffer for an input that is both projected and pooled) change how the arithmetic
is grouped, not what is computed: exact in float64 up to rounding (1e-10), and within fp32
re-association (1e-4 relative) in float32.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from annseg.layers import AFNB, APNB, PyramidSampling
from annseg.layers.conv import Projection, project_and_sample, to_tokens
from tests.layers.reference import randomize


def _pair(make):
    torch.manual_seed(0)
    plain = randomize(make(fused_fusion=False)).train()
    fast = make(fused_fusion=True).train()
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def _grads(block, inputs):
    torch.manual_seed(1)  # the same dropout masks on both sides
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = block(*inputs)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out, [x.grad for x in inputs] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("kind", ["apnb", "afnb", "nb"])
def test_fused_fusion_gives_the_plain_outputs_and_gradients(kind, dtype, tolerance):
    if kind == "afnb":
        make = lambda **o: AFNB(6, 10, key_channels=4, value_channels=5, **o)  # noqa: E731
        inputs = [torch.randn(2, 6, 9, 7), torch.randn(2, 10, 9, 7)]
    else:
        sizes = (1, 3, 6, 8) if kind == "apnb" else None
        make = lambda **o: APNB(12, 10, key_channels=6, value_channels=5, sizes=sizes, **o)  # noqa: E731
        inputs = [torch.randn(2, 12, 11, 7)]
    plain, fast = _pair(make)
    plain, fast = plain.to(dtype), fast.to(dtype)
    inputs = [x.to(dtype) for x in inputs]
    out_plain, grads_plain = _grads(plain, inputs)
    out_fast, grads_fast = _grads(fast, inputs)
    torch.testing.assert_close(out_fast, out_plain, rtol=tolerance, atol=tolerance)
    scale = max(g.abs().max().item() for g in grads_plain)  # a conv bias under BatchNorm has a ~0 gradient
    for fast_grad, plain_grad in zip(grads_fast, grads_plain):
        torch.testing.assert_close(fast_grad, plain_grad, rtol=tolerance, atol=tolerance * scale)


def test_norm_after_w_keeps_the_literal_fusion():
    """A BatchNorm between W and the fusion is not linear in training: that AFNB builds the concatenation."""
    block = AFNB(6, 10, key_channels=4, value_channels=5, norm_after_w=True)
    calls = []
    original = torch.cat
    try:
        torch.cat = lambda tensors, dim=0: calls.append(len(tensors)) or original(tensors, dim)
        block(torch.randn(2, 6, 5, 5), torch.randn(2, 10, 5, 5))
    finally:
        torch.cat = original
    assert 2 in calls


@pytest.mark.parametrize("shape", [(2, 8, 13, 10), (1, 8, 3, 2), (2, 8, 8, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("used", ["both", "projected", "sampled"])
def test_project_and_sample_gradients_equal_autograds(shape, channels_last, used):
    torch.manual_seed(0)
    projections = [randomize(Projection(8, 4)).train(), randomize(Projection(8, 3, norm=False, act=False)).train()]
    sample = PyramidSampling((1, 2, 3, 6))
    x = torch.randn(*shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for p in projections:
        p.double()

    def loss(projected, sampled):
        terms = []
        if used in ("both", "projected"):
            terms += [(t * torch.cos(torch.arange(t.numel(), dtype=t.dtype)).view_as(t)).sum() for t in projected]
        if used in ("both", "sampled"):
            terms.append((sampled * torch.sin(torch.arange(sampled.numel(), dtype=x.dtype)).view_as(sampled)).sum())
        return sum(terms)

    results = []
    for fast in (True, False):
        for p in projections:
            p.zero_grad(set_to_none=True)
        leaf = x.detach().clone().requires_grad_()
        if fast:
            projected, sampled = project_and_sample(leaf, projections, sample)
        else:
            projected = [p(to_tokens(leaf)) for p in projections]
            sampled = sample(leaf)
        loss(projected, sampled).backward()
        grads = [leaf.grad] + [q.grad for p in projections for q in p.parameters() if q.grad is not None]
        results.append(grads)
        if fast:  # the gradient comes back in the input's own layout: no copy for a leaf
            layout = torch.channels_last if channels_last else torch.contiguous_format
            assert leaf.grad.is_contiguous(memory_format=layout)
    for fast_grad, plain_grad in zip(*results):
        torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-10, atol=1e-12)


class _InputSized(TorchDispatchMode):
    """Counts the new storages of ``numel`` elements that ops create (views and in-place ops create none)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() == self.numel * t.element_size()
                    and t.untyped_storage().data_ptr() not in inputs):
                self.count += 1
        return out


def test_apnb_backward_builds_one_input_sized_gradient():
    """Projected keys and pooled values both read X: their input gradients share one buffer."""
    block = APNB(64, 64, key_channels=8, value_channels=8, fusion=False).train()
    x = torch.randn(1, 64, 37, 41, requires_grad=True)
    out = block(x)
    grad = torch.ones_like(out)
    counter = _InputSized(x.numel())
    with counter:
        out.backward(grad)
    assert counter.count == 1  # x.grad, written once; autograd alone makes two and adds them


@pytest.mark.parametrize("geometry", [dict(padding=1), dict(padding=2, dilation=2), dict(padding=1, stride=2),
                                      dict(padding=0)])
@pytest.mark.parametrize("conv_bias", [True, False])
def test_folded_context_is_the_conv_of_afnbs_folded_output(geometry, conv_bias):
    """K * (F_o O + F_x X + c) as (K F_x) * X + (K F_o) * O + a bias map, at the borders too (odd sizes)."""
    from torch import nn

    from annseg.layers.conv import FoldedContext

    torch.manual_seed(0)
    block = randomize(AFNB(6, 10, key_channels=4, value_channels=5)).double().eval().fuse_for_inference()
    conv = nn.Conv2d(10, 7, 3, bias=conv_bias, **geometry).double()
    low, high = torch.randn(2, 6, 9, 7, dtype=torch.float64), torch.randn(2, 10, 11, 13, dtype=torch.float64)
    with torch.no_grad():
        expected = conv(block(low, high))
        folded = FoldedContext(block.folded, conv)(block.attend(low, high), high)
    torch.testing.assert_close(folded, expected, rtol=0, atol=1e-10 * expected.abs().max().item())


def test_folded_context_refuses_an_output_with_relu():
    from torch import nn

    from annseg.layers.conv import FoldedContext

    block = randomize(APNB(8, key_channels=4, value_channels=4)).eval().fuse_for_inference()  # fusion ends in ReLU
    with pytest.raises(TypeError, match="affine"):
        FoldedContext(block.folded, nn.Conv2d(8, 3, 3, padding=1))
