"""One class per dataset: where its files are and how its mask ids become train ids."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from annseg.data.base import (
    IGNORE_INDEX,
    DataError,
    SegmentationDataset,
    dangling_link_error,
    identity_lut,
    make_lut,
    read_text,
    reduce_zero_lut,
)
from annseg.data.meta import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    CITYSCAPES_TRAIN_TO_LABEL_ID,
    PASCAL_CONTEXT_CLASSES,
    PASCAL_CONTEXT_PALETTE,
    Palette,
    generated_palette,
)

_CITYSCAPES_LABEL_IDS = 34  # label ids 0..33; -1 (license plate) is stored as 255


def cityscapes_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Train ids (0..18, 255 ignore) -> Cityscapes label ids (uint8) for test-server submissions.

    Ignored pixels become 0 ('unlabeled'), which the server does not score.
    """
    train_ids = np.asarray(train_ids)
    bad = (train_ids < 0) | ((train_ids >= len(CITYSCAPES_TRAIN_TO_LABEL_ID)) & (train_ids != IGNORE_INDEX))
    if bad.any():
        raise ValueError(f"train ids {sorted(set(np.unique(train_ids[bad]).tolist()))} outside 0..18 and 255")
    lut = np.zeros(256, dtype=np.uint8)
    lut[: len(CITYSCAPES_TRAIN_TO_LABEL_ID)] = CITYSCAPES_TRAIN_TO_LABEL_ID
    return lut[train_ids.astype(np.int64)]


class Cityscapes(SegmentationDataset):
    """Cityscapes fine annotations: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
    ``gtFine/{split}/{city}/*_gtFine_labelTrainIds.png`` when present, else ``*_labelIds.png``
    mapped to the 19 train ids on the fly (so cityscapesScripts' conversion is optional)."""

    classes = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE
    splits = ("train", "val", "test")
    layout = "Cityscapes"
    raw_ids = "label ids 0..33 (labelIds) or train ids 0..18 (labelTrainIds), with 255 ignore"
    lut = identity_lut(len(CITYSCAPES_CLASSES))  # labelTrainIds files
    label_id_lut = make_lut(
        {**{i: IGNORE_INDEX for i in (*range(_CITYSCAPES_LABEL_IDS), IGNORE_INDEX)},
         **{label: train for train, label in enumerate(CITYSCAPES_TRAIN_TO_LABEL_ID)}}
    )  # fmt: skip

    def _images(self) -> tuple[Path, list[Path]]:
        image_dir = self._require(self.root / "leftImg8bit" / self.split)
        self._require(self.root / "gtFine" / self.split)
        return image_dir, self._list_images(image_dir, "*_leftImg8bit.png")

    def _mask_candidates(self, image: Path) -> Sequence[Path]:
        stem = image.name.removesuffix("_leftImg8bit.png")
        folder = self.root / "gtFine" / self.split / image.parent.name
        return (folder / f"{stem}_gtFine_labelTrainIds.png", folder / f"{stem}_gtFine_labelIds.png")

    def to_train_ids(self, raw: np.ndarray, mask_path: Path) -> np.ndarray:
        lut = self.lut if mask_path.name.endswith("_labelTrainIds.png") else self.label_id_lut
        return lut[raw]


class ADE20K(SegmentationDataset):
    """ADE20K SceneParsing (ADEChallengeData2016): ``images/{training,validation}/*.jpg`` and
    ``annotations/{...}/*.png``; raw 0 ('other') is ignored and the 150 classes move down by one."""

    classes = ADE20K_CLASSES
    palette = ADE20K_PALETTE
    folders = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}
    splits = tuple(folders)
    layout = "ADE20K (ADEChallengeData2016)"
    raw_ids = "0..150 (0 = other, ignored)"
    lut = reduce_zero_lut(len(ADE20K_CLASSES))

    def _images(self) -> tuple[Path, list[Path]]:
        image_dir = self._require(self.root / "images" / self.folders[self.split])
        self._require(self.root / "annotations" / image_dir.name)
        return image_dir, self._list_images(image_dir, "*.jpg", (".jpg",))

    def _mask_candidates(self, image: Path) -> Sequence[Path]:
        return (self.root / "annotations" / self.folders[self.split] / f"{image.stem}.png",)


