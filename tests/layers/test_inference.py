"""The fast paths every block shares: fuse_for_inference, torch.compile, autocast, projection fusion."""

import pytest
import torch

from annseg.layers import AFNB, APNB, NonLocal2d
from annseg.layers.conv import Projection, project_together
from tests.conftest import CUDA
from tests.layers.reference import randomize

BLOCKS = {  # name -> (block, inputs); tiny channels, odd sizes
    "apnb": (lambda **o: APNB(12, 10, key_channels=6, value_channels=5, **o), lambda: (torch.randn(2, 12, 15, 11),)),
    "apnb-separate-qk": (lambda **o: APNB(12, 10, key_channels=6, value_channels=5, share_query_key=False, **o),
                         lambda: (torch.randn(2, 12, 9, 13),)),
    "nb": (lambda **o: NonLocal2d(12, key_channels=6, value_channels=5, **o), lambda: (torch.randn(2, 12, 7, 9),)),
    "afnb": (lambda **o: AFNB(6, 10, 8, key_channels=4, value_channels=5, norm_after_w=True, **o),
             lambda: (torch.randn(2, 6, 12, 9), torch.randn(2, 10, 7, 5))),
    "afnb-all-positions": (lambda **o: AFNB(6, 10, key_channels=4, value_channels=5, sizes=None, **o),
                           lambda: (torch.randn(2, 6, 6, 5), torch.randn(2, 10, 6, 5))),
}


def build(name: str, **options):
    make, inputs = BLOCKS[name]
    return randomize(make(**options)).eval(), inputs()


@pytest.mark.parametrize("fusion", [True, False])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_fuse_for_inference_keeps_the_output(name, fusion):
    block, inputs = build(name, fusion=fusion)
    with torch.no_grad():
        expected = block(*inputs)
        assert block.fuse_for_inference() is block
        out = block(*inputs)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in block.modules())
    assert (block.folded is not None) == fusion
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_fuse_for_inference_needs_eval_mode():
    block, _ = build("apnb")
    with pytest.raises(RuntimeError, match="eval"):
        block.train().fuse_for_inference()


@pytest.mark.parametrize("name", ["apnb", "nb", "afnb"])
def test_torch_compile_gives_the_same_output_and_gradients(name):
    """Dynamo traces every block without graph breaks; aot_eager keeps the test fast on the CPU."""
    block, inputs = build(name)
    block.train()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    out = compiled(*inputs)
    torch.manual_seed(1)  # the same dropout masks
    expected = block(*inputs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    grads = torch.autograd.grad(out.square().sum(), list(block.parameters()))
    expected_grads = torch.autograd.grad(expected.square().sum(), list(block.parameters()))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["apnb", "afnb"])
def test_torch_compile_inductor_gives_the_same_output(name):
    block, inputs = build(name)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(block)(*inputs), block(*inputs), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("name", ["apnb", "nb", "afnb"])
def test_bf16_autocast_close_to_fp32(name, folded):
    block, inputs = build(name)
    if folded:
        block.fuse_for_inference()
    with torch.no_grad():
        expected = block(*inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(*inputs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


def test_project_together_equals_separate_projections_in_training():
    """One wide matmul, each projection's own batch statistics, the same gradients."""
    projections = [randomize(Projection(12, 6)), randomize(Projection(12, 4, norm=False, act=False)),
                   randomize(Projection(12, 5, bias=False))]
    for p in projections:
        p.train()
    tokens = torch.randn(2, 30, 12, requires_grad=True)
    together = project_together(tokens, *projections)
    separate = [p(tokens) for p in projections]
    for a, b in zip(together, separate):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    grad = torch.autograd.grad(sum(t.square().sum() for t in together), tokens)[0]
    expected = torch.autograd.grad(sum(t.square().sum() for t in separate), tokens)[0]
    torch.testing.assert_close(grad, expected, atol=1e-4, rtol=1e-4)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["apnb", "nb", "afnb"])
def test_cuda_autocast_and_folding(name, dtype):
    block, inputs = build(name)
    block, inputs = block.cuda(), [x.cuda() for x in inputs]
    with torch.no_grad():
        expected = block(*inputs)
        block.fuse_for_inference()
        torch.testing.assert_close(block(*inputs), expected, atol=1e-4, rtol=1e-3)
        with torch.autocast("cuda", dtype=dtype):
            out = block(*inputs)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


@CUDA
def test_cuda_torch_compile_inductor():
    block, inputs = build("apnb")
    block, inputs = block.cuda(), [x.cuda() for x in inputs]
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(block)(*inputs), block(*inputs), atol=1e-4, rtol=1e-3)
