"""``annseg`` with progress markers, for tests that kill it: ``python -m tests.engine.killable MARKERS ARGS...``.

The computation is exactly the command's; only timing and markers change. Before each
training step it creates ``MARKERS/step-N`` and pauses briefly, so that a kill lands inside a
step; each checkpoint is written in two halves with a pause between, after creating
``MARKERS/saving-<file>``, so that a kill can land in the middle of a checkpoint write; before
the K-th validation batch of the process it creates ``MARKERS/validating-K`` and pauses, so
that a kill can land inside a validation.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

import torch

from annseg.cli import main
from annseg.engine.module import SegmentationModule

# Ctrl-C raises KeyboardInterrupt here as in a user's terminal, even if the process that
# started this one ignored SIGINT (an ignored signal stays ignored across exec).
signal.signal(signal.SIGINT, signal.default_int_handler)
markers = Path(sys.argv[1])
markers.mkdir(parents=True, exist_ok=True)
_training_step = SegmentationModule.training_step
_validation_step = SegmentationModule.validation_step
_validation_batches = [0]
_save = torch.save


STEP_PAUSE = float(os.environ.get("KILLABLE_STEP_PAUSE", "0.02"))  # seconds after each step marker


def training_step(self: SegmentationModule, batch: dict, batch_idx: int) -> torch.Tensor:
    (markers / f"step-{self.global_step + 1}").touch()
    time.sleep(STEP_PAUSE)
    return _training_step(self, batch, batch_idx)


def validation_step(self: SegmentationModule, batch: dict, batch_idx: int) -> None:
    _validation_batches[0] += 1
    (markers / f"validating-{_validation_batches[0]}").touch()
    time.sleep(0.1)
    return _validation_step(self, batch, batch_idx)


def save_in_two_halves(obj: object, file: object, *args: object, **kwargs: object) -> None:
    if isinstance(file, (str, Path)) or not hasattr(file, "write"):
        return _save(obj, file, *args, **kwargs)
    buffer = io.BytesIO()
    _save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    file.write(data[: len(data) // 2])
    file.flush()
    (markers / f"saving-{Path(file.name).name}").touch()
    time.sleep(0.3)
    file.write(data[len(data) // 2:])


SegmentationModule.training_step = training_step  # type: ignore[method-assign]
SegmentationModule.validation_step = validation_step  # type: ignore[method-assign]
torch.save = save_in_two_halves  # type: ignore[assignment]
main(sys.argv[2:])
