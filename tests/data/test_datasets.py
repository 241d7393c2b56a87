"""Each dataset on a tiny tree in its real layout: items, id conversion and every bad-data error."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from annseg.data import (
    ADE20K,
    CITYSCAPES_TRAIN_TO_LABEL_ID,
    DATASETS,
    Cityscapes,
    DataError,
    FolderDataset,
    PascalContext,
    cityscapes_label_ids,
)
from tests.data.trees import (
    HEIGHT,
    WIDTH,
    stripes,
    write_ade20k,
    write_cityscapes,
    write_folder,
    write_image,
    write_mask,
    write_pascal_context,
)


def _mask_of(dataset, index: int = 0) -> np.ndarray:
    return dataset[index]["mask"].numpy()


def test_item_types_shapes_and_name(tmp_path: Path) -> None:
    dataset = Cityscapes(write_cityscapes(tmp_path), "train")
    item = dataset[0]
    assert isinstance(item["image"], tv_tensors.Image) and item["image"].dtype == torch.uint8
    assert item["image"].shape == (3, HEIGHT, WIDTH)
    assert isinstance(item["mask"], tv_tensors.Mask) and item["mask"].dtype == torch.int64
    assert item["mask"].shape == (HEIGHT, WIDTH)
    assert item["name"] == "aachen/aachen_000000_000019_leftImg8bit"
    assert len(dataset) == 1 and "Cityscapes" in repr(dataset)


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path: Path) -> None:
    # road 7 -> 0, car 26 -> 13, bicycle 33 -> 18; unlabeled 0, license plate (-1 as 255), guard rail 14 -> ignore
    root = write_cityscapes(tmp_path, masks={"bonn/bonn_000001_000019": stripes([7, 26, 33, 0, 255, 14])})
    assert np.array_equal(_mask_of(Cityscapes(root, "train")), stripes([0, 13, 18, 255, 255, 255]))


def test_cityscapes_prefers_label_train_ids(tmp_path: Path) -> None:
    name = "bonn/bonn_000001_000019"
    write_cityscapes(tmp_path, "val", masks={name: stripes([7])})  # labelIds: would give 0
    write_cityscapes(tmp_path, "val", masks={name: stripes([5, 255])}, kind="labelTrainIds")
    assert np.array_equal(_mask_of(Cityscapes(tmp_path, "val")), stripes([5, 255]))


def test_cityscapes_label_ids_round_trip() -> None:
    train = np.array([[*range(19), 255]])
    label = cityscapes_label_ids(train)
    assert label.tolist() == [[*CITYSCAPES_TRAIN_TO_LABEL_ID, 0]]
    assert np.array_equal(Cityscapes.label_id_lut[label[:, :19]], train[:, :19])
    with pytest.raises(ValueError, match=r"\[19, 254\]"):
        cityscapes_label_ids(np.array([19, 254, 3]))


def test_ade20k_ignores_zero_and_shifts_ids_and_accepts_raw_split_names(tmp_path: Path) -> None:
    root = write_ade20k(tmp_path, "validation", masks={"ADE_val_00000001": stripes([0, 1, 150])})
    for split in ("val", "validation"):
        dataset = ADE20K(root, split)
        assert np.array_equal(_mask_of(dataset), stripes([255, 0, 149]))
        assert dataset[0]["name"] == "ADE_val_00000001"


def test_pascal_context_ignores_background_and_follows_the_split_file(tmp_path: Path) -> None:
    root = write_pascal_context(tmp_path, "val", masks={"2008_000009": stripes([0, 1, 59])})
    write_image(root / "JPEGImages" / "2008_000010.jpg")  # an image no split lists
    dataset = PascalContext(root, "val")
    assert [item["name"] for item in dataset] == ["2008_000009"]
    assert np.array_equal(_mask_of(dataset), stripes([255, 0, 58]))


def test_folder_dataset_reads_classes_colours_and_train_ids(tmp_path: Path) -> None:
    root = write_folder(tmp_path, masks={"sub/a": stripes([0, 2, 255])}, suffix=".jpg",
                        classes="background\n\ntraffic light 1 2 3\ncat\n")  # fmt: skip
    dataset = FolderDataset(root, "train")
    assert dataset.classes == ("background", "traffic light", "cat") and dataset.num_classes == 3
    assert dataset.palette[1] == (1, 2, 3) and len(set(dataset.palette)) == 3
    assert dataset[0]["name"] == "sub/a"
    assert np.array_equal(_mask_of(dataset), stripes([0, 2, 255]))


@pytest.mark.parametrize(("dataset", "count"), [(Cityscapes, 19), (ADE20K, 150), (PascalContext, 59)])
def test_class_names_and_palettes(dataset, count: int) -> None:
    assert len(dataset.classes) == len(set(dataset.classes)) == count
    assert len(dataset.palette) == len(set(dataset.palette)) == count


def test_registry_names_every_dataset() -> None:
    expected = {"cityscapes": Cityscapes, "ade20k": ADE20K, "pascal_context": PascalContext, "folder": FolderDataset}
    assert DATASETS == expected


def test_transforms_get_image_and_mask(tmp_path: Path) -> None:
    def flip(image, mask):
        return image.flip(-1), mask.flip(-1)

    root = write_folder(tmp_path, masks={"a": stripes([0, 1])})
    plain, flipped = FolderDataset(root, "train"), FolderDataset(root, "train", transforms=flip)
    assert torch.equal(flipped[0]["image"], plain[0]["image"].flip(-1))
    assert torch.equal(flipped[0]["mask"], plain[0]["mask"].flip(-1))


# --- bad data --------------------------------------------------------------------------------


def test_image_without_mask_names_both(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path)
    image = write_image(root / "leftImg8bit" / "train" / "aachen" / "aachen_000001_000019_leftImg8bit.png")
    expected = root / "gtFine" / "train" / "aachen" / "aachen_000001_000019_gtFine_labelIds.png"
    with pytest.raises(DataError, match=f"{image}: no mask found; expected .* or {expected}"):
        Cityscapes(root, "train")


def test_size_mismatch_names_both_sizes(tmp_path: Path) -> None:
    root = write_ade20k(tmp_path)
    write_image(root / "images" / "training" / "ADE_train_00000001.jpg", 5, 7)
    with pytest.raises(DataError, match=r"ADE_train_00000001.jpg: image is 7x5 but its mask .* is 12x8"):
        ADE20K(root, "train")[0]


@pytest.mark.parametrize(
    ("write", "dataset", "raw", "bad"),
    [
        (write_ade20k, ADE20K, [0, 151, 200], "[151, 200]"),
        (write_pascal_context, PascalContext, [60, 1], "[60]"),
        (write_cityscapes, Cityscapes, [7, 34], "[34]"),
        (write_folder, FolderDataset, [2, 0, 254], "[2, 254]"),
    ],
)
def test_ids_out_of_range_name_the_mask_and_ids(tmp_path: Path, write, dataset, raw: list[int], bad: str) -> None:
    root = write(tmp_path, masks={"x/y" if dataset is Cityscapes else "y": stripes(raw)})
    data = dataset(root, "train")
    with pytest.raises(DataError, match=re.escape(f"{data.pairs[0][1]}: ids {bad} outside {data.raw_ids}")) as raised:
        data[0]
    assert [str(error) for error in data.check()] == [str(raised.value)]


def test_check_reports_every_bad_item_and_progress(tmp_path: Path) -> None:
    root = write_folder(tmp_path, masks={"a": stripes([0]), "b": stripes([7]), "c": stripes([1])})
    (root / "images" / "train" / "c.png").write_bytes(b"\x89PNG\r\n")  # truncated
    calls = []
    errors = FolderDataset(root, "train").check(lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert [str(error).split(":")[0] for error in errors] == [
        str(root / "masks" / "train" / "b.png"), str(root / "images" / "train" / "c.png")]  # fmt: skip


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    root = write_pascal_context(tmp_path)
    image = root / "JPEGImages" / "2008_000002.jpg"
    image.write_bytes(image.read_bytes()[:50])
    with pytest.raises(DataError, match=f"{image}: cannot read image"):
        PascalContext(root, "train")[0]


def test_rgb_mask_names_the_mode(tmp_path: Path) -> None:
    root = write_folder(tmp_path)
    mask = write_image(root / "masks" / "train" / "a.png")
    with pytest.raises(DataError, match=f"{mask}: mask has mode 'RGB'"):
        FolderDataset(root, "train")[0]


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        (Cityscapes, "leftImg8bit/train"),
        (ADE20K, "images/training"),
        (PascalContext, "JPEGImages"),
        (FolderDataset, "images"),
    ],
)
def test_wrong_root_names_the_expected_folder(tmp_path: Path, dataset, expected: str) -> None:
    with pytest.raises(DataError, match=re.escape(f"expected {tmp_path / expected} ({dataset.layout} layout)")):
        dataset(tmp_path, "train")


@pytest.mark.parametrize(
    ("write", "dataset", "folders", "searched"),
    [
        (write_cityscapes, Cityscapes, ["leftImg8bit/val", "gtFine/val"], "leftImg8bit/val"),
        (write_ade20k, ADE20K, ["images/validation", "annotations/validation"], "images/validation"),
        (write_folder, FolderDataset, ["images/val", "masks/val"], "images/val"),
    ],
)
def test_empty_split_names_the_folder_searched(tmp_path: Path, write, dataset, folders: list[str], searched: str):
    root = write(tmp_path)
    for folder in folders:
        (root / folder).mkdir(parents=True)
    with pytest.raises(DataError, match=f"{root / searched}: no images found for split 'val'"):
        dataset(root, "val")


def test_empty_pascal_context_split_file(tmp_path: Path) -> None:
    root = write_pascal_context(tmp_path)
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("\n")
    with pytest.raises(DataError, match="val.txt: no image stems listed"):
        PascalContext(root, "val")


def test_mask_folder_missing_is_a_layout_error(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path)
    (root / "leftImg8bit" / "val").mkdir()
    with pytest.raises(DataError, match=re.escape(f"expected {root / 'gtFine' / 'val'} (Cityscapes layout)")):
        Cityscapes(root, "val")


def test_unknown_split_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unknown split 'tran' for Cityscapes; choose from \['train', 'val', 'test'\]"):
        Cityscapes(tmp_path, "tran")
    root = write_folder(tmp_path / "folder")
    with pytest.raises(DataError, match=r"choose from \['train'\]"):
        FolderDataset(root, "val")


def test_pascal_context_split_naming_a_missing_image(tmp_path: Path) -> None:
    root = write_pascal_context(tmp_path)
    split_file = root / "ImageSets" / "SegmentationContext" / "train.txt"
    split_file.write_text("2008_000002\n2008_999999\n")
    with pytest.raises(DataError, match=f"{split_file}: lists '2008_999999' but .*2008_999999.jpg does not exist"):
        PascalContext(root, "train")


@pytest.mark.parametrize(
    ("text", "error"),
    [("", "0 classes"), ("a\na\n", "class 'a' appears twice"), ("a 1 2 300\n", ":1: colour 1 2 300 outside")],
)
def test_bad_classes_file(tmp_path: Path, text: str, error: str) -> None:
    root = write_folder(tmp_path, classes=text)
    with pytest.raises(DataError, match=f"{root / 'classes.txt'}.*{error}"):
        FolderDataset(root, "train")


def test_same_name_with_two_extensions(tmp_path: Path) -> None:
    root = write_folder(tmp_path)
    write_image(root / "images" / "train" / "a.jpg")
    write_mask(root / "masks" / "train" / "a.png", stripes([0]))
    with pytest.raises(DataError, match=r"images \['a'\] appear with two extensions"):
        FolderDataset(root, "train")


@pytest.mark.parametrize(
    ("write", "dataset", "split", "image_dir", "mask_dir"),
    [
        (write_cityscapes, Cityscapes, "train", "leftImg8bit/train", None),
        (write_ade20k, ADE20K, "train", "images/training", None),
        (write_folder, FolderDataset, "train", "images/train", "masks/train"),
    ],
)
def test_symlinked_image_sub_folder_counts(tmp_path: Path, write, dataset, split: str, image_dir: str,
                                           mask_dir: str | None) -> None:
    """Each image folder's content lives elsewhere, linked in as a sub-folder (a city, a shared disk)."""
    root = write(tmp_path / "data")
    names = dataset(root, split).names
    for image in sorted((root / image_dir).rglob("*.*")):
        sub = image.parent.name if image.parent != root / image_dir else "linked"
        moved = tmp_path / "store" / sub / image.name
        moved.parent.mkdir(parents=True, exist_ok=True)
        image.rename(moved)
        if mask_dir is not None:  # the folder dataset's masks mirror the image sub-folders
            mask = (root / mask_dir / image.name).with_suffix(".png")
            (root / mask_dir / sub).mkdir(exist_ok=True)
            mask.rename(root / mask_dir / sub / mask.name)
        if image.parent.is_dir() and image.parent != root / image_dir:
            image.parent.rmdir()
        if not (root / image_dir / sub).is_symlink():
            (root / image_dir / sub).symlink_to(moved.parent, target_is_directory=True)
    linked = dataset(root, split)
    expected = names if dataset is Cityscapes else [f"linked/{name}" for name in names]  # a city stays a city
    assert linked.names == expected and _mask_of(linked).shape == (HEIGHT, WIDTH)


