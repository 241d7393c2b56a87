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


def test_save_model_round_trips_through_load_model(tmp_path: Path) -> None:
    from annseg.engine.builders import build_model
    from annseg.engine.checkpoint import load_model, model_meta, save_model
    from annseg.engine.config import load_config
    from tests.engine.tiny import TINY

    config = load_config(None, TINY)
    model = build_model(config.model, 3).eval()
    meta = model_meta(config, ["a", "b", "c"], [(1, 2, 3), (4, 5, 6), (7, 8, 9)])
    save_model(tmp_path / "model.ckpt", model, meta)
    loaded, loaded_meta = load_model(tmp_path / "model.ckpt")
    image = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), model(image), rtol=0, atol=0)
    assert loaded_meta["classes"] == ["a", "b", "c"] and loaded_meta["palette"][2] == [7, 8, 9]
    assert loaded_meta["config"] == config and loaded_meta["normalization"]["mean"] == list(config.data.mean)
