"""Folding a network's eval-mode BatchNorms into the convolutions that feed them.

In eval mode ``bn(conv(x))`` is one affine map, so the BatchNorm pass over every activation
can go: a ResNet-50 has 53 of them. Which BatchNorm follows which conv is found by running
the network once on an example input and watching the tensors, not by module names, so any
timm backbone folds: a BatchNorm is folded only when its input is the output of a ``Conv2d``
that nothing else reads. The folded network is checked against the original on that input.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from annseg.layers.conv import fold_batchnorm


class _Uses(TorchFunctionMode):
    """Counts, for the tensors in ``watched`` (id -> tensor, kept alive so that ids stay unique),
    the torch functions that read them and return tensors (``dim()`` and ``shape`` do not count)."""

    def __init__(self, watched: dict[int, object]) -> None:
        super().__init__()
        self.watched = watched
        self.uses: Counter[int] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, Tensor) for t in tree_leaves(out)):
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, Tensor) and id(t) in self.watched:
                    self.uses[id(t)] += 1
        return out


def fold_conv_batchnorms(network: nn.Module, *example: Tensor, tolerance: float = 1e-4) -> int:
    """Fold every ``BatchNorm2d`` that reads only one ``Conv2d``'s output into that conv; return how many.

    ``network`` must be in eval mode. ``example`` is an input to trace which module feeds which;
    after folding the network's output on it must match the unfolded one within ``tolerance``
    (relative to its largest value), else a RuntimeError is raised and nothing is left half done.
    """
    if network.training:
        raise RuntimeError("folding BatchNorms uses their running statistics; call .eval() first")
    produced: dict[int, tuple[nn.Conv2d, Tensor]] = {}
    calls: Counter[int] = Counter()
    fed_by: dict[nn.BatchNorm2d, tuple[nn.Conv2d, int]] = {}

    def conv_done(module: nn.Module, _: object, output: Tensor) -> None:
        calls[id(module)] += 1
        produced[id(output)] = (module, output)  # the output is kept so that its id stays its own

    def norm_starts(module: nn.Module, inputs: tuple) -> None:
        calls[id(module)] += 1
        source = produced.get(id(inputs[0]))
        if source is not None:
            fed_by[module] = (source[0], id(inputs[0]))

    handles = []
    for module in network.modules():
        if type(module) is nn.Conv2d:
            handles.append(module.register_forward_hook(conv_done))
        elif type(module) is nn.BatchNorm2d:  # exactly: timm's BatchNormAct2d adds an activation
            handles.append(module.register_forward_pre_hook(norm_starts))
    uses = _Uses(produced)
    try:
        with torch.no_grad(), uses:
            before = network(*example)
    finally:
        for handle in handles:
            handle.remove()
    pairs = [(norm, conv) for norm, (conv, output) in fed_by.items()
             if uses.uses[output] == 1 and calls[id(norm)] == 1 and calls[id(conv)] == 1
             and norm.track_running_stats and norm.running_mean is not None]
    produced.clear()
    if not pairs:
        return 0
    parents = {child: (parent, name) for parent in network.modules() for name, child in parent.named_children()}
    saved = {id(conv): (conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach().clone())
             for _, conv in pairs}
    for norm, conv in pairs:
        _fold_into(conv, norm)
        parent, name = parents[norm]
        setattr(parent, name, nn.Identity())
    with torch.no_grad():
        after = network(*example)
    error = relative_change(before, after)
    if not error <= tolerance:  # undo: the network is as it was
        for norm, conv in pairs:
            weight, bias = saved[id(conv)]
            with torch.no_grad():
                conv.weight.copy_(weight)
            conv.bias = None if bias is None else nn.Parameter(bias)
            parent, name = parents[norm]
            setattr(parent, name, norm)
        raise RuntimeError(f"folding {len(pairs)} BatchNorms changed the output by {error:.2e} of its largest value "
                           f"(tolerance {tolerance:.0e}); the network is left unfolded")
    return len(pairs)


def relative_change(before: Tensor, after: Tensor) -> float:
    """The largest change from ``before`` to ``after``, relative to ``before``'s largest value: how a fold is checked."""
    return float((after - before).abs().max()) / max(float(before.abs().max()), 1e-12)


def _fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """``conv`` computes ``norm(conv(x))`` (eval statistics); its weight keeps its memory layout."""
    out_channels = conv.weight.shape[0]
    weight, bias = fold_batchnorm(conv.weight.reshape(out_channels, -1), conv.bias, norm)
    with torch.no_grad():
        conv.weight.copy_(weight.view_as(conv.weight))
        if conv.bias is None:
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype))
        else:
            conv.bias.copy_(bias)
