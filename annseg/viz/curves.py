"""Training curves of a run: loss, learning rate, val mIoU and per-class IoU against iteration,
read from the run's ``logs/metrics.csv`` (one row per logged step, empty cells for the metrics
that step did not log)."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from annseg.viz.figures import DPI, pyplot

# The x axis: the iteration when the log records it, else Lightning's step.
X_COLUMNS = ("iteration", "step")
PANELS = (("train/loss", "training loss", False), ("train/lr", "learning rate", False), ("val/mIoU", "val mIoU", True))
# Per-class IoU columns: val/IoU/<class>, val/IoU_<class>, val/iou-<class> and the like.
CLASS_IOU = re.compile(r"^val/iou[/_\-. ](?P<name>.+)$", re.IGNORECASE)


def read_metrics(csv_path: Path) -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """(x column, {column: [(x, value), ...]}) of every numeric cell of ``csv_path``."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path} does not exist; give the folder of a run that `annseg train` wrote "
                                "(it holds logs/metrics.csv)")
    try:
        with csv_path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{csv_path} is not a readable CSV log ({error})") from error
    if not rows:
        raise ValueError(f"{csv_path} holds no rows yet; plot once the run has logged a step")
    x_column = next((c for c in X_COLUMNS if c in rows[0]), None)
    if x_column is None:
        raise ValueError(f"{csv_path} has no {' or '.join(X_COLUMNS)} column; columns: {', '.join(rows[0])}")
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        x = _number(row.get(x_column))
        for column, cell in row.items():
            value = _number(cell)
            if column != x_column and x is not None and value is not None:
                series.setdefault(column, []).append((x, value))
    return x_column, series


def _number(cell: str | None) -> float | None:
    try:
        value = float(cell) if cell not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


Panel = tuple[str, dict[str, list[tuple[float, float]]], bool]


def curve_panels(series: dict[str, list[tuple[float, float]]]) -> list[Panel]:
    """(title, {line name: points}, is an IoU) for each panel the log has values for: loss, lr,
    mIoU, then one panel with a line per class for the per-class IoU columns."""
    classes = {m["name"]: column for column in series if (m := CLASS_IOU.match(column))}
    panels = [(title, {title: series[column]}, iou) for column, title, iou in PANELS if column in series]
    if classes:
        panels.append(("val IoU per class", {name: series[column] for name, column in classes.items()}, True))
    return panels


def plot_curves(run_dir: Path, out: Path | None = None) -> Path:
    """Draw ``run_dir``'s curves as a PNG (default ``run_dir/curves.png``); returns its path.

    One panel each for the training loss, the learning rate and the val mIoU, and one with
    every per-class IoU column the log holds; a ValueError when the log holds none of them.
    """
    csv_path = Path(run_dir) / "logs" / "metrics.csv"
    x_column, series = read_metrics(csv_path)
    panels = curve_panels(series)
    if not panels:
        wanted = ", ".join(column for column, _, _ in PANELS)
        raise ValueError(f"{csv_path} holds no values of {wanted} or per-class IoU yet; plot once the run has logged")
    plt = pyplot()
    columns = 2 if len(panels) > 2 else len(panels)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.4 * columns, 4.2 * rows), squeeze=False)
    for ax, (title, lines, iou) in zip(axes.flat, panels):
        for name, points in lines.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", markersize=4, label=name)
        ax.set(title=title, xlabel=x_column)
        if iou:
            ax.set(ylim=(0, 1), ylabel="IoU")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", ncol=2 if len(lines) > 6 else 1)
    for ax in list(axes.flat)[len(panels):]:
        ax.remove()
    fig.suptitle(f"training curves of {Path(run_dir).resolve().name}")
    fig.tight_layout()
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
