"""Faults around training: damaged checkpoints, resuming into another set-up, NaN/inf losses."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from annseg.cli import main
from annseg.engine.builders import build_model
from annseg.engine.checkpoint import AtomicCheckpointIO, latest_checkpoint, model_meta, read_checkpoint
from annseg.engine.config import ConfigError, load_config
from annseg.engine.module import NonFiniteError, SegmentationModule
from annseg.engine.train import check_resumable, resolve_resume
from annseg.losses import ANNLoss
from tests.engine.tiny import TINY, tiny_cli_args

CLASSES = ["background", "beacon", "object_red", "object_blue"]


def write_checkpoint(path: Path, step: int, value: float = 1.0) -> Path:
    config = load_config(None, TINY)
    payload = {"state_dict": {"model.w": torch.full((4096,), value)}, "global_step": step,
               "annseg": model_meta(config, CLASSES, [(0, 0, 0)] * 4)}
    AtomicCheckpointIO().save_checkpoint(payload, path)
    return path


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: torch.load alone would not notice
    path.write_bytes(bytes(data))


def test_latest_is_the_newest_good_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "checkpoints"
    write_checkpoint(folder / "iter_000002.ckpt", 2)
    write_checkpoint(folder / "iter_000004.ckpt", 4)
    write_checkpoint(folder / "last.ckpt", 4)
    assert latest_checkpoint(folder) == (folder / "last.ckpt", [])

    truncate(folder / "last.ckpt")
    path, skipped = latest_checkpoint(folder)
    assert path == folder / "iter_000004.ckpt" and len(skipped) == 1 and "last.ckpt is truncated" in skipped[0]

    flip_a_byte(folder / "iter_000004.ckpt")
    with caplog.at_level(logging.WARNING, logger="annseg"):
        assert resolve_resume("latest", tmp_path) == folder / "iter_000002.ckpt"
    assert "iter_000004.ckpt is corrupt" in caplog.text and "fails the CRC check" in caplog.text

    truncate(folder / "iter_000002.ckpt")
    with pytest.raises(ValueError, match=r"--resume latest: no readable checkpoint in .*checkpoints \(3 damaged\)"):
        resolve_resume("latest", tmp_path)


def test_latest_without_checkpoints_starts_afresh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="annseg"):
        assert resolve_resume("latest", tmp_path) is None
    assert "no checkpoint in" in caplog.text and "starting at iteration 0" in caplog.text


@pytest.mark.parametrize(("damage", "message"), [(truncate, "is truncated"), (flip_a_byte, "is corrupt")])
def test_a_named_damaged_checkpoint_is_an_error(tmp_path: Path, damage, message: str) -> None:
    path = write_checkpoint(tmp_path / "run.ckpt", 3)
    resolve_resume(str(path), tmp_path)
    damage(path)
    with pytest.raises(ValueError, match=f"--resume: checkpoint .*run.ckpt {message}"):
        resolve_resume(str(path), tmp_path)
    with pytest.raises(SystemExit, match=f"annseg: error: checkpoint .*run.ckpt {message}"):
        main(["eval", "--checkpoint", str(path)])


def test_resume_refuses_another_model_or_class_count(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "run.ckpt", 3)
    config = load_config(None, TINY)
    check_resumable(path, config, CLASSES)
    with pytest.raises(ConfigError, match=r"was trained for classes \[.*'object_blue'\], but dataset 'synthetic' has \[.*'object_red'\]"):
        check_resumable(path, config, CLASSES[:3])
    wider = load_config(None, [*TINY, "model.options.head_channels=32"])
    with pytest.raises(ConfigError, match="model.options is .*'head_channels': 16.* in checkpoint .*run.ckpt but "
                       ".*'head_channels': 32.* in this run's config"):
        check_resumable(path, wider, CLASSES)


def poison_losses(monkeypatch: pytest.MonkeyPatch, iterations: set[int]) -> None:
    """Make the training loss NaN at the given iterations (1-based; one loss per iteration)."""
    forward, calls = ANNLoss.forward, [0]

    def poisoned(self: ANNLoss, *args, **kwargs) -> torch.Tensor:
        calls[0] += 1
        loss = forward(self, *args, **kwargs)
        return loss * float("nan") if calls[0] in iterations else loss

    monkeypatch.setattr(ANNLoss, "forward", poisoned)


def test_nan_loss_stops_training_without_writing_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    poison_losses(monkeypatch, {3})
    with pytest.raises(SystemExit) as error:
        main(["train", *tiny_cli_args(), "--out", str(tmp_path)])
    message = str(error.value)
    assert message.startswith("annseg: error: training stopped at iteration 3: the loss is nan") and "\n" not in message
    assert "--resume latest" in message
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["iter_000002.ckpt", "last.ckpt"]
    last = read_checkpoint(folder / "last.ckpt")
    assert last["global_step"] == 2
    assert all(bool(torch.isfinite(t).all()) for t in last["state_dict"].values() if t.is_floating_point())
    assert not (tmp_path / "metrics.json").exists()


def test_skipped_iterations_change_nothing_and_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    poison_losses(monkeypatch, {3})
    main(["train", *tiny_cli_args("train.skip_nonfinite=1", "train.checkpoint_every=1"), "--out", str(tmp_path)])
    assert json.loads((tmp_path / "metrics.json").read_text())["skipped_iterations"] == [3]
    before, after = (read_checkpoint(tmp_path / "checkpoints" / f"iter_00000{i}.ckpt") for i in (2, 3))
    for key, value in before["state_dict"].items():  # weights and BatchNorm statistics
        assert torch.equal(value, after["state_dict"][key]), key
    momentum_before, momentum_after = (c["optimizer_states"][0]["state"] for c in (before, after))
    for index, state in momentum_before.items():
        assert torch.equal(state["momentum_buffer"], momentum_after[index]["momentum_buffer"])
    assert after["skipped_iterations"] == [3]
    last = read_checkpoint(tmp_path / "checkpoints" / "iter_000004.ckpt")["state_dict"]
    assert any(not torch.equal(last[k], v) for k, v in after["state_dict"].items())  # iteration 4 trained


def test_more_bad_iterations_than_allowed_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    poison_losses(monkeypatch, {2, 3})
    with pytest.raises(SystemExit, match=r"stopped at iteration 3: the loss is nan after skipping iterations \[2\]"):
        main(["train", *tiny_cli_args("train.skip_nonfinite=1"), "--out", str(tmp_path)])


def test_non_finite_weights_are_never_saved() -> None:
    config = load_config(None, TINY)
    module = SegmentationModule(build_model(config.model, 4), ANNLoss(), class_names=CLASSES)
    module.on_save_checkpoint({})
    with torch.no_grad():
        module.model.classifier.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="refusing to write a checkpoint .*model weight classifier.weight is not finite"):
        module.on_save_checkpoint({})
