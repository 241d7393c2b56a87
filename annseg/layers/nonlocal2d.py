"""NonLocal2d, the standard non-local block: our baseline for the efficiency study."""

from __future__ import annotations

from typing import Any

from annseg.layers.apnb import APNB


class NonLocal2d(APNB):
    """Attention from every position to all N positions: APNB without pyramid sampling.

    Same projections, attention kernel and fusion as ``APNB`` (keyword options as there,
    except ``sizes``), so the two differ only in what they attend to: O(C N^2) time. With
    the fused kernel the N x N similarity map is never held whole in memory.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, **options: Any) -> None:
        if "sizes" in options:
            raise TypeError("NonLocal2d attends to all positions and takes no 'sizes'; use APNB")
        super().__init__(in_channels, out_channels, sizes=None, **options)