def test_pascal_context_listed_image_that_is_a_dangling_link(tmp_path: Path) -> None:
    root = write_pascal_context(tmp_path)
    image = root / "JPEGImages" / "2008_000002.jpg"
    image.unlink()
    image.symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(DataError, match=f"{image}: image '2008_000002' of .*train.txt is a symlink to .*gone.jpg, "
                                        "which does not exist; fix the link or remove it"):
        PascalContext(root, "train")


def test_pascal_context_split_list_not_utf8(tmp_path: Path) -> None:
    root = write_pascal_context(tmp_path)
    split_file = root / "ImageSets" / "SegmentationContext" / "train.txt"
    split_file.write_bytes(b"2008_000002\n\xff\n")
    with pytest.raises(DataError, match=f"{split_file}:2: split list is not UTF-8 text"):
        PascalContext(root, "train")


def test_dangling_split_folder_link_names_the_link(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "folder")
    (root / "images" / "val").symlink_to(tmp_path / "unmounted" / "val", target_is_directory=True)
    with pytest.raises(DataError, match=f"{root / 'images' / 'val'}: folder is a symlink to .*unmounted/val, which "
                                        "does not exist"):
        FolderDataset(root, "val")
    cities = write_cityscapes(tmp_path / "cityscapes", "val")
    (cities / "gtFine" / "val").rename(tmp_path / "gtFine-val")
    (cities / "gtFine" / "val").symlink_to(tmp_path / "moved-away", target_is_directory=True)
    with pytest.raises(DataError, match=f"{cities / 'gtFine' / 'val'}: folder is a symlink to .*moved-away"):
        Cityscapes(cities, "val")
