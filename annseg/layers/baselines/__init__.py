"""Other papers' context modules, the baselines of the efficiency comparison (not part of ANN).

Each is written in plain PyTorch from its paper and its authors' public code, on the same
(B, C, H, W) input as APNB, so that ``annseg bench blocks`` can measure them side by side.
"""

from annseg.layers.baselines.cc import CrissCrossAttention
from annseg.layers.baselines.denseaspp import DenseASPP
from annseg.layers.baselines.psa import PointwiseSpatialAttention

__all__ = ["CrissCrossAttention", "DenseASPP", "PointwiseSpatialAttention"]
