"""read_image / read_mask conversions and their errors (annseg/data/base.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from annseg.data import DataError, generated_palette, read_image, read_mask
from tests.data.trees import write_image

GREY = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10


def _save(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    """Save ``pixels``; Pillow picks the mode from the dtype and shape, ``mode`` checks it."""
    image = Image.fromarray(pixels)
    assert mode is None or image.mode == mode
    image.save(path)
    return path


@pytest.mark.parametrize(
    ("pixels", "mode"),
    [
        (GREY, "L"),
        (np.dstack([GREY, GREY, GREY, np.full_like(GREY, 7)]), "RGBA"),
        (GREY.astype(np.uint16) * 257, "I;16"),  # 16-bit grey: 257 * v -> v
    ],
)
def test_read_image_converts_to_8bit_rgb(tmp_path: Path, pixels: np.ndarray, mode: str) -> None:
    image = read_image(_save(tmp_path / "image.png", pixels, mode))
    assert isinstance(image, tv_tensors.Image)
    assert image.dtype == torch.uint8 and image.shape == (3, 4, 6)
    for channel in image:
        assert np.array_equal(channel.numpy(), GREY)


def test_read_image_keeps_rgb_pixels(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = read_image(_save(tmp_path / "image.png", pixels))
    assert np.array_equal(image.permute(1, 2, 0).numpy(), pixels)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_is_a_data_error_naming_the_file(tmp_path: Path, suffix: str) -> None:
    path = write_image(tmp_path / f"image{suffix}", 32, 32)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{path}: cannot read image"):
        read_image(path)


def test_not_an_image_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(DataError, match=str(path)):
        read_image(path)


def test_read_mask_returns_raw_ids_of_l_and_p_masks(tmp_path: Path) -> None:
    ids = np.array([[0, 1, 2], [255, 150, 3]], dtype=np.uint8)
    assert np.array_equal(read_mask(_save(tmp_path / "l.png", ids, "L")), ids)
    palette_mask = Image.fromarray(ids).convert("P")  # 'P' keeps the ids as palette indices
    palette_mask.putdata(ids.ravel().tolist())
    palette_mask.save(tmp_path / "p.png")
    mask = read_mask(tmp_path / "p.png")
    assert mask.dtype == np.uint8 and np.array_equal(mask, ids)


@pytest.mark.parametrize(
    ("pixels", "mode"), [(np.zeros((2, 3, 3), np.uint8), "RGB"), (np.zeros((2, 3), np.uint16), "I;16")]
)
def test_colour_or_16bit_mask_is_a_data_error_naming_the_mode(tmp_path: Path, pixels: np.ndarray, mode: str) -> None:
    path = _save(tmp_path / "mask.png", pixels)
    with pytest.raises(DataError, match=f"{path}: mask has mode '{mode}'"):
        read_mask(path)


def test_generated_palette_is_distinct_deterministic_and_never_black() -> None:
    palette = generated_palette(300)
    assert palette == generated_palette(300) and len(set(palette)) == 300
    assert (0, 0, 0) not in palette and palette[:2] == ((128, 0, 0), (0, 128, 0))
