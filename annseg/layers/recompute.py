"""Training with less activation memory: keep a BatchNorm's input, rebuild what follows it.

In a conv -> BatchNorm -> ReLU -> conv chain, autograd keeps two maps per BatchNorm: its
input (for its own backward) and the ReLU's output (for the ReLU's backward and the next
conv's weight gradient). The second is a function of the first. A residual block's output
``relu(bn(conv(x)) + shortcut)`` is likewise a function of the last conv's output and the
shortcut. While ``RecomputeNormAct`` is active, such tensors are saved as *recipes* instead
(``torch.autograd.graph.saved_tensors_hooks``), and the backward rebuilds each one once from
what autograd keeps anyway, when it is first needed: a BatchNorm pass, an add and a ReLU,
cheap beside the convolutions. One map per BatchNorm is then freed after the forward.

The recipes are found by watching the forward's torch functions (``F.batch_norm`` in training
mode, then in-place ``relu`` and ``add_`` on its output), so any network built that way
benefits, whatever its module names (timm's ResNets, annseg's heads). A tensor is saved as a
recipe only if every in-place change since the BatchNorm was one of those seen; anything else
leaves it to autograd. The rebuild calls the same functions on the same tensors, so outputs,
gradients and BatchNorm statistics are bit for bit those of the plain forward
(``tests/layers/test_recompute.py``).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


class _Recipe:
    """How to rebuild one version of a tensor: a training-mode ``F.batch_norm`` of a kept input,
    followed by in-place ``relu`` and ``add_`` steps (an added tensor may itself be a recipe)."""

    def __init__(self, norm_args: tuple, steps: tuple = ()) -> None:
        self.norm_args, self.steps = norm_args, steps  # F.batch_norm's arguments, in its positional order
        self.packed = False  # saved by autograd somewhere: its rebuild is cached for the other readers
        self.cached: Tensor | None = None

    def then(self, step: tuple) -> "_Recipe":
        return _Recipe(self.norm_args, self.steps + (step,))

    def rebuild(self) -> Tensor:
        """The tensor, built once and kept while autograd or a later recipe holds this recipe."""
        if self.cached is None:
            self.cached = self.value()
        return self.cached

    def value(self) -> Tensor:
        """A fresh copy of the tensor: the forward's functions, in the same order, on the same tensors."""
        args = list(self.norm_args)  # input, running_mean, running_var, weight, bias, training, momentum, eps
        # Copies of the running statistics: the forward has updated them once already.
        args[1:3] = [s.clone() if isinstance(s, Tensor) else s for s in args[1:3]]
        with torch.no_grad():
            out = F.batch_norm(*args)
            for kind, other, alpha in self.steps:
                if kind == "relu":
                    out = out.relu_()
                else:
                    if isinstance(other, _Recipe):
                        other = other.rebuild() if other.packed else other.value()
                    out = out.add_(other, alpha=alpha)
        return out


class RecomputeNormAct(TorchFunctionMode):
    """Context for one training forward: BatchNorm outputs and what follows them saved as recipes.

    Use it around the forward only; the backward may run after the context has closed. Under
    autocast it does nothing (the BatchNorm may run in another precision than it was called in).
    """

    def __init__(self) -> None:
        super().__init__()
        self._tracked: dict[int, tuple[weakref.ref, int, _Recipe]] = {}  # id -> (tensor, version, recipe)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def __enter__(self) -> "RecomputeNormAct":
        super().__enter__()
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        super().__exit__(*exc)
        self._tracked.clear()  # the saved recipes hold what they need

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        following = self._next_recipe(name, args, kwargs)
        if following is None:
            out = func(*args, **kwargs)
            if name == "batch_norm" and func is F.batch_norm:
                self._track_norm(out, args, kwargs)
            return out
        # An in-place step on a tracked tensor: autograd saves the result inside the call (the
        # ReLU keeps its output), so the next version's recipe is in place before it.
        tensor = args[0]
        self._tracked[id(tensor)] = (weakref.ref(tensor), tensor._version + 1, following)
        try:
            out = func(*args, **kwargs)
        except BaseException:
            self._tracked.pop(id(tensor), None)
            raise
        if out is not tensor or tensor._version != self._tracked[id(tensor)][1]:  # not the step we expected
            self._tracked.pop(id(tensor), None)
        return out

    def _next_recipe(self, name: str, args: tuple, kwargs: dict) -> _Recipe | None:
        """The recipe after an in-place ``relu`` or ``add_`` on a tracked tensor, else None."""
        recipe = self._recipe_of(args[0]) if name in ("relu", "relu_", "add_") and args else None
        if recipe is None:
            return None
        if name == "relu_" and len(args) == 1 and not kwargs:
            return recipe.then(("relu", None, 1))
        if name == "relu" and len(args) == 1 and kwargs.get("inplace", False) and set(kwargs) <= {"inplace"}:
            return recipe.then(("relu", None, 1))
        if name == "add_" and len(args) == 2 and set(kwargs) <= {"alpha"} and isinstance(args[1], Tensor):
            return recipe.then(("add", self._recipe_of(args[1]) or args[1], kwargs.get("alpha", 1)))
        return None

    def _track_norm(self, out: Tensor, args: tuple, kwargs: dict) -> None:
        bound = _bind_batch_norm(args, kwargs)
        source = bound[0]
        if (bound[5] and isinstance(out, Tensor) and isinstance(source, Tensor) and out.dtype == source.dtype
                and torch.is_grad_enabled() and not torch.is_autocast_enabled(source.device.type)):
            self._track(out, _Recipe(tuple(bound)))

    def _track(self, tensor: Tensor, recipe: _Recipe) -> None:
        self._tracked[id(tensor)] = (weakref.ref(tensor), tensor._version, recipe)

    def _recipe_of(self, tensor: object) -> _Recipe | None:
        """The recipe of ``tensor`` as it is now, if every change to it since its BatchNorm was seen."""
        entry = self._tracked.get(id(tensor))
        if entry is None or entry[0]() is not tensor or tensor._version != entry[1]:
            return None
        return entry[2]

    def _pack(self, tensor: Tensor) -> Tensor | _Recipe:
        recipe = self._recipe_of(tensor)
        if recipe is None:
            return tensor
        recipe.packed = True
        return recipe


def _unpack(saved: Tensor | _Recipe) -> Tensor:
    if not isinstance(saved, _Recipe):
        return saved
    if torch.is_grad_enabled():  # a backward with create_graph=True would differentiate through a rebuilt copy
        raise RuntimeError("a tensor saved by RecomputeNormAct (the network's recompute_norm_act option) was read with "
                           "gradients enabled, as a double backward (create_graph=True) does; its rebuilt copy has no "
                           "history, so build the network with recompute_norm_act=False for higher-order gradients")
    return saved.rebuild()


_BATCH_NORM_PARAMETERS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BATCH_NORM_DEFAULTS: dict[str, Any] = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


def _bind_batch_norm(args: tuple, kwargs: dict) -> list[Any]:
    """``F.batch_norm``'s arguments in its positional order, defaults filled in."""
    values = dict(zip(_BATCH_NORM_PARAMETERS, args), **kwargs)
    return [values[name] if name in values else _BATCH_NORM_DEFAULTS[name] for name in _BATCH_NORM_PARAMETERS]
