"""The picture of where query points attend: ``annseg attention``.

One row per query point: the image with the point marked (a numbered circle), then one panel
per pyramid level (1x1, 3x3, 6x6, 8x8). In a level's panel each pooled cell shades the image
pixels its adaptive-pooling bin averages (``AttentionMaps.cell_masks``), by its attention
weight. Where a size does not divide the map, neighbouring bins share feature rows or columns;
a pixel there is averaged by several cells, and its shade is the sum of their weights, the
weight the level puts on that pixel's feature position through all the cells that read it.
The shade runs from none (0) to full at the largest such sum in the point's row (one scale
for all its levels, so they compare), printed at the right end of the bars; a panel's title
gives the share of the point's attention that falls on that level. Pillow only; small images
are upscaled by nearest-neighbour as the overlays are (``overlay.upscale_factor``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from annseg.viz.overlay import BLACK, BORDER, FADE, LEGEND_FONT, TITLE_FONT, TITLE_HEIGHT, WHITE, _enlarge, _font, \
    _ui_scale, upscale_factor

if TYPE_CHECKING:
    from annseg.engine.attention import AttentionMaps

SHADE = 0.85  # the colour's share at full weight; the faded photo keeps the rest
# Light yellow (little weight) to dark red (the panel's largest).
RAMP = np.array([(255, 237, 160), (254, 178, 76), (240, 59, 32), (128, 0, 38)], np.float32)
BAR_HEIGHT = 10
MARKER = 9  # radius of a query point's numbered circle at scale 1


def _ramp(t: np.ndarray) -> np.ndarray:
    """(..., 3) float32 colours of ``t`` in [0, 1] along ``RAMP``."""
    position = t * (len(RAMP) - 1)
    low = np.clip(np.floor(position).astype(int), 0, len(RAMP) - 2)
    share = (position - low)[..., None]
    return (1 - share) * RAMP[low] + share * RAMP[low + 1]


def level_weight(weights: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(H, W) float: each pixel's summed weight over the cells whose bins cover it.

    ``weights`` (s * s,) of one point and level; ``masks`` (s * s, H, W) from ``cell_masks``."""
    return np.tensordot(weights.astype(np.float64), masks.astype(np.float64), axes=1)


def shade(image: np.ndarray, weight: np.ndarray, top: float) -> np.ndarray:
    """(H, W, 3) uint8: ``image`` faded towards white, shaded by ``weight`` (H, W) from 0 to ``top``.

    A pixel of weight 0 shows the faded photo unchanged."""
    faded = FADE * image.astype(np.float32) + (1 - FADE) * 255
    t = np.clip(weight / top, 0, 1).astype(np.float32) if top > 0 else np.zeros(weight.shape, np.float32)
    mix = (SHADE * t)[..., None]
    return ((1 - mix) * faded + mix * _ramp(t)).round().clip(0, 255).astype(np.uint8)


def _marker(draw: ImageDraw.ImageDraw, centre: tuple[float, float], number: int | None, scale: int) -> None:
    """A white circle with a black ring and the point's number; ``None``: a small cross only."""
    x, y = centre
    if number is None:
        arm = 4 * scale
        for dx, dy in ((arm, 0), (0, arm)):
            draw.line((x - dx, y - dy, x + dx, y + dy), fill=BLACK, width=3 * scale)
            draw.line((x - dx, y - dy, x + dx, y + dy), fill=WHITE, width=scale)
        return
    radius = MARKER * scale
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=WHITE, outline=BLACK, width=2 * scale)
    draw.text((x, y), str(number), fill=BLACK, font=_font(LEGEND_FONT * scale - 2), anchor="mm")


def attention_picture(image: np.ndarray, maps: AttentionMaps) -> Image.Image:
    """The picture of ``maps`` over ``image`` (H, W, 3) uint8: a row per point, a panel per level."""
    if image.shape[:2] != tuple(maps.image):
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} but the attention was computed on a "
                         f"{maps.image[1]}x{maps.image[0]} image")
    factor = upscale_factor(*image.shape[:2])
    photo = _enlarge(image, factor)
    height, width = photo.shape[:2]
    scale = _ui_scale(height, width)
    border, title_height, bar = BORDER * scale, TITLE_HEIGHT * scale, BAR_HEIGHT * scale
    label_height = LEGEND_FONT * scale + 2 * border
    row_height = title_height + height + border + bar + label_height
    levels = maps.levels()
    masks = {size: maps.cell_masks(size) for size, _ in levels}
    columns = 1 + len(levels)
    total = columns * width + (columns - 1) * border
    note = (f"{maps.block.upper()}: anchors pooled from the {maps.feature[0]}x{maps.feature[1]} feature map "
            f"(stride {maps.stride[0]:g}). Shade: a cell's attention weight over the pixels its bin averages, "
            "from 0 to the bar's number; where bins overlap, their weights add up.")
    note_font = _font(LEGEND_FONT * scale)
    note_lines = _wrap(note, note_font, total - 2 * border)
    canvas = Image.new("RGB", (total, len(maps.points) * row_height + len(note_lines) * label_height), WHITE)
    draw = ImageDraw.Draw(canvas)
    title_font = _font(TITLE_FONT * scale)
    ramp = Image.fromarray(_ramp(np.linspace(0, 1, width))[None].repeat(bar, 0).round().astype(np.uint8))
    for index, (x, y) in enumerate(maps.points):
        top = index * row_height
        centre = ((x + 0.5) * factor if isinstance(x, int) else x * factor,
                  top + title_height + ((y + 0.5) * factor if isinstance(y, int) else y * factor))
        canvas.paste(Image.fromarray(photo), (0, top + title_height))
        draw.text((width // 2, top + title_height // 2), f"point {index + 1} at ({x:g}, {y:g})", fill=BLACK,
                  font=title_font, anchor="mm")
        pixel_weights = [level_weight(weights[index].reshape(-1), masks[size]) for size, weights in levels]
        peak = max(float(w.max()) for w in pixel_weights)  # one scale per row: the levels compare
        for column, ((size, weights), weight) in enumerate(zip(levels, pixel_weights), start=1):
            left = column * (width + border)
            canvas.paste(Image.fromarray(_enlarge(shade(image, weight, peak), factor)), (left, top + title_height))
            share = float(weights[index].sum())
            draw.text((left + width // 2, top + title_height // 2), f"{size}x{size}: {share:.0%} of the weight",
                      fill=BLACK, font=title_font, anchor="mm")
            bar_top = top + title_height + height + border
            canvas.paste(ramp, (left, bar_top))
            for text, (where, anchor) in (("0", (left, "la")), (f"{peak:.3g}", (left + width, "ra"))):
                draw.text((where, bar_top + bar + border // 2), text, fill=BLACK, font=note_font, anchor=anchor)
            _marker(draw, (centre[0] + left, centre[1]), None, scale)
        _marker(draw, centre, index + 1, scale)
    for line_index, line in enumerate(note_lines):
        draw.text((border, len(maps.points) * row_height + line_index * label_height + border), line, fill=BLACK,
                  font=note_font)
    return canvas


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` px."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return lines + [line]
