"""Published checkpoints of other code bases as annseg checkpoints.

``CONVERTERS`` maps a format name to ``load(path, dataset=None) -> (model, meta)``, the
pair ``engine.checkpoint.load_model`` returns; ``save_model(out, model, meta)`` then writes
an ordinary annseg checkpoint that ``annseg eval`` and ``annseg predict`` read.
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
