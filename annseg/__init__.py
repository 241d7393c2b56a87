"""annseg: Asymmetric Non-local Neural Networks for semantic segmentation (Zhu et al., ICCV 2019)."""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from annseg import losses
from annseg.layers import AFNB, APNB, NonLocal2d, PyramidSampling, attention

try:
    __version__ = version("annseg")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

_LAZY = {"ANN", "create_model", "list_models"}  # importing timm takes seconds; only when used


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from annseg import models

        return getattr(models, name)
    if name == "load":  # annseg.load(path) -> Segmenter; imports the engine (and timm) when used
        from annseg.engine.segmenter import load

        return load
    raise AttributeError(f"module 'annseg' has no attribute {name!r}")


__all__ = ["losses", "AFNB", "APNB", "ANN", "NonLocal2d", "PyramidSampling", "attention", "create_model", "list_models", "load", "__version__"]
