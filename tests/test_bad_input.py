"""Bad input, generated here, must end in ONE line that names the file or key: never a deep
traceback, never a silent wrong number. Driven through the ``annseg`` command as a user would."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import re

import numpy as np
import pytest
from PIL import Image

from annseg.cli import main
from annseg.engine.builders import build_model
from annseg.engine.checkpoint import model_meta, save_model
from annseg.engine.config import load_config
from tests.data.trees import stripes, write_folder, write_mask
from tests.engine.tiny import TINY, tiny_cli_args


def one_line_error(args: list[str]) -> str:
    with pytest.raises(SystemExit) as raised:
        main(args)
    message = str(raised.value)
    assert message.startswith("annseg: error: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-class model (background, cat) for the folder dataset."""
    config = load_config(None, [*TINY, "data.dataset=folder", "data.root=unused"])
    path = tmp_path_factory.mktemp("model") / "model.ckpt"
    save_model(path, build_model(config.model, 2).eval(), model_meta(config, ["background", "cat"], [(0, 0, 0), (255, 0, 0)]))
    return path


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _tree(root: Path, suffix: str = ".png", ids: list[int] = [0, 1, 255]) -> Path:
    return write_folder(root, "val", {"a": stripes(ids), "b": stripes([1, 0])}, suffix=suffix)


def truncated_png(root: Path) -> None:
    truncate(_tree(root) / "images/val/a.png")


def truncated_jpeg(root: Path) -> None:
    truncate(_tree(root, ".jpg") / "images/val/a.jpg")


def not_an_image(root: Path) -> None:
    (_tree(root) / "images/val/a.png").write_text("these are not pixels")


def mask_16bit(root: Path) -> None:
    Image.fromarray(stripes([0, 1]).astype(np.uint16)).save(_tree(root) / "masks/val/a.png")


def mask_rgb(root: Path) -> None:
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(_tree(root) / "masks/val/a.png")


def ids_out_of_range(root: Path) -> None:
    _tree(root, ids=[0, 1, 7])


def size_mismatch(root: Path) -> None:
    write_mask(_tree(root) / "masks/val/a.png", stripes([0, 1], 9, 12))


def missing_mask(root: Path) -> None:
    (_tree(root) / "masks/val/a.png").unlink()


def empty_folder(root: Path) -> None:
    write_folder(root, "val", {})
    for folder in ("images/val", "masks/val"):
        (root / folder).mkdir(parents=True)


def wrong_extension(root: Path) -> None:
    write_folder(root, "val", {"a": stripes([0, 1])}, suffix=".gif")


def more_classes_than_the_model(root: Path) -> None:
    _tree(root)
    (root / "classes.txt").write_text("background\ncat 255 0 0\ndog 0 255 0\n")


CASES: list[tuple[Callable[[Path], None], str]] = [
    (truncated_png, r"images/val/a.png: cannot read image"),
    (truncated_jpeg, r"images/val/a.jpg: cannot read image"),
    (not_an_image, r"images/val/a.png: cannot read image .*expected a complete PNG or JPEG"),
    (mask_16bit, r"masks/val/a.png: mask has mode 'I;16'"),
    (mask_rgb, r"masks/val/a.png: mask has mode 'RGB'"),
    (ids_out_of_range, r"masks/val/a.png: ids \[7\] outside"),
    (size_mismatch, r"images/val/a.png: image is 12x8 but its mask .*masks/val/a.png is 12x9"),
    (missing_mask, r"images/val/a.png: no mask found; expected .*masks/val/a.png"),
    (empty_folder, r"images/val: no images found for split 'val'"),
    (wrong_extension, r"images/val: no images found .*\(.png, .jpg, .jpeg\).* other file\(s\), e.g. \['a.gif'\]"),
    (more_classes_than_the_model, r"the model predicts 2 classes \(background, cat\) but the dataset has 3"),
]


