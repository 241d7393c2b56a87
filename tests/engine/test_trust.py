"""Files never run code: every entry point refuses a checkpoint that carries a pickled object.

A real annseg checkpoint gets one extra entry whose ``__reduce__`` creates a marker file when
it is unpickled. Each entry point must stop with one line naming the file, and the marker
must not exist: nothing in the file ran.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import annseg
from annseg.cli import main
from annseg.engine.checkpoint import read_checkpoint
from tests.test_bad_input import one_line_error
from tests.engine.tiny import tiny_checkpoint, tiny_cli_args


class CreatesAFile:
    """Unpickling this calls ``Path.touch(marker)``: code from the file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("good") / "model.ckpt"
    tiny_checkpoint(path)
    return path


def malicious_copy(good: Path, path: Path, marker: Path) -> Path:
    """``good``'s content plus an object that would create ``marker``, saved as torch.save does."""
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["global_step"] = 999999
    checkpoint["annseg"]["note"] = CreatesAFile(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def test_the_payload_would_run_if_unpickled(good: Path, tmp_path: Path) -> None:
    """The threat is real: a plain ``torch.load(weights_only=False)`` creates the marker."""
    marker = tmp_path / "ran"
    evil = malicious_copy(good, tmp_path / "evil.ckpt", marker)
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_annseg_checkpoints_load_with_weights_only(good: Path) -> None:
    """save_model's format is plain data (training checkpoints: tests/engine/test_train.py round-trips them)."""
    assert torch.load(good, weights_only=True)["annseg"]["classes"] == ["class0", "class1", "class2"]
    assert annseg.load(good).classes == ["class0", "class1", "class2"]


def _image(folder: Path) -> Path:
    path = folder / "image.png"
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(path)
    return path


def _load(good: Path, evil: Path, tmp: Path) -> tuple[str, Path]:
    with pytest.raises(ValueError) as error:
        annseg.load(evil)
    return str(error.value), evil


def _command(*args: str) -> Callable[[Path, Path, Path], tuple[str, Path]]:
    """The CLI with ``EVIL`` and ``TMP`` in ``args`` standing for the file and a scratch folder."""

    def run(good: Path, evil: Path, tmp: Path) -> tuple[str, Path]:
        image = _image(tmp)
        filled = [a.replace("EVIL", str(evil)).replace("TMP", str(tmp)).replace("IMAGE", str(image)) for a in args]
        return one_line_error(filled), evil

    return run


def _resume_latest(name: str) -> Callable[[Path, Path, Path], tuple[str, Path]]:
    """``--resume latest`` with the malicious file dropped into ``checkpoints/`` as ``name``,
    beside an older good ``iter_000002.ckpt`` that a silent fallback would pick."""

    def run(good: Path, evil: Path, tmp: Path) -> tuple[str, Path]:
        folder = tmp / "run" / "checkpoints"
        folder.mkdir(parents=True)
        (folder / "iter_000002.ckpt").write_bytes(good.read_bytes())
        dropped = evil.rename(folder / name)
        return one_line_error(["train", *tiny_cli_args(), "--out", str(tmp / "run"), "--resume", "latest"]), dropped

    return run


ENTRY_POINTS: dict[str, Callable[[Path, Path, Path], tuple[str, Path]]] = {
    "eval": _command("eval", "--checkpoint", "EVIL", "--out", "TMP/scores.json"),
    "predict": _command("predict", "IMAGE", "--checkpoint", "EVIL", "--out", "TMP/predictions"),
    "export onnx": _command("export", "onnx", "--checkpoint", "EVIL", "--out", "TMP/model.onnx"),
    "annseg.load": _load,
    "train --resume PATH": _command("train", *tiny_cli_args(), "--out", "TMP/run", "--resume", "EVIL"),
    "train --resume latest (iter_999999.ckpt)": _resume_latest("iter_999999.ckpt"),
    "train --resume latest (last.ckpt)": _resume_latest("last.ckpt"),
    "convert mmseg": _command("convert", "mmseg", "EVIL", "TMP/out.ckpt"),
    "convert authors": _command("convert", "authors", "EVIL", "TMP/out.ckpt"),
    "model.backbone_weights": _command("train", *tiny_cli_args("model.backbone_weights=EVIL"), "--out", "TMP/run"),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_refuses_a_pickled_object(entry: str, good: Path, tmp_path: Path) -> None:
    if entry == "export onnx":
        pytest.importorskip("onnxruntime")
    marker = tmp_path / "code-ran"
    evil = malicious_copy(good, tmp_path / "evil.ckpt", marker)
    message, named = ENTRY_POINTS[entry](good, evil, tmp_path)
    assert "\n" not in message, message
    assert f"{named} holds a pickled object" in message and "annseg loads plain data only" in message, message
    assert not marker.exists(), f"{entry} ran code from the file"
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run started
    assert not (tmp_path / "out.ckpt").exists() and not (tmp_path / "model.onnx").exists()


def test_resume_latest_names_the_file_instead_of_falling_back(good: Path, tmp_path: Path) -> None:
    """Skipping it quietly would resume an older run state and hide that the folder was tampered with."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "iter_000002.ckpt").write_bytes(good.read_bytes())
    malicious_copy(good, folder / "iter_999999.ckpt", tmp_path / "ran")
    with pytest.raises(ValueError, match=r"checkpoint .*iter_999999\.ckpt holds a pickled object"):
        from annseg.engine.checkpoint import latest_checkpoint

        latest_checkpoint(folder)
    assert read_checkpoint(folder / "iter_000002.ckpt")["annseg"]["classes"]  # the good one is untouched
