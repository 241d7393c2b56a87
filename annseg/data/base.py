"""The shared base of every dataset: file reading, pairing, id conversion and validation.

A dataset subclass says only where its files are (``_images`` and ``_mask_candidates``) and how
raw mask ids become train ids (``lut``); everything else -- checking the layout and pairs when
built, decoding and checking each item when read -- happens here, the same way for all.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Decoded formats a mask may have: lossless ones that store the ids as written. Lossy formats
# change ids where classes meet; GIF writers reorder the palette, so its indices are not the ids.
MASK_FORMATS = ("PNG", "BMP", "TIFF")
_LOSSY_FORMATS = ("JPEG", "MPO", "JPEG2000", "WEBP")  # (WebP and JPEG 2000 may be lossless; Pillow cannot tell)
_LOSSY_TIFF = ("jpeg", "tiff_jpeg", "webp")  # TIFF compressions that lose information

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad data on disk; message is one line naming the file (or folder) and what was expected."""


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path``: Pillow decodes lazily, so a truncated file fails only here."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot read {what} ({error}); expected a complete PNG or JPEG file") from None
    return image


def read_text(path: Path, what: str) -> str:
    """The text of ``path`` as UTF-8 (a byte-order mark is dropped), naming the file if it is not."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        line = error.object.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: {what} is not UTF-8 text (byte {error.object[error.start]:#04x}); "
                        "save it as UTF-8") from None


def find_files(folder: Path, suffixes: Sequence[str] = (), pattern: str = "*") -> tuple[list[Path], list[Path]]:
    """Files below ``folder`` named like ``pattern`` with one of ``suffixes`` (any case; empty:
    any suffix), and the dangling symlinks so named: both sorted, under the paths the tree shows.

    Symlinks are followed wherever they point, so a linked sub-folder counts as part of the tree.
    A link back to a folder above it (a loop) is not followed, and each real folder is read once
    (a second link to a folder already read is not entered); both with a warning naming the link.
    A sub-folder that cannot be listed is an error naming it, not a silent gap.
    """
    files: list[Path] = []
    dangling: list[Path] = []

    def unreadable(error: OSError) -> None:
        raise DataError(f"{error.filename}: cannot list folder ({error.strerror}); fix its permissions") from None

    inside = {os.path.realpath(top) for top, _, _ in os.walk(folder, onerror=unreadable)}  # the tree without links
    seen = set(inside)
    for top, dirs, names in os.walk(folder, onerror=unreadable, followlinks=True):
        entered, real_top = [], os.path.realpath(top)
        for name in sorted(dirs):
            path = Path(top, name)
            real = os.path.realpath(path)
            if real == real_top or real_top.startswith(real.rstrip(os.sep) + os.sep):
                log.warning("%s is a symlink loop (it leads back to %s, a folder above it); not following it", path, real)
            elif real in seen and (path.is_symlink() or real not in inside):
                log.warning("%s leads to %s, a folder already read through another path; not reading it twice",
                            path, real)
            else:
                seen.add(real)
                entered.append(name)
        dirs[:] = entered
        for name in names:
            path = Path(top, name)
            if not fnmatchcase(name, pattern) or (suffixes and path.suffix.lower() not in suffixes):
                continue
            if path.is_file():
                files.append(path)
            elif path.is_symlink() and not path.exists():
                dangling.append(path)
    return sorted(files), sorted(dangling)


def dangling_link_error(link: Path, what: str) -> DataError:
    """A symlink ``link`` whose target does not exist, where the split needs a ``what``."""
    return DataError(f"{link}: {what} is a symlink to {os.readlink(link)}, which does not exist; "
                     "fix the link or remove it")


def read_image(path: Path) -> tv_tensors.Image:
    """Read an image as uint8 (3, H, W) RGB, converting grayscale, palette, RGBA and 16-bit."""
    return as_rgb(_open(Path(path), "image"))


def as_rgb(image: Image.Image) -> tv_tensors.Image:
    """A decoded Pillow image as uint8 (3, H, W) RGB: the one place that converts image modes.

    Grayscale and palette images are expanded, alpha is dropped, and 16-bit / 32-bit integer
    images are scaled to 0-255 (Pillow's ``convert`` would clip them instead).
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        image = Image.fromarray(_to_8bit(np.asarray(image, dtype=np.int64))).convert("RGB")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
    return tv_tensors.Image(pixels.permute(2, 0, 1).contiguous())


def _to_8bit(wide: np.ndarray) -> np.ndarray:
    """16-bit values scaled to 0-255 with rounding (65535 -> 255), as uint8."""
    return ((wide.astype(np.int64).clip(0, 65535) + 128) // 257).astype(np.uint8)


def array_as_rgb(array: np.ndarray) -> torch.Tensor:
    """A numpy image as (3, H, W) RGB: uint8, or float32 in [0, 1] for float arrays (not quantised).

    Accepts (H, W) or (H, W, 1) gray, (H, W, 3) RGB and (H, W, 4) RGBA (alpha dropped), as
    uint8, uint16 (scaled to 0-255 like 16-bit files) or float in [0, 1]. Raises TypeError for
    another type or dtype and ValueError for another shape or float values outside [0, 1].
    """
    if not isinstance(array, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(array).__name__}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape:
        hint = " (channels first? pass array.transpose(1, 2, 0))" if array.ndim == 3 and array.shape[0] in (1, 3, 4) else ""
        raise ValueError(f"image array has shape {array.shape}; expected (H, W) gray, (H, W, 3) RGB or "
                         f"(H, W, 4) RGBA{hint}")
    if array.dtype == np.uint16:
        array = _to_8bit(array)
    elif array.dtype.kind == "f":
        low, high = (float(array.min()), float(array.max()))
        if not (0.0 <= low and high <= 1.0):  # also false for NaN
            raise ValueError(f"float image array has values in [{low}, {high}]; expected values in [0, 1] "
                             "(divide 8-bit data by 255)")
        array = array.astype(np.float32)
    elif array.dtype != np.uint8:
        raise TypeError(f"image array has dtype {array.dtype}; expected uint8 (0-255), uint16 (0-65535) "
                        "or float in [0, 1]")
    rgb = np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[:, :, :3]
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def read_mask(path: Path) -> np.ndarray:
    """Read the raw integer ids (H, W) uint8 stored in a single-channel 'L' or 'P' PNG.

    The decoded format decides, not the file name: only ``MASK_FORMATS`` are read, so a JPEG
    named ``.png`` is refused (lossy compression changes ids where classes meet).
    """
    mask = _open(Path(path), "mask")
    compression = str(mask.info.get("compression", "")).lower() if mask.format == "TIFF" else ""
    if mask.format not in MASK_FORMATS or compression in _LOSSY_TIFF:
        kind = f"a {compression}-compressed TIFF" if compression in _LOSSY_TIFF else f"a {mask.format or 'unknown-format'} file"
        lossy = " (lossy: its labels are approximate)" if compression or mask.format in _LOSSY_FORMATS else ""
        raise DataError(f"{path}: mask is {kind}{lossy}; masks must be PNG (or BMP, or TIFF without lossy "
                        "compression) -- save the label ids again as PNG")
    if mask.mode not in ("L", "P"):
        raise DataError(
            f"{path}: mask has mode {mask.mode!r}; expected an 8-bit single-channel PNG (mode 'L' or 'P') "
            "holding class ids -- convert colour or 16-bit masks to 8-bit id images first"
        )
    return np.array(mask, dtype=np.uint8)  # for 'P' these are the palette indices, i.e. the ids


def make_lut(mapping: dict[int, int]) -> np.ndarray:
    """A 256-entry raw id -> train id table; raw ids the mapping leaves out are invalid (-1)."""
    lut = np.full(256, -1, dtype=np.int64)
    for raw, train in mapping.items():
        lut[raw] = train
    return lut


def identity_lut(num_classes: int) -> np.ndarray:
    """Masks that already hold train ids 0..K-1 with 255 as ignore."""
    return make_lut({**{i: i for i in range(num_classes)}, IGNORE_INDEX: IGNORE_INDEX})


def reduce_zero_lut(num_classes: int) -> np.ndarray:
    """Masks whose 0 is 'other/background' (ignored) and 1..K the classes (ADE20K, PASCAL Context)."""
    return make_lut({0: IGNORE_INDEX, **{i: i - 1 for i in range(1, num_classes + 1)}})


def _short_list(items: list[Any], most: int = 10) -> str:
    """``[a, b, ... 5 more]``: keeps error messages on one readable line."""
    return str(items[:most])[:-1] + (f", ... {len(items) - most} more]" if len(items) > most else "]")


class SegmentationDataset(Dataset):
    """Base: subclasses find (image_path, mask_path) pairs and map raw mask ids to train ids.

    ``dataset[i]`` is ``{"image": Image uint8 (3, H, W), "mask": Mask int64 (H, W), "name": str}``
    with train ids 0..K-1 and ``ignore_index`` in the mask; ``name`` is the image path relative
    to the split folder without its extension, used to name prediction outputs.
    """

    classes: tuple[str, ...] = ()  # class names, index = train id
    palette: tuple[tuple[int, int, int], ...] = ()  # one RGB colour per class
    ignore_index: int = IGNORE_INDEX
    splits: tuple[str, ...] = ("train", "val")
    layout: str = "dataset"  # named in layout errors, e.g. "Cityscapes"
    raw_ids: str = ""  # which raw ids a mask may hold, named in id-range errors
    lut: np.ndarray  # raw id -> train id, -1 for ids the dataset does not use

    def __init__(self, root: str | Path, split: str, transforms: Callable | None = None) -> None:
        self.root = Path(root)
        if split not in self.splits:
            raise DataError(f"unknown split {split!r} for {self.layout}; choose from {list(self.splits)}")
        self.split = split
        self.transforms = transforms
        image_dir, images = self._images()
        self.pairs: list[tuple[Path, Path]] = [(image, self._mask_for(image)) for image in images]
        if not self.pairs:
            others = [p.name for p in find_files(image_dir)[0]] if image_dir.is_dir() else []
            found = f"; it holds {len(others)} other file(s), e.g. {_short_list(others, 3)}" if others else ""
            raise DataError(f"{image_dir}: no images found for split {split!r}; expected {self.layout} images "
                            f"({', '.join(IMAGE_SUFFIXES)}) there{found}")
        self.names = [image.relative_to(image_dir).with_suffix("").as_posix() for image, _ in self.pairs]
        if len(set(self.names)) < len(self.names):  # names name prediction files: they must differ
            twice = sorted(name for name, count in Counter(self.names).items() if count > 1)
            raise DataError(f"{image_dir}: images {_short_list(twice)} appear with two extensions; keep one of each")

    # --- what a subclass provides -------------------------------------------------------------

    def _images(self) -> tuple[Path, list[Path]]:
        """The split's image folder (names are relative to it) and its images, sorted."""
        raise NotImplementedError

    def _mask_candidates(self, image: Path) -> Sequence[Path]:
        """Where the image's mask may be, preferred first."""
        raise NotImplementedError

    def to_train_ids(self, raw: np.ndarray, mask_path: Path) -> np.ndarray:
        """Raw ids (H, W) uint8 -> train ids (H, W) int64; -1 where a raw id is invalid."""
        return self.lut[raw]

    # --- shared helpers -----------------------------------------------------------------------

    def _require(self, path: Path) -> Path:
        """Fail early, naming the folder or file the layout needs, when root points elsewhere."""
        if path.is_symlink() and not path.exists():
            raise dangling_link_error(path, "folder")
        if not path.exists():
            raise DataError(f"expected {path} ({self.layout} layout); check that root points at the dataset folder")
        return path

    def _list_images(self, folder: Path, pattern: str = "*", suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
        """Image files under ``folder`` (recursively, through symlinks) matching ``pattern``, sorted.

        A dangling symlink named like an image is an error: the split would silently lack it.
        """
        images, dangling = find_files(self._require(folder), suffixes, pattern)
        if dangling:
            raise dangling_link_error(dangling[0], "image")
        return images

    def _mask_for(self, image: Path) -> Path:
        candidates = self._mask_candidates(image)
        for mask in candidates:
            if mask.is_file():
                return mask
            if mask.is_symlink():  # a link whose target is missing: say so, not "no mask"
                raise dangling_link_error(mask, "mask")
        expected = " or ".join(str(c) for c in candidates)
        raise DataError(f"{image}: no mask found; expected {expected}")

    # --- reading and checking -----------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """Decode and check item ``index`` without transforms: (image, mask of train ids)."""
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        raw = read_mask(mask_path)
        if tuple(image.shape[-2:]) != raw.shape:
            (h, w), (mh, mw) = image.shape[-2:], raw.shape
            raise DataError(
                f"{image_path}: image is {w}x{h} but its mask {mask_path} is {mw}x{mh}; expected the same size"
            )
        train = self.to_train_ids(raw, mask_path)
        bad = (train < 0) | ((train >= self.num_classes) & (train != self.ignore_index))
        if bad.any():
            raise DataError(
                f"{mask_path}: ids {_short_list(np.unique(raw[bad]).tolist())} outside {self.raw_ids}; "
                "fix the mask or use the dataset class that matches its ids"
            )
        return image, tv_tensors.Mask(torch.from_numpy(train))

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = self.load(index)
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return {"image": image, "mask": mask, "name": self.names[index]}

    def check(self, progress: Callable[[int, int], None] | None = None) -> list[DataError]:
        """Read every item and return the problems found (empty: all good), one per bad item.

        ``progress(done, total)`` is called after each item, e.g. to advance a progress bar.
        """
        errors = []
        for index in range(len(self)):
            try:
                self.load(index)
            except DataError as error:
                errors.append(error)
            if progress is not None:
                progress(index + 1, len(self))
        return errors

    def __repr__(self) -> str:
        items = len(getattr(self, "pairs", ()))  # repr must work on a half-built dataset too (tracebacks)
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, items={items})"
