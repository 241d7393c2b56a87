"""Faults from the machine: a full disk, a killed data worker, an unwritable --out, a folder
where a file is expected, an image too large for whole-image inference. Each ends in one line
naming the file and what to do; what was written before stays whole."""

from __future__ import annotations

import errno
import logging
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

import annseg.engine.datamodule as datamodule
from annseg.cli import main
from annseg.engine.checkpoint import read_checkpoint
from annseg.engine.inference import available_memory, warn_if_too_large, whole_image_bytes
from annseg.engine.train import write_text
from annseg.models import create_model
from tests.test_bad_input import one_line_error
from tests.engine.tiny import tiny_checkpoint, tiny_cli_args


class _DiskFullAfter:
    """A file object that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, file: Any, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()

    def __enter__(self) -> _DiskFullAfter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def fill_the_disk_when_writing(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """``torch.save`` into a file whose temporary name holds ``name`` meets a full disk midway."""
    save = torch.save

    def save_until_full(obj: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        if name in str(getattr(file, "name", "")):
            file = _DiskFullAfter(file, room=4096)
        save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fill_the_disk_when_writing(monkeypatch, "iter_000002.ckpt")
    short = tiny_cli_args("train.max_iters=2", "train.checkpoint_every=1", "train.val_every=2")
    message = one_line_error(["train", *short, "--out", str(tmp_path)])
    folder = tmp_path / "checkpoints"
    assert message == (f"annseg: error: no space left on device writing {folder / 'iter_000002.ckpt'}; "
                       "free space and --resume latest")
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 1  # the previous checkpoint, whole
    assert sorted(p.name for p in folder.iterdir()) == ["iter_000001.ckpt", "last.ckpt"]  # no stray part


def test_full_disk_during_a_log_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.json"
    write_text(path, "old\n")
    real_open = open

    def full(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        return _DiskFullAfter(handle, room=0) if "w" in mode and ".tmp-" in str(file) else handle

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(OSError) as error:
        write_text(path, "new\n")
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(path)
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


class _KilledOnce(Dataset):
    """The training set, except that the first item read in a worker process SIGKILLs that
    worker, as the OOM killer does (a marker file makes it happen once)."""

    def __init__(self, dataset: Dataset, marker: Path) -> None:
        self.dataset, self.marker, self.parent = dataset, marker, os.getpid()
        self.classes, self.palette = getattr(dataset, "classes", None), getattr(dataset, "palette", None)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        if os.getpid() != self.parent and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.dataset[index]


def test_a_killed_data_worker_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = datamodule.build_train_dataset
    monkeypatch.setattr(datamodule, "build_train_dataset",
                        lambda config: _KilledOnce(build(config), tmp_path / "killed"))
    message = one_line_error(["train", *tiny_cli_args("data.num_workers=1"), "--out", str(tmp_path / "run")])
    assert (tmp_path / "killed").exists()
    assert "a data-loading worker (pid " in message and ") was killed (" in message, message
    assert "likely out of memory" in message and "data.num_workers" in message and message.endswith("--resume latest")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.ckpt"
    tiny_checkpoint(path)
    return path


def _image(folder: Path, size: tuple[int, int] = (20, 24)) -> Path:
    path = folder / "image.png"
    Image.fromarray(np.zeros((*size, 3), dtype=np.uint8)).save(path)
    return path


# Each command with OUT standing for its --out (a folder; the file inside it for eval and export).
OUT_COMMANDS = {
    "train": ["train", *tiny_cli_args(), "--out", "OUT"],
    "demo": ["demo", *tiny_cli_args(), "--out", "OUT"],
    "predict": ["predict", "IMAGE", "--checkpoint", "CKPT", "--out", "OUT"],
    "eval": ["eval", "--checkpoint", "CKPT", "--out", "OUT/scores.json"],
    "export onnx": ["export", "onnx", "--checkpoint", "CKPT", "--out", "OUT/model.onnx"],
}


def _fill(args: list[str], out: Path, checkpoint: Path, image: Path) -> list[str]:
    return [a.replace("OUT", str(out)).replace("CKPT", str(checkpoint)).replace("IMAGE", str(image)) for a in args]


@pytest.mark.parametrize("command", list(OUT_COMMANDS))
def test_out_that_is_a_file_stops_before_any_work(command: str, checkpoint: Path, tmp_path: Path) -> None:
    if command == "export onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / "taken"
    out.write_text("a file the user keeps\n")
    message = one_line_error(_fill(OUT_COMMANDS[command], out, checkpoint, _image(tmp_path)))
    assert f"{out} is a file" in message or f"is inside {out}, which is a file" in message, message
    assert out.read_text() == "a file the user keeps\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "taken"]


@pytest.mark.parametrize("command", list(OUT_COMMANDS))
def test_read_only_out_stops_before_any_work(command: str, checkpoint: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Read-only as a non-root user sees it. Root writes into a ``chmod a-w`` folder, so the
    folder is also made to refuse new files at ``os.open``, where the CLI's write probe (and
    every real write) would meet a read-only mount."""
    if command == "export onnx":
        pytest.importorskip("onnxruntime")
    image = _image(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    real_open = os.open

    def refuse_in_locked(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith(str(locked)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_in_locked)
    try:
        message = one_line_error(_fill(OUT_COMMANDS[command], locked / "run", checkpoint, image))
    finally:
        locked.chmod(0o755)
    assert f"--out {locked / 'run'}" in message and f"cannot write in {locked}" in message, message
    assert list(locked.iterdir()) == []


def test_a_folder_where_a_file_is_expected(checkpoint: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    folder = tmp_path / "empty"
    folder.mkdir()
    message = one_line_error(["eval", "--checkpoint", str(folder)])
    assert message == f"annseg: error: checkpoint {folder} is a directory; expected a checkpoint file"
    (run / "checkpoints" / "last.ckpt").write_bytes(checkpoint.read_bytes())
    message = one_line_error(["predict", str(_image(tmp_path)), "--checkpoint", str(run), "--out", str(tmp_path / "p")])
    assert message.endswith(f"checkpoint {run} is a directory; expected a checkpoint file such as "
                            f"{run / 'checkpoints' / 'last.ckpt'}")
    for args, what in ((["train", "--config", str(folder)], "config file"),
                       (["train", *tiny_cli_args(), "--out", str(tmp_path / "r"), "--resume", str(folder)],
                        "checkpoint"),
                       (["train", *tiny_cli_args(f"model.backbone_weights={folder}"), "--out", str(tmp_path / "r")],
                        "backbone weights"),
                       (["convert", "mmseg", str(folder), str(tmp_path / "x.ckpt")], "mmseg checkpoint")):
        message = one_line_error(args)
        assert f"{what} {folder} is a directory; expected a" in message, (args, message)
    assert not (tmp_path / "r" / "config.yaml").exists()


def _resnet101_ann():
    with torch.device("meta"):  # the widths are all the estimate reads: no weights needed
        return create_model("ann_resnet101", num_classes=19)


def test_whole_image_estimate_follows_the_widths() -> None:
    network = _resnet101_ann()
    per_pixel = whole_image_bytes(network, 1, 1, 19)
    assert per_pixel == 4 * (2048 * 11 / 4 + 1024 + 2 * 2048) / 64 + 4 * (3 + 3 * 19)
    assert whole_image_bytes(network, 8000, 8000, 19) == 8000 * 8000 * per_pixel
    assert whole_image_bytes(torch.nn.Conv2d(3, 3, 1), 10, 10, 3) is None  # not an ANN: no estimate
    assert available_memory(torch.device("cpu")) > 0


def test_an_image_too_large_for_whole_inference_warns(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    network = _resnet101_ann()
    images = torch.empty(1, 3, 8, 8)
    monkeypatch.setattr("annseg.engine.inference.available_memory", lambda device: 16 * 2**30)
    monkeypatch.setattr("annseg.engine.inference._WARNED", set())
    with caplog.at_level(logging.WARNING, logger="annseg"):
        assert not warn_if_too_large(network, images, 19, (1024, 2048))
        assert warn_if_too_large(network, images, 19, (8000, 8000))  # no forward: the size alone
        assert not warn_if_too_large(network, images, 19, (8000, 8000))  # once per size
    assert caplog.text.count("WARNING") == 1
    assert "8000x8000 image needs about 58.4 GB" in caplog.text and "use --mode slide" in caplog.text


def test_predict_warns_before_a_whole_image_forward(checkpoint: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    monkeypatch.setattr("annseg.engine.inference.available_memory", lambda device: 1000)
    monkeypatch.setattr("annseg.engine.inference._WARNED", set())
    with caplog.at_level(logging.WARNING, logger="annseg"):
        main(["predict", str(_image(tmp_path, (30, 40))), "--checkpoint", str(checkpoint),
              "--out", str(tmp_path / "p"), "--mode", "whole"])
    assert "whole-image inference on a 30x40 image needs about" in caplog.text and "--mode slide" in caplog.text
    assert (tmp_path / "p" / "image.png").is_file()  # a warning: it still runs
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="annseg"):
        main(["predict", str(_image(tmp_path, (30, 40))), "--checkpoint", str(checkpoint),
              "--out", str(tmp_path / "p"), "--mode", "slide"])
    assert "whole-image inference" not in caplog.text
