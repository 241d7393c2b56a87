"""matplotlib, imported only when a figure is drawn (it is an optional extra), with one readable style."""

from __future__ import annotations

from typing import Any

# Sizes in points, at the dpi the figures are saved with: readable at 100 % zoom.
STYLE = {"font.size": 12, "axes.titlesize": 13, "axes.labelsize": 12, "xtick.labelsize": 11,
         "ytick.labelsize": 11, "legend.fontsize": 10, "figure.titlesize": 14}
DPI = 100


def pyplot(extra: str = "plot") -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend with ``STYLE``; a ValueError saying which
    extra to install when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as error:
        raise ValueError(f'this picture needs matplotlib: pip install "annseg[{extra}]"') from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(STYLE)
    return plt
