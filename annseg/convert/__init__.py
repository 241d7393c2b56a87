"""Published checkpoints of other code bases -> annseg models that compute the same function.

Each converter reads a foreign checkpoint file and returns ``(model in eval mode, meta)`` with
meta as ``annseg.engine.checkpoint.load_model`` returns it, ready for ``save_model``.
"""

from annseg.convert.authors import load_authors_checkpoint

CONVERTERS = {"authors": load_authors_checkpoint}

__all__ = ["CONVERTERS", "load_authors_checkpoint"]
