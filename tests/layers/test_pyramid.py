import pytest
import torch
import torch.nn.functional as F

from annseg.layers import PyramidSampling


def reference(x: torch.Tensor, sizes) -> torch.Tensor:
    return torch.cat([F.adaptive_avg_pool2d(x, s).flatten(2) for s in sizes], dim=2)


@pytest.mark.parametrize("shape", [(2, 5, 45, 21), (1, 3, 2, 5), (1, 2, 1, 1), (2, 4, 96, 128), (1, 1, 7, 9)])
@pytest.mark.parametrize("sizes", [(1, 3, 6, 8), (1,), (2, 4), (1, 3, 6, 8, 12)])
def test_equals_adaptive_avg_pool(shape, sizes):
    x = torch.randn(*shape, dtype=torch.float64)
    out = PyramidSampling(sizes)(x)
    assert out.shape == (shape[0], shape[1], sum(s * s for s in sizes))
    torch.testing.assert_close(out, reference(x, sizes))


def test_channels_last_input():
    x = torch.randn(2, 8, 13, 17)
    out = PyramidSampling()(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, reference(x, (1, 3, 6, 8)), atol=1e-6, rtol=1e-5)


def test_num_anchors_and_gradient():
    sample = PyramidSampling((1, 3, 6, 8))
    assert sample.num_anchors == 110
    x = torch.randn(1, 2, 10, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sample, (x,))


@pytest.mark.parametrize("sizes", [(), (0, 3), (1.5,), (-1,)])
def test_bad_sizes_are_rejected(sizes):
    with pytest.raises(ValueError, match="pooling sizes"):
        PyramidSampling(sizes)


def test_training_after_inference_mode_at_the_same_size():
    """Cached pooling matrices must not be inference tensors (Lightning validates under inference_mode)."""
    sample = PyramidSampling((1, 2, 5))
    with torch.inference_mode():
        sample(torch.randn(1, 2, 31, 37))
    x = torch.randn(1, 2, 31, 37, requires_grad=True)
    sample(x).sum().backward()
    assert x.grad is not None


def test_channels_last_view_matches_contiguous():
    """A projected key is a channels-last view of tokens; pooling must read it as such, exactly."""
    tokens = torch.randn(2, 13 * 9, 7)
    x = tokens.transpose(1, 2).unflatten(2, (13, 9))  # (2, 7, 13, 9), channels-last
    sample = PyramidSampling((1, 3, 6, 8))
    torch.testing.assert_close(sample(x), sample(x.contiguous()), atol=1e-6, rtol=1e-5)


def test_exported_with_dynamic_size_pools_other_sizes_correctly():
    """torch.export (the ONNX exporter's front end) must compute the bins from the run-time size."""
    dynamic = torch.export.Dim.DYNAMIC
    exported = torch.export.export(PyramidSampling(), (torch.randn(2, 3, 24, 32),),
                                   dynamic_shapes=({2: dynamic, 3: dynamic},)).module()
    for height, width in ((45, 21), (7, 9), (16, 48)):
        x = torch.randn(2, 3, height, width)
        torch.testing.assert_close(exported(x), reference(x, (1, 3, 6, 8)), atol=1e-6, rtol=1e-5)
