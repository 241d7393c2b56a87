"""RecomputeNormAct: ReLU and residual outputs saved as recipes give the plain forward's results bit
for bit (outputs, gradients, BatchNorm statistics) while keeping less memory after the forward."""

import pytest
import torch
from torch import nn

from annseg.bench.machine import LiveTensors
from annseg.layers.recompute import RecomputeNormAct
from annseg.losses import ANNLoss
from annseg.models import create_model

SMALL = dict(head_channels=16, key_channels=8, value_channels=8, aux_channels=8)


def _step(model: nn.Module, image: torch.Tensor, masks: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Outputs, gradients and BatchNorm buffers of one training step, and the bytes alive after the forward."""
    torch.manual_seed(3)  # the same dropout masks
    with LiveTensors() as live:
        main, aux = model(image)
        after_forward = live.current
        ANNLoss(aux_weight=0.4, ohem=False)((main, aux), masks).backward()
    buffers = [b.clone() for b in model.buffers()]
    return [main.detach(), aux.detach(), *[p.grad for p in model.parameters()], *buffers], after_forward


@pytest.mark.parametrize("backbone, channels_last", [("resnet18", True), ("resnet50", True), ("resnet50", False)])
def test_recomputed_training_step_is_bit_for_bit_the_plain_one_with_less_memory(backbone, channels_last):
    results = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model = create_model(f"ann_{backbone}", num_classes=4, channels_last=channels_last,
                             recompute_norm_act=recompute, **SMALL).train()
        image = torch.randn(2, 3, 48, 56)
        masks = torch.randint(0, 4, (2, 48, 56))
        results[recompute] = _step(model, image, masks)
    (plain, plain_bytes), (fast, fast_bytes) = results[False], results[True]
    assert len(plain) == len(fast) and all(torch.equal(a, b) for a, b in zip(plain, fast))
    # One map per BatchNorm + ReLU (and per residual output) is no longer kept.
    assert fast_bytes < 0.8 * plain_bytes, (fast_bytes, plain_bytes)


class _Chain(nn.Module):
    """conv -> BN -> [an in-place op the recipes do not know] -> ReLU -> conv, and a residual add."""

    def __init__(self, unseen: bool) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.unseen = unseen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv1(x))
        if self.unseen:
            y.mul_(0.5)  # not a recipe step: what follows must be kept as autograd keeps it
        y = torch.relu_(y)
        z = self.bn2(self.conv2(y))
        z.add_(y, alpha=0.25)
        return nn.functional.relu(z, inplace=True).square()


@pytest.mark.parametrize("unseen", [False, True])
def test_only_changes_it_has_seen_are_rebuilt(unseen):
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        chain = _Chain(unseen)
        x = torch.randn(2, 3, 9, 7, requires_grad=True)
        with RecomputeNormAct() if recompute else torch.enable_grad():
            out = chain(x)
        out.sum().backward()
        grads.append([out.detach(), x.grad, *[p.grad for p in chain.parameters()]])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    if unseen:  # and the check matters: without it, a recipe would ignore the unseen change
        assert not all(torch.equal(a, b) for a, b in zip(grads[0], _grads_with_stale_recipes(unseen)))


def _grads_with_stale_recipes(unseen: bool) -> list[torch.Tensor]:
    """The same step with the version check switched off: a recipe that ignores the unseen change."""
    from annseg.layers import recompute

    original = RecomputeNormAct._recipe_of

    def careless(self, tensor):
        entry = self._tracked.get(id(tensor))
        return None if entry is None else entry[2]

    RecomputeNormAct._recipe_of = careless  # type: ignore[method-assign]
    try:
        torch.manual_seed(0)
        chain = _Chain(unseen)
        x = torch.randn(2, 3, 9, 7, requires_grad=True)
        with recompute.RecomputeNormAct():
            out = chain(x)
        out.sum().backward()
    finally:
        RecomputeNormAct._recipe_of = original  # type: ignore[method-assign]
    return [out.detach(), x.grad, *[p.grad for p in chain.parameters()]]


def test_recipes_are_what_autograd_saves():
    """The ReLU's output is saved as a recipe, the BatchNorm's input as the tensor itself."""
    chain = _Chain(unseen=False)
    x = torch.randn(2, 3, 9, 7, requires_grad=True)
    mode = RecomputeNormAct()
    saved = []
    pack = mode._pack
    mode._pack = lambda t: saved.append(pack(t)) or saved[-1]  # type: ignore[method-assign]
    mode._hooks = torch.autograd.graph.saved_tensors_hooks(mode._pack, lambda s: s)
    with mode:
        chain(x)
    kinds = [type(s).__name__ for s in saved]
    assert "_Recipe" in kinds and "Tensor" in kinds


def test_does_nothing_under_autocast():
    chain = _Chain(unseen=False)
    x = torch.randn(2, 3, 9, 7)
    mode = RecomputeNormAct()
    with torch.autocast("cpu", dtype=torch.bfloat16), mode:
        chain(x)
        assert not mode._tracked


def test_a_double_backward_is_refused_rather_than_wrong():
    chain = _Chain(unseen=False)
    x = torch.randn(2, 3, 9, 7, requires_grad=True)
    with RecomputeNormAct():
        out = chain(x)
    with pytest.raises(RuntimeError, match="recompute_norm_act=False"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
