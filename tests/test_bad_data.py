"""Data is read as what it is, driven through ``annseg eval`` as a user would: a mask's decoded
format (not its name) decides, symlinked folders and files count, a loop or a dangling link is
named, the class names must match, and the scores JSON holds null, never NaN."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from annseg.cli import main
from annseg.engine.builders import build_model
from annseg.engine.checkpoint import model_meta, save_model
from annseg.engine.config import load_config
from tests.data.trees import HEIGHT, WIDTH, stripes, write_folder, write_image, write_mask
from tests.engine.tiny import TINY
from tests.test_bad_input import checkpoint, one_line_error  # noqa: F401 (checkpoint is a fixture)


def _eval(checkpoint: Path, root: Path, out: Path) -> dict:
    main(["eval", "--checkpoint", str(checkpoint), "--set", f"data.root={root}", "--set", "data.val_length=null",
          "--out", str(out)])
    return json.loads(out.read_text(), parse_constant=_no_constant)


def _no_constant(name: str) -> None:
    raise AssertionError(f"the JSON holds {name}, which is not JSON")


def _tree(root: Path, **extra: np.ndarray) -> Path:
    return write_folder(root, "val", {"a": stripes([0, 1]), "b": stripes([1, 0]), **extra})


def jpeg_named_png_mask(root: Path) -> None:
    Image.fromarray(stripes([0, 1])).save(_tree(root) / "masks/val/a.png", format="JPEG", quality=95)


def lossy_tiff_named_png_mask(root: Path) -> None:
    Image.fromarray(stripes([0, 1])).save(_tree(root) / "masks/val/a.png", format="TIFF", compression="jpeg")


def classes_not_utf8(root: Path) -> None:
    _tree(root)
    (root / "classes.txt").write_bytes("arri\u00e8re-plan\ncat\n".encode("latin-1"))


def other_class_names(root: Path) -> None:
    _tree(root)
    (root / "classes.txt").write_text("background\ndog 255 0 0\n")


def dangling_image_link(root: Path) -> None:
    _tree(root)
    (root / "images/val/c.png").symlink_to(root / "gone/c.png")
    write_mask(root / "masks/val/c.png", stripes([0, 1]))


def dangling_mask_link(root: Path) -> None:
    _tree(root)
    (root / "masks/val/a.png").unlink()
    (root / "masks/val/a.png").symlink_to(root / "gone/a.png")


CASES = [
    (jpeg_named_png_mask, r"masks/val/a.png: mask is a JPEG file \(lossy: its labels are approximate\); masks must be PNG"),
    (lossy_tiff_named_png_mask, r"masks/val/a.png: mask is a jpeg-compressed TIFF \(lossy"),
    (classes_not_utf8, r"classes.txt:1: class list is not UTF-8 text \(byte 0xe8\); save it as UTF-8"),
    (other_class_names, r"the model's classes differ from the dataset's: id 1 is 'cat' in the model, 'dog' in the dataset"),
    (dangling_image_link, r"images/val/c.png: image is a symlink to .*gone/c.png, which does not exist"),
    (dangling_mask_link, r"masks/val/a.png: mask is a symlink to .*gone/a.png, which does not exist"),
]


@pytest.mark.parametrize(("make", "expected"), CASES, ids=[make.__name__ for make, _ in CASES])
def test_data_that_is_not_what_it_claims_is_one_line_naming_it(make, expected: str, checkpoint: Path,
                                                               tmp_path: Path) -> None:
    root = tmp_path / "data"
    make(root)
    message = one_line_error(["eval", "--checkpoint", str(checkpoint), "--set", f"data.root={root}"])
    assert re.search(expected, message), message


def test_names_differing_only_in_case_and_spacing_are_the_same_class(checkpoint: Path, tmp_path: Path) -> None:
    root = _tree(tmp_path / "data")
    (root / "classes.txt").write_text("\ufeffBackground\n cat  255 0 0\n")  # with a byte-order mark, as Notepad saves
    assert _eval(checkpoint, root, tmp_path / "scores.json")["pixels"] == 2 * HEIGHT * WIDTH


def test_symlinked_folder_and_file_are_read_and_a_loop_is_named(checkpoint: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    elsewhere = write_folder(tmp_path / "elsewhere", "val", {"c": stripes([0, 1]), "d": stripes([1, 0])})
    root = _tree(tmp_path / "data")
    (root / "images/val/linked").symlink_to(elsewhere / "images/val", target_is_directory=True)
    (root / "masks/val/linked").symlink_to(elsewhere / "masks/val", target_is_directory=True)
    (root / "images/val/e.png").symlink_to(write_image(tmp_path / "store/e.png"))
    write_mask(root / "masks/val/e.png", stripes([0, 1]))
    (root / "images/val/sub").mkdir()
    (root / "images/val/sub/loop").symlink_to(root / "images", target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="annseg"):
        scores = _eval(checkpoint, root, tmp_path / "scores.json")
    assert scores["pixels"] == 5 * HEIGHT * WIDTH  # a, b, linked/c, linked/d, e: every pixel labelled
    loop = root / "images/val/sub/loop"
    assert any(f"{loop} is a symlink loop (it leads back to {os.path.realpath(root / 'images')}" in message
               for message in caplog.messages), caplog.messages


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class model (background, cat, dog) that never predicts dog."""
    config = load_config(None, [*TINY, "data.dataset=folder", "data.root=unused"])
    network = build_model(config.model, 3, load_backbone_weights=False).eval()
    with torch.no_grad():
        network.classifier.bias[2] = -1e4
    path = tmp_path_factory.mktemp("model") / "model.ckpt"
    save_model(path, network, model_meta(config, ["background", "cat", "dog"], [(0, 0, 0), (255, 0, 0), (0, 255, 0)]))
    return path


def test_class_absent_from_truth_and_prediction_is_null_and_the_table_says_why(
        three_classes: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _tree(tmp_path / "data")
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    scores = _eval(three_classes, root, tmp_path / "scores.json")
    assert scores["IoU"]["dog"] is None and scores["Acc"]["dog"] is None
    assert scores["IoU"]["background"] is not None and scores["mIoU"] is not None
    table = capsys.readouterr().out
    assert re.search(r"\| dog +\| +- \| +- \|", table), table
    assert "-: class absent from ground truth and prediction, left out of the means: dog" in table


def test_all_ignore_masks_give_null_scores_and_say_so(checkpoint: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    root = write_folder(tmp_path / "data", "val", {"a": stripes([255]), "b": stripes([255])})
    scores = _eval(checkpoint, root, tmp_path / "scores.json")
    assert scores["pixels"] == 0
    assert scores["mIoU"] is scores["aAcc"] is scores["mAcc"] is None
    assert set(scores["IoU"].values()) == set(scores["Acc"].values()) == {None}
    table = capsys.readouterr().out
    assert "mIoU -  pixel accuracy -" in table and "-: no labelled pixels (every mask pixel is ignore)" in table