@pytest.mark.parametrize(("make", "expected"), CASES, ids=[make.__name__ for make, _ in CASES])
def test_bad_dataset_file_is_one_line_naming_it(make, expected: str, checkpoint: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    make(root)
    message = one_line_error(["eval", "--checkpoint", str(checkpoint), "--set", f"data.root={root}"])
    assert re.search(expected, message), message


def test_unreadable_file_is_one_line_naming_it(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path / "data")
    locked = root / "images/val/b.png"
    opener = Image.open

    def open_(path, *args, **kwargs):  # as for a file without read permission (tests may run as root)
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return opener(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_)
    message = one_line_error(["eval", "--checkpoint", str(checkpoint), "--set", f"data.root={root}"])
    assert "images/val/b.png: cannot read image" in message and "Permission denied" in message


def test_bad_mask_inside_a_dataloader_worker_is_one_line(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "data", "train", {"a": stripes([0, 1]), "b": stripes([0, 9])})
    write_folder(root, "val", {"a": stripes([0, 1])})
    message = one_line_error(["train", *tiny_cli_args("data.dataset=folder", f"data.root={root}", "data.num_workers=2",
                                                      "data.train_length=null"), "--out", str(tmp_path / "run")])
    assert "masks/train/b.png: ids [9] outside" in message and "Traceback" not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  max_iters: [1, 2\n", r"bad.yaml is not valid YAML: line 3, column 1: expected ',' or ']'"),
        ("train:\n\tlr: 0.1\n", r"bad.yaml is not valid YAML: line 2, column 1: found character '\\t'"),
        ("train:\n  max_iter: 3\n", r"bad.yaml: unknown config key train.'max_iter'; did you mean train.'max_iters'"),
        ("data:\n  batch_size: eight\n", r"bad.yaml: data.batch_size: expected int, got 'eight'"),
        ("model:\n  options: {head_channel: 8}\n", r"unknown model option model.options.head_channel"),
        ("- train\n", r"bad.yaml: expected a mapping at the top, got list"),
    ],
)
def test_bad_config_file_is_one_line_naming_the_key(text: str, expected: str, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    message = one_line_error(["train", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "run")])
    assert re.search(expected, message), message


def test_checkpoint_for_another_class_count_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    message = one_line_error(["eval", "--checkpoint", str(checkpoint), "--set", "data.dataset=synthetic"])
    assert "the model predicts 2 classes" in message and "dataset has 4" in message


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_input_to_predict_names_it(suffix: str, checkpoint: Path, tmp_path: Path) -> None:
    image = tmp_path / f"photo{suffix}"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(image)
    truncate(image)
    message = one_line_error(["predict", str(image), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")])
    assert f"photo{suffix}: cannot read image" in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.max_iters=0"], "train.max_iters: 0 is out of range; expected an int in [1, 1000000000]"),
        (["train.lr=.nan"], "train.lr: nan is out of range; expected a finite number > 0"),
        (["train.val_every=0"], "train.val_every: 0 is out of range"),
        (["data.crop_size=[8, 8]", "data.batch_size=1"], "data.crop_size: [8, 8] with data.batch_size 1 leaves BatchNorm"),
        (["eval.stride=[64, 64]", "eval.crop_size=[32, 32]"], "eval.stride[0]: 64 is larger than eval.crop_size[0] 32"),
        (["model.options={dropout: 1.5}"], "model.options.dropout: 1.5 is out of range; expected a finite number in [0, 1)"),
    ],
)
def test_bad_config_value_stops_train_before_it_starts(overrides: list[str], expected: str, tmp_path: Path) -> None:
    """Before: 0 iterations exited 0 (or a ZeroDivisionError), nan trained nothing, BatchNorm raised without a key."""
    message = one_line_error(["train", *tiny_cli_args(*overrides), "--out", str(tmp_path / "run")])
    assert expected in message, message
    assert not (tmp_path / "run").exists()  # nothing written


def test_python_style_numbers_reach_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 5E-4\n", encoding="utf-8")
    main(["train", "--config", str(path), "--set", "train.momentum=.95", "--print-config"])
    printed = capsys.readouterr().out
    assert "lr: 0.001\n" in printed and "weight_decay: 0.0005\n" in printed and "momentum: 0.95\n" in printed


def test_config_that_is_not_utf8_or_is_a_directory_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# réglages\ntrain:\n  lr: 0.01\n".encode("latin-1"))
    message = one_line_error(["train", "--config", str(path), "--out", str(tmp_path / "run")])
    assert message == f"annseg: error: config file {path} is not UTF-8 text (line 1, byte 3); save it as UTF-8"
    message = one_line_error(["train", "--config", str(tmp_path), "--out", str(tmp_path / "run")])
    assert message.startswith(f"annseg: error: config file {tmp_path} is a directory; expected a YAML file or a packaged config name (")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "eval.stride=[0, 16]"], r"eval.stride\[0\]: 0 is out of range; expected an int in \[1, 32768\]"),
        (["--set", "eval.batch_size=0"], r"eval.batch_size: 0 is out of range"),
        (["--mode", "slide", "--set", "eval.crop_size=[8, 8]"], r"eval.stride\[0\]: 16 is larger than eval.crop_size\[0\] 8"),
        (["--scales", "1", "17"], r"eval.scales\[1\]: 17.0 is out of range; expected a finite number in \(0, 16\]"),
    ],
)
def test_bad_eval_setting_is_one_line_naming_the_key(args: list[str], expected: str, checkpoint: Path) -> None:
    message = one_line_error(["eval", "--checkpoint", str(checkpoint), *args])
    assert re.search(expected, message), message
