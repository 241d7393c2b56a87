"""Pictures of label maps for people: blends over the photo, titled panels, a legend of the classes.

Pillow only (matplotlib is an optional extra). The rules, the same for ``annseg predict`` and
``annseg demo``:

- Small images are upscaled by an integer factor with nearest-neighbour (no new colours, pixels
  stay square) until the short side is at least ``MIN_SHORT_SIDE`` px.
- The *background* class is class 0 when its name says so (``background``, ``bg``, ``void``,
  ``unlabeled``/``unlabelled``, ``other``, ``none``; any case): it is not coloured, so the photo
  shows through. Every other class is coloured, e.g. Cityscapes' class 0 ``road``.
- A blend mixes each coloured class 50/50 with the photo and leaves background pixels exactly
  as in the photo.
- A label panel (ground truth, prediction) paints the classes in solid colour over the photo
  faded towards white, so regions read exactly and the panels are light; pixels with the
  ignore label (not scored) are hatched grey.
- The legend lists the coloured classes present (and "ignored" when a panel holds such pixels),
  each with its colour swatch, in class order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_SHORT_SIDE = 256
ALPHA = 0.5  # a coloured class's share in a blend
FADE = 0.35  # the photo's share behind a label panel (the rest is white)
BACKGROUND_NAMES = frozenset({"background", "_background_", "bg", "void", "unlabeled", "unlabelled", "other", "none"})
IGNORE_INDEX = 255
WHITE, BLACK = (255, 255, 255), (0, 0, 0)
HATCH = (150, 150, 150)
# Layout at scale 1 (images up to 1023 px on the short side); larger pictures scale it up.
BORDER = 6  # white gap between panels
TITLE_HEIGHT = 28
LEGEND_ROW = 26
LEGEND_PAD = 6
SWATCH = 16
TITLE_FONT, LEGEND_FONT = 18, 15

Palette = Sequence[Sequence[int]]


def background_classes(classes: Sequence[str]) -> frozenset[int]:
    """The class ids left uncoloured: class 0 when it is named like a background."""
    return frozenset({0}) if classes and classes[0].strip().lower() in BACKGROUND_NAMES else frozenset()


def upscale_factor(height: int, width: int) -> int:
    """The smallest integer factor that brings the short side to ``MIN_SHORT_SIDE`` px (1 when it is)."""
    return max(1, math.ceil(MIN_SHORT_SIDE / max(1, min(height, width))))


def _ui_scale(height: int, width: int) -> int:
    """Text and layout grow with the picture, so that a 2048 px wide overlay stays readable."""
    return 1 + min(height, width) // 1024


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _enlarge(array: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of an (H, W) or (H, W, 3) array by an integer factor."""
    return array.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else array


def _colour_table(palette: Palette) -> np.ndarray:
    """(256, 3) float32 colours by label id, so that any uint8 label indexes it."""
    table = np.zeros((256, 3), np.float32)
    table[: len(palette)] = np.asarray(palette, np.float32)[:, :3]
    return table


def blend(image: np.ndarray, labels: np.ndarray, palette: Palette, hidden: frozenset[int] = frozenset()) -> np.ndarray:
    """(H, W, 3) uint8: ``image`` with each class of ``labels`` (H, W) mixed in at ``ALPHA``; the
    classes in ``hidden`` (the background) and ignored pixels keep the photo unchanged."""
    photo = image.astype(np.float32)
    mixed = (1 - ALPHA) * photo + ALPHA * _colour_table(palette)[labels.astype(np.uint8)]
    keep = np.isin(labels, [*hidden, IGNORE_INDEX])[..., None]
    return np.where(keep, photo, mixed).round().clip(0, 255).astype(np.uint8)


def label_panel(image: np.ndarray, labels: np.ndarray, palette: Palette, hidden: frozenset[int] = frozenset()
                ) -> np.ndarray:
    """(H, W, 3) uint8: solid class colours over the photo faded to white; ``hidden`` classes show
    the faded photo, ignored pixels a grey hatch."""
    faded = FADE * image.astype(np.float32) + (1 - FADE) * 255
    solid = _colour_table(palette)[labels.astype(np.uint8)]
    picture = np.where(np.isin(labels, list(hidden))[..., None], faded, solid)
    picture = np.where((labels == IGNORE_INDEX)[..., None], _hatch(labels.shape), picture)
    return picture.round().clip(0, 255).astype(np.uint8)


