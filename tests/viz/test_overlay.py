"""The pictures of label maps: size, legend, titles, borders and a blend that keeps the photo."""

import numpy as np
import pytest

from annseg.viz import background_classes, overlay_picture, panels_picture
from annseg.viz.overlay import BORDER, FADE, HATCH, TITLE_HEIGHT

CLASSES = ("background", "car", "tree", "sky")
# Saturated colours, none of them grey, so that anti-aliased black text cannot produce one.
PALETTE = ((0, 200, 0), (230, 30, 30), (30, 60, 230), (250, 200, 0))


def scene(height: int = 64, width: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A random photo and a label map holding background, car and sky (no tree)."""
    photo = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    labels = np.zeros((height, width), np.int64)
    labels[8:30, 10:50] = 1
    labels[40:60, 50:90] = 3
    return photo, labels


def colours_in(picture: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in c) for c in np.unique(picture.reshape(-1, 3), axis=0)}


def test_blend_is_upscaled_to_a_256_px_short_side_with_a_legend_below() -> None:
    photo, labels = scene()
    picture = np.asarray(overlay_picture(photo, labels, CLASSES, PALETTE))
    assert picture.shape == (256 + 32, 384, 3)  # 64x96 x 4 (nearest), a one-row legend of 32 px
    legend = colours_in(picture[256:])
    assert {PALETTE[1], PALETTE[3]} <= legend  # the swatches of the classes present
    assert PALETTE[2] not in legend and PALETTE[0] not in legend  # absent tree; background is not coloured


def test_blend_leaves_background_pixels_as_in_the_photo() -> None:
    photo, labels = scene()
    picture = np.asarray(overlay_picture(photo, labels, CLASSES, PALETTE))[:256]
    big_photo, big_labels = (a.repeat(4, 0).repeat(4, 1) for a in (photo, labels))
    assert np.array_equal(picture[big_labels == 0], big_photo[big_labels == 0])
    car = big_labels == 1
    expected = (0.5 * big_photo[car].astype(float) + 0.5 * np.array(PALETTE[1])).round()
    assert np.abs(picture[car] - expected).max() <= 1


def test_large_images_keep_their_size() -> None:
    photo, labels = scene(300, 400)
    assert overlay_picture(photo, labels, CLASSES, PALETTE).width == 400


def test_panels_have_titles_borders_and_one_legend() -> None:
    photo, labels = scene()
    truth = labels.copy()
    truth[:4] = 255  # ignored pixels
    picture = np.asarray(panels_picture(photo, [("ground truth", truth), ("prediction", labels)], CLASSES, PALETTE))
    width = 384
    assert picture.shape == (TITLE_HEIGHT + 256 + 32, 3 * width + 2 * BORDER, 3)
    for index in range(3):  # each title band holds text
        band = picture[:TITLE_HEIGHT, index * (width + BORDER):index * (width + BORDER) + width]
        assert (band < 128).any()
    for index in (1, 2):  # white borders between the panels
        gap = picture[TITLE_HEIGHT:TITLE_HEIGHT + 256, index * (width + BORDER) - BORDER:index * (width + BORDER)]
        assert (gap == 255).all()
    legend = colours_in(picture[TITLE_HEIGHT + 256:])
    assert {PALETTE[1], PALETTE[3], HATCH} <= legend and PALETTE[2] not in legend
    prediction = picture[TITLE_HEIGHT:TITLE_HEIGHT + 256, 2 * (width + BORDER):]
    big = labels.repeat(4, 0).repeat(4, 1)
    assert (prediction[big == 0] >= np.floor((1 - FADE) * 255)).all()  # a light background, not a dark one
    assert (prediction[big == 3] == PALETTE[3]).all()


@pytest.mark.parametrize(("first", "hidden"), [("background", {0}), ("Background", {0}), ("void", {0}),
                                                ("road", set()), ("class0", set())])
def test_only_a_class_0_named_like_a_background_is_left_uncoloured(first: str, hidden: set[int]) -> None:
    assert background_classes((first, "car")) == hidden
