"""read_image / read_mask conversions, find_files, read_text and their errors (annseg/data/base.py)."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from annseg.data import DataError, generated_palette, read_image, read_mask
from annseg.data.base import find_files, read_text
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


IDS = np.array([[0, 1, 2], [255, 150, 3]], dtype=np.uint8)


@pytest.mark.parametrize(("format", "options"), [("PNG", {}), ("BMP", {}), ("TIFF", {}),
                                                 ("TIFF", {"compression": "tiff_lzw"}),
                                                 ("TIFF", {"compression": "tiff_adobe_deflate"})])
def test_lossless_mask_formats_keep_every_id(tmp_path: Path, format: str, options: dict) -> None:
    path = tmp_path / "mask.png"  # the name does not matter, the decoded format does
    Image.fromarray(IDS).save(path, format=format, **options)
    assert np.array_equal(read_mask(path), IDS)


@pytest.mark.parametrize(("format", "options", "kind"), [("JPEG", {"quality": 100}, "a JPEG file"),
                                                         ("WEBP", {"quality": 100}, "a WEBP file"),
                                                         ("TIFF", {"compression": "jpeg"}, "a jpeg-compressed TIFF"),
                                                         ("GIF", {}, "a GIF file")])
def test_lossy_or_gif_mask_is_refused_naming_the_file_and_format(tmp_path: Path, format: str, options: dict, kind: str) -> None:
    path = tmp_path / "mask.png"
    Image.fromarray(np.repeat(IDS, 8, 0).repeat(8, 1)).save(path, format=format, **options)
    lossy = "" if format == "GIF" else r" \(lossy: its labels are approximate\)"  # GIF: its palette is reordered
    with pytest.raises(DataError, match=f"{path}: mask is {kind}{lossy}; masks must be PNG"):
        read_mask(path)


def _tree(root: Path) -> Path:
    """root/a.png, root/sub/b.PNG, root/notes.txt, and elsewhere/c.png outside root."""
    for path in (root / "a.png", root / "sub" / "b.PNG", root / "notes.txt", root.parent / "elsewhere" / "c.png"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return root


def test_find_files_follows_links_wherever_they_point(tmp_path: Path) -> None:
    root = _tree(tmp_path / "root")
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "sub" / "d.png").symlink_to(tmp_path / "elsewhere" / "c.png")
    (root / "dead.png").symlink_to(tmp_path / "gone.png")
    (root / "dead.txt").symlink_to(tmp_path / "gone.txt")
    files, dangling = find_files(root, (".png",))
    assert files == [root / "a.png", root / "linked" / "c.png", root / "sub" / "b.PNG", root / "sub" / "d.png"]
    assert dangling == [root / "dead.png"]
    assert find_files(root, (".png",), "*.png") == ([root / "a.png", root / "linked" / "c.png", root / "sub" / "d.png"],
                                                   [root / "dead.png"])  # the pattern is case-sensitive
    assert root / "notes.txt" in find_files(root)[0]


def test_find_files_ends_a_loop_and_reads_a_folder_once_naming_the_links(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    root = _tree(tmp_path / "root")
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)
    (root / "sub" / "self").symlink_to(root / "sub", target_is_directory=True)
    (root / "again").symlink_to(root / "sub", target_is_directory=True)
    with caplog.at_level(logging.WARNING):
        files, _ = find_files(root, (".png",))
    assert files == [root / "a.png", root / "sub" / "b.PNG"]
    assert f"{root / 'again'} leads to {root / 'sub'}, a folder already read through another path" in caplog.text
    assert f"{root / 'sub' / 'up'} is a symlink loop (it leads back to {root}" in caplog.text
    assert f"{root / 'sub' / 'self'} is a symlink loop (it leads back to {root / 'sub'}" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists every folder")
def test_find_files_names_a_folder_it_cannot_list(tmp_path: Path) -> None:
    root = _tree(tmp_path / "root")
    (root / "sub").chmod(0)
    try:
        with pytest.raises(DataError, match=f"{root / 'sub'}: cannot list folder"):
            find_files(root)
    finally:
        (root / "sub").chmod(0o755)


def test_read_text_drops_a_byte_order_mark_and_names_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_bytes("\ufeffcaf\u00e9\n".encode())
    assert read_text(path, "list") == "caf\u00e9\n"
    path.write_bytes("ok\ncaf\u00e9\n".encode("cp1252"))
    with pytest.raises(DataError, match=f"{path}:2: list is not UTF-8 text \\(byte 0xe9\\); save it as UTF-8"):
        read_text(path, "list")