class PascalContext(SegmentationDataset):
    """PASCAL Context, 59 classes: VOC2010 ``JPEGImages/*.jpg``, the 59-class label PNGs in
    ``SegmentationClassContext/`` (0 = background, ignored) and the image stems of each split in
    ``ImageSets/SegmentationContext/{train,val}.txt``."""

    classes = PASCAL_CONTEXT_CLASSES
    palette = PASCAL_CONTEXT_PALETTE
    layout = "PASCAL Context"
    raw_ids = "0..59 (0 = background, ignored)"
    lut = reduce_zero_lut(len(PASCAL_CONTEXT_CLASSES))

    def _images(self) -> tuple[Path, list[Path]]:
        image_dir = self._require(self.root / "JPEGImages")
        self._require(self.root / "SegmentationClassContext")
        split_file = self._require(self.root / "ImageSets" / "SegmentationContext" / f"{self.split}.txt")
        images = []
        for stem in read_text(split_file, "split list").split():
            image = image_dir / f"{stem}.jpg"
            if image.is_symlink() and not image.exists():
                raise dangling_link_error(image, f"image {stem!r} of {split_file}")
            if not image.is_file():
                raise DataError(f"{split_file}: lists {stem!r} but {image} does not exist")
            images.append(image)
        if not images:
            raise DataError(f"{split_file}: no image stems listed; expected one VOC2010 image stem per line")
        return image_dir, images

    def _mask_candidates(self, image: Path) -> Sequence[Path]:
        return (self.root / "SegmentationClassContext" / f"{image.stem}.png",)


def read_classes(path: Path) -> tuple[tuple[str, ...], Palette]:
    """Parse ``classes.txt``: one class per line, ``name`` or ``name R G B`` (names may have spaces).

    Classes without a colour get ``generated_palette``'s colour for their id.
    """
    if not path.is_file():
        raise DataError(f"expected {path}: one class name per line, optionally followed by 'R G B'")
    names: list[str] = []
    colours: list[tuple[int, int, int] | None] = []
    for number, line in enumerate(read_text(path, "class list").splitlines(), start=1):
        words = line.split()
        if not words:
            continue
        colour = None
        if len(words) >= 4 and all(w.isdigit() for w in words[-3:]):
            r, g, b = (int(w) for w in words[-3:])
            if max(r, g, b) > 255:
                raise DataError(f"{path}:{number}: colour {r} {g} {b} outside 0..255")
            colour, words = (r, g, b), words[:-3]
        name = " ".join(words)
        if name in names:
            raise DataError(f"{path}:{number}: class {name!r} appears twice; expected unique names")
        names.append(name)
        colours.append(colour)
    if not names or len(names) > IGNORE_INDEX:
        raise DataError(f"{path}: {len(names)} classes; expected 1..{IGNORE_INDEX} (id {IGNORE_INDEX} is ignore)")
    generated = generated_palette(len(names))
    return tuple(names), tuple(c if c is not None else g for c, g in zip(colours, generated))


class FolderDataset(SegmentationDataset):
    """Any dataset laid out as ``images/{split}/**/*.{png,jpg,jpeg}`` with masks of train ids
    (255 ignore) at ``masks/{split}/**/{stem}.png`` and the classes in ``classes.txt``.

    Splits are the sub-folders of ``images/``.
    """

    layout = "folder dataset"

    def __init__(self, root: str | Path, split: str, transforms: Callable | None = None) -> None:
        images = self._require(Path(root) / "images")
        if (images / split).is_symlink():
            self._require(images / split)  # a dangling split link is named, not "unknown split"
        self.splits = tuple(sorted(p.name for p in images.iterdir() if p.is_dir()))
        self.classes, self.palette = read_classes(Path(root) / "classes.txt")
        self.raw_ids = f"train ids 0..{len(self.classes) - 1} (classes.txt) and {IGNORE_INDEX} ignore"
        self.lut = identity_lut(len(self.classes))
        super().__init__(root, split, transforms)

    def _images(self) -> tuple[Path, list[Path]]:
        image_dir = self.root / "images" / self.split
        self._require(self.root / "masks" / self.split)
        return image_dir, self._list_images(image_dir)

    def _mask_candidates(self, image: Path) -> Sequence[Path]:
        relative = image.relative_to(self.root / "images" / self.split).with_suffix(".png")
        return (self.root / "masks" / self.split / relative,)
