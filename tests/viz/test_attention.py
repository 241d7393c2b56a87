"""The attention picture: each cell shades exactly the pixels its pooling bin averages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from annseg.engine.attention import AttentionMaps
from annseg.layers import PyramidSampling
from annseg.viz.attention import attention_picture
from annseg.viz.overlay import BORDER, TITLE_HEIGHT, upscale_factor

SIZES = (1, 3, 6, 8)


def _maps(weights: np.ndarray, feature=(5, 7), image=(37, 53), points=((0, 0),)) -> AttentionMaps:
    return AttentionMaps(block="apnb", weights=weights.astype(np.float32), sizes=SIZES, feature=feature,
                         query_feature=feature, image=image, points=points, positions=((0, 0),) * len(points))


def _expected_masks(feature: tuple[int, int], image: tuple[int, int]) -> np.ndarray:
    """(S, H, W): pixel (y, x) belongs to anchor k when PyramidSampling averages its feature position
    (floor(y * H_f / H), floor(x * W_f / W)) into anchor k (found by pooling one-hot maps)."""
    (fh, fw), (height, width) = feature, image
    one_hot = torch.eye(fh * fw, dtype=torch.float64).reshape(fh * fw, 1, fh, fw)
    covered = (PyramidSampling(SIZES)(one_hot)[:, 0] > 0).numpy()  # (N, S)
    masks = np.zeros((covered.shape[1], height, width), bool)
    for y in range(height):
        for x in range(width):
            masks[:, y, x] = covered[(y * fh // height) * fw + x * fw // width]
    return masks


def test_cell_masks_are_the_pooling_bins_mapped_to_pixels() -> None:
    maps = _maps(np.full((1, 110), 1 / 110))
    expected = _expected_masks(maps.feature, maps.image)
    got = np.concatenate([maps.cell_masks(size) for size in SIZES])
    np.testing.assert_array_equal(got, expected)
    three = maps.cell_masks(3)  # 3 bins over 5 rows: [0, 2), [1, 4), [3, 5) share rows 1 and 3
    assert (three[0] & three[3]).any() and (three[3] & three[6]).any()
    with pytest.raises(ValueError, match=r"no pyramid level 4; this block's sizes are \[1, 3, 6, 8\]"):
        maps.cell_masks(4)


def test_each_drawn_cell_covers_exactly_its_bins_pixels() -> None:
    """One picture per anchor with all the weight on it: the pixels that differ from the picture of
    no weight, in that level's panel, are the bin's pixels (upscaled), overlaps included."""
    feature, image = (5, 7), (37, 53)
    photo = np.random.default_rng(0).integers(0, 256, (*image, 3), dtype=np.uint8)
    expected = _expected_masks(feature, image)
    factor = upscale_factor(*image)
    height, width = image[0] * factor, image[1] * factor
    blank = np.asarray(attention_picture(photo, _maps(np.zeros((1, 110)), feature, image)))
    keep = np.ones((height, width), bool)
    keep[: 2 * factor, : 2 * factor] = False  # the query point's cross, drawn alike in both pictures
    anchor = 0
    for column, size in enumerate(SIZES, start=1):
        left = column * (width + BORDER)
        for _ in range(size * size):
            weights = np.zeros((1, 110))
            weights[0, anchor] = 1
            drawn = np.asarray(attention_picture(photo, _maps(weights, feature, image)))
            panel = (slice(TITLE_HEIGHT, TITLE_HEIGHT + height), slice(left, left + width))
            changed = (drawn[panel] != blank[panel]).any(-1)
            bin_pixels = expected[anchor].repeat(factor, 0).repeat(factor, 1)
            np.testing.assert_array_equal(changed[keep], bin_pixels[keep], err_msg=f"{size}x{size} cell {anchor}")
            anchor += 1


def test_picture_layout_and_the_photo_panel() -> None:
    image = (64, 96)
    photo = np.random.default_rng(1).integers(0, 256, (*image, 3), dtype=np.uint8)
    weights = np.random.default_rng(2).dirichlet(np.ones(110), size=2)
    picture = attention_picture(photo, _maps(weights, (8, 12), image, points=((10, 20), (90, 60))))
    factor = upscale_factor(*image)
    assert picture.width == 5 * 96 * factor + 4 * BORDER
    top_left = np.asarray(picture)[TITLE_HEIGHT + 40: TITLE_HEIGHT + 64 * factor, : 96 * factor]
    enlarged = photo.repeat(factor, 0).repeat(factor, 1)[40:]
    np.testing.assert_array_equal(top_left[:, :8 * factor], enlarged[:, :8 * factor])  # left of the marker
    with pytest.raises(ValueError, match="image is 95x64 but the attention was computed on a 96x64 image"):
        attention_picture(photo[:, :95], _maps(weights, (8, 12), image, points=((10, 20), (90, 60))))
