from pathlib import Path

import pytest
import torch

from annseg.engine.checkpoint import AtomicCheckpointIO


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("interrupted while writing")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "weights": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="interrupted while writing"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(3), "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left behind
    io.save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3