def _hatch(shape: tuple[int, ...]) -> np.ndarray:
    """(H, W, 3) diagonal grey-and-white stripes: the mark of ignored (unscored) pixels."""
    rows, cols = np.indices(shape[:2])
    return np.where((((rows + cols) // 4) % 2 == 0)[..., None], np.float32(HATCH), np.float32(WHITE))


def legend(classes: Sequence[str], palette: Palette, present: Sequence[int], width: int, scale: int = 1,
           ignored: bool = False) -> Image.Image:
    """A white strip ``width`` px wide: a colour swatch and the name of each class in ``present``
    (in that order), wrapped into rows; "ignored" with the hatch when ``ignored``."""
    font = _font(LEGEND_FONT * scale)
    row, pad, swatch = LEGEND_ROW * scale, LEGEND_PAD * scale, SWATCH * scale
    entries = [(classes[i], tuple(int(v) for v in palette[i][:3])) for i in present]
    if ignored:
        entries.append(("ignored", None))
    if not entries:
        entries.append(("background only", WHITE))
    placed, x, y = [], pad, 0
    for name, colour in entries:
        extent = swatch + pad // 2 + math.ceil(font.getlength(name)) + 2 * pad
        if x > pad and x + extent > width:
            x, y = pad, y + row
        placed.append((x, y, name, colour))
        x += extent
    strip = Image.new("RGB", (width, y + row + pad), WHITE)
    draw = ImageDraw.Draw(strip)
    for x, y, name, colour in placed:
        top = y + pad + (row - swatch) // 2
        box = (x, top, x + swatch - 1, top + swatch - 1)
        if colour is None:  # the hatch, as in the panels
            strip.paste(Image.fromarray(_hatch((swatch, swatch)).astype(np.uint8)), box[:2])
            draw.rectangle(box, outline=HATCH)
        else:
            draw.rectangle(box, fill=colour, outline=BLACK if colour == WHITE else colour)
        draw.text((x + swatch + pad // 2, top + swatch // 2), name, fill=BLACK, font=font, anchor="lm")
    return strip


def _present(maps: Sequence[np.ndarray], hidden: frozenset[int], num_classes: int) -> list[int]:
    ids = set().union(*(np.unique(m).tolist() for m in maps))
    return sorted(i for i in ids if i < num_classes and i not in hidden)


def overlay_picture(image: np.ndarray, labels: np.ndarray, classes: Sequence[str], palette: Palette) -> Image.Image:
    """The blend of ``labels`` (H, W) over ``image`` (H, W, 3) uint8, upscaled, with the legend below."""
    factor = upscale_factor(*labels.shape)
    hidden = background_classes(classes)
    picture = blend(_enlarge(image, factor), _enlarge(labels, factor), palette, hidden)
    height, width = picture.shape[:2]
    strip = legend(classes, palette, _present([labels], hidden, len(classes)), width, _ui_scale(height, width))
    canvas = Image.new("RGB", (width, height + strip.height), WHITE)
    canvas.paste(Image.fromarray(picture), (0, 0))
    canvas.paste(strip, (0, height))
    return canvas


def panels_picture(image: np.ndarray, maps: Sequence[tuple[str, np.ndarray]], classes: Sequence[str],
                   palette: Palette) -> Image.Image:
    """``image`` | each label map of ``maps`` ((title, (H, W) labels), e.g. ground truth and
    prediction) side by side, upscaled, each under its title, white borders between them and
    one legend of the classes present in any map below."""
    factor = upscale_factor(*image.shape[:2])
    hidden = background_classes(classes)
    photo = _enlarge(image, factor)
    panels = [("image", photo)] + [(title, label_panel(photo, _enlarge(m, factor), palette, hidden))
                                   for title, m in maps]
    height, width = photo.shape[:2]
    scale = _ui_scale(height, width)
    border, title_height = BORDER * scale, TITLE_HEIGHT * scale
    total = len(panels) * width + (len(panels) - 1) * border
    labels = [m for _, m in maps]
    strip = legend(classes, palette, _present(labels, hidden, len(classes)), total, scale,
                   ignored=any((m == IGNORE_INDEX).any() for m in labels))
    canvas = Image.new("RGB", (total, title_height + height + strip.height), WHITE)
    draw = ImageDraw.Draw(canvas)
    font = _font(TITLE_FONT * scale)
    for index, (title, picture) in enumerate(panels):
        left = index * (width + border)
        canvas.paste(Image.fromarray(picture), (left, title_height))
        draw.text((left + width // 2, title_height // 2), title, fill=BLACK, font=font, anchor="mm")
    canvas.paste(strip, (0, title_height + height))
    return canvas
