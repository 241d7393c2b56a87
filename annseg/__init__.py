"""annseg: Asymmetric Non-local Neural Networks for semantic segmentation (Zhu et al., ICCV 2019)."""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from annseg import losses
from annseg.layers import AFNB, APNB, NonLocal2d, PyramidSampling, attention

try:
    __version__ = _version("annseg")
except _PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

_LAZY = {"ANN", "create_model", "list_models"}  # importing timm takes seconds; only when used


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from annseg import models

        return getattr(models, name)
    if name == "load":  # annseg.load(path) -> Segmenter; imports the engine (and timm) when used
        from annseg.engine.segmenter import load

        return load
    raise AttributeError(f"module 'annseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, the lazy ones included (``dir()`` ignores ``__all__``), without helpers."""
    return sorted({name for name in globals() if not name.startswith("_") or name.startswith("__")} | set(__all__))


__all__ = ["losses", "AFNB", "APNB", "ANN", "NonLocal2d", "PyramidSampling", "attention", "create_model", "list_models", "load", "__version__"]
