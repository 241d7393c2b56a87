"""Reading foreign weight files and loading them strictly: one place for both.

Backbone weights and published checkpoints (mmsegmentation, the authors') come as state
dicts under various wrappers and prefixes. ``read_state_dict`` unwraps them;
``load_exactly`` loads a renamed state dict into a module and fails, listing every
unmatched key on either side, instead of silently leaving weights at their initial values.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def read_state_dict(path: str | Path, what: str = "weights") -> dict[str, Tensor]:
    """The tensors of a .pth/.pt/.bin (torch.save) or .safetensors file, unwrapped.

    Training checkpoints nest the weights under ``state_dict`` or ``model``; DataParallel
    adds a ``module.`` prefix. ``what`` names the file's role in error messages.
    """
    return unwrap_state_dict(read_file(path, what), path, what)


class UnsafeFileError(ValueError):
    """A file holds something other than plain data (a pickled object that would run code)."""


def read_file(path: str | Path, what: str = "weights", mmap: bool = False) -> Any:
    """What a torch.save (tensors and plain containers only) or .safetensors file holds.

    The one place annseg reads a torch file a user hands in. It never unpickles arbitrary
    objects (``weights_only=True``): a file that holds one is refused with an
    ``UnsafeFileError`` naming it, and nothing in it runs. ``mmap`` maps the tensors instead
    of reading them (a quick look at a large checkpoint's entries).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory; expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist (annseg never downloads weights)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error) and "Unsupported operand" not in str(error):
            raise UnsafeFileError(f"{what} {path} holds {_unpickler_complaint(str(error))}; annseg loads plain "
                                  "data only (tensors, numbers, strings, lists, dicts) and never runs code from a "
                                  "file: use a file annseg or `annseg convert` wrote, or one from a source you "
                                  "trust re-saved as plain tensors") from None
        raise ValueError(f"cannot read {what} {path}: it is truncated or not a torch file "
                         f"({_unpickler_detail(error)})") from None
    except Exception as error:  # torch raises several types for truncated / foreign files
        raise ValueError(f"cannot read {what} {path}: {_first_line(error)}") from None


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _unpickler_complaint(message: str) -> str:
    """What torch's weights-only unpickler refused, in a few words (its message spans lines)."""
    if match := _UNSUPPORTED_GLOBAL.search(message):
        return f"a pickled object ({match.group(1)})"
    detail = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", message, re.S)
    words = " ".join(detail.group(1).split()) if detail else ""
    return f"data that is not plain ({words or 'a pickled object'})"


def _unpickler_detail(error: Exception) -> str:
    """The unpickler's own complaint about a damaged file (torch wraps it in a page of advice)."""
    text = str(error)
    if match := re.search(r"(Unsupported operand \S+)", text):
        return match.group(1)
    return _first_line(error)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def unwrap_state_dict(content: Any, path: str | Path, what: str = "weights") -> dict[str, Tensor]:
    """The state dict inside ``content`` (what ``read_file`` returned for ``path``)."""
    state = content
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{what} {path} do not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def mismatch_report(expected: Mapping[str, Tensor], given: Mapping[str, Tensor], limit: int = 10) -> str:
    """'' when ``given`` has exactly ``expected``'s keys and shapes, else a list of the differences."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [f"{k}: file {tuple(given[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in given and given[k].shape != v.shape]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_exactly(
    module: nn.Module,
    state: Mapping[str, Tensor],
    source: str,
    target: str = "",
    hint: str = "",
    names: Callable[[str], str] | None = None,
    assign: bool = False,
) -> None:
    """``module.load_state_dict(state, assign=assign)`` requiring the same keys and shapes on both sides.

    The error names ``source`` (the file) and ``target`` (the model) and lists the unmatched
    keys, passed through ``names`` when given (a converter maps annseg's keys back to the
    file's, which its users know); ``hint`` says how to fix it. ``assign`` makes the given
    tensors the module's own (for a module built on the meta device).
    """
    rename = names or (lambda key: key)
    report = mismatch_report({rename(k): v for k, v in module.state_dict().items()},
                             {rename(k): v for k, v in state.items()})
    if report:
        raise ValueError(f"{source} does not match {target or type(module).__name__}: {report}" + (f". {hint}" if hint else ""))
    module.load_state_dict(state, assign=assign)
