"""Published checkpoints of other code bases as annseg checkpoints.

``CONVERTERS`` maps a format name to ``load(path, dataset=None) -> (model, meta)``: the
model in eval mode and ``common.converted_meta``'s metadata, from which
``engine.checkpoint.save_model(out, model, meta)`` writes an ordinary annseg checkpoint that
``annseg eval`` and ``annseg predict`` read (``load_model`` gives both back).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from annseg.convert.authors import load_authors_checkpoint
from annseg.convert.mmseg import load_mmseg_checkpoint
from annseg.models.ann import ANN

CONVERTERS: dict[str, Callable[..., tuple[ANN, dict[str, Any]]]] = {
    "mmseg": load_mmseg_checkpoint,
    "authors": load_authors_checkpoint,
}

__all__ = ["CONVERTERS", "load_authors_checkpoint", "load_mmseg_checkpoint"]
