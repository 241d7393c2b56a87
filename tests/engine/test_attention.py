"""Segmenter.attention: the weights a block really used, for points mapped by the stride rule."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import annseg
from annseg.cli import main
from annseg.engine.attention import feature_index
from annseg.viz import attention_picture
from tests.engine.tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.ckpt"
    tiny_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint: Path):
    return annseg.load(checkpoint)


def _image(height: int = 64, width: int = 96) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("block", ["apnb", "afnb"])
def test_weights_sum_to_one_per_point(model, block: str) -> None:
    maps = model.attention(_image(45, 70), [(0, 0), (69, 44), (33.5, 20.25)], block=block)
    assert maps.weights.shape == (3, 110) and maps.weights.dtype == np.float32
    assert (maps.weights > 0).all()
    np.testing.assert_allclose(maps.weights.sum(1), 1, atol=1e-5)
    assert maps.sizes == (1, 3, 6, 8) and maps.image == (45, 70)
    assert [level.shape for _, level in maps.levels()] == [(3, 1, 1), (3, 3, 3), (3, 6, 6), (3, 8, 8)]


def test_points_map_to_feature_positions_by_the_stride_rule(model) -> None:
    maps = model.attention(_image(), [(0, 0), (7, 8), (95, 63), (47.9, 31.99)])
    assert maps.feature == maps.query_feature == (8, 12) and maps.stride == (8.0, 8.0)
    assert maps.positions == ((0, 0), (1, 0), (7, 11), (3, 5))  # floor(y * 8 / 64), floor(x * 12 / 96)
    assert feature_index(np.arange(10), 10, 3).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("block", ["apnb", "afnb"])
def test_weights_are_those_inside_the_blocks_forward(model, block: str) -> None:
    """The block's attention output at each point's position is the recorded weights times its anchor
    values, both caught from the network's real (fused-kernel) forward by hooks."""
    module = getattr(model.network, block)
    caught: dict[str, torch.Tensor] = {}
    # What reads the attention's output O: annseg.load folds W into the fusion, and AFNB's
    # folded output into the context conv.
    output = module.out if module.folded is None else module.folded
    if block == "afnb" and model.network.afnb_context is not None:
        output = model.network.afnb_context
    hooks = [output.register_forward_pre_hook(lambda m, inputs: caught.update(context=inputs[0])),
             module.value.register_forward_hook(lambda m, inputs, output: caught.update(values=output))]
    try:
        maps = model.attention(_image(61, 83), [(3, 4), (80, 60), (41, 30)], block=block)
    finally:
        for hook in hooks:
            hook.remove()
    assert caught["values"].shape[1] == 110  # the anchors' values, (1, S, Cv)
    height, width = maps.query_feature
    rows = [r * width + c for r, c in maps.positions]
    context = caught["context"][0, rows].double()  # (P, Cv), what the block computed
    expected = torch.from_numpy(maps.weights).double() @ caught["values"][0].double()
    torch.testing.assert_close(context, expected, atol=1e-5, rtol=1e-4)
    assert module.probe is None  # the block is left as it was


def test_afnb_anchors_come_from_the_low_level_map(model) -> None:
    apnb = model.attention(_image(), [(50, 30)], block="apnb")
    afnb = model.attention(_image(), [(50, 30)], block="afnb")
    assert afnb.block == "afnb" and not np.allclose(apnb.weights, afnb.weights)


@pytest.mark.parametrize("points, message", [
    ([(96, 10)], r"point \(96, 10\) is outside the 96x64 image"),
    ([(-1, 0)], r"point \(-1, 0\) is outside"),
    ([(1, 2, 3)], r"point \(1, 2, 3\) is not two numbers"),
    ([], "expected a non-empty list"),
])
def test_bad_points_are_named(model, points, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model.attention(_image(), points)


def test_an_unknown_block_is_named(model) -> None:
    with pytest.raises(ValueError, match=r"unknown block 'nb'; choose from \['apnb', 'afnb'\]"):
        model.attention(_image(), [(1, 1)], block="nb")


@pytest.mark.parametrize("variant, missing", [("apnb", "afnb"), ("afnb", "apnb"), ("fcn", "apnb"), ("nb", "apnb")])
def test_a_model_without_the_block_says_so(tmp_path: Path, variant: str, missing: str) -> None:
    tiny_checkpoint(tmp_path / "model.ckpt", f"model.variant={variant}")
    model = annseg.load(tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match=f"variant '{variant}'.* has no {missing.upper()} with pyramid anchors"):
        model.attention(_image(), [(1, 1)], block=missing)


def test_cli_draws_the_picture_of_the_points(checkpoint: Path, model, tmp_path: Path, capsys) -> None:
    Image.fromarray(_image(50, 75)).save(tmp_path / "scene.png")
    out = tmp_path / "attention.png"
    main(["attention", str(tmp_path / "scene.png"), "--checkpoint", str(checkpoint), "--at", "10", "20",
          "--at", "70.5", "45", "--block", "afnb", "--out", str(out)])
    assert f"wrote {out}: 2 point(s), AFNB anchors 1x1 + 3x3 + 6x6 + 8x8 = 110" in capsys.readouterr().out
    expected = attention_picture(_image(50, 75), model.attention(_image(50, 75), [(10, 20), (70.5, 45)], "afnb"))
    with Image.open(out) as written:
        assert written.format == "PNG" and written.size == expected.size
        np.testing.assert_array_equal(np.asarray(written.convert("RGB")), np.asarray(expected))
    assert expected.width == 5 * 75 * 6 + 4 * 6  # five panels upscaled 6x to a short side >= 256, borders


@pytest.mark.parametrize("args, message", [
    (["--at", "75", "3"], r"point \(75, 3\) is outside the 75x50 image"),
    (["--at", "1", "x"], "argument --at: expected a number"),
    (["--at", "1", "1", "--block", "afnb", "--checkpoint", "{apnb}"], "variant 'apnb'.* has no AFNB"),
])
def test_cli_errors_are_one_line(checkpoint: Path, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    Image.fromarray(_image(50, 75)).save(tmp_path / "scene.png")
    if "{apnb}" in args:
        tiny_checkpoint(tmp_path / "apnb.ckpt", "model.variant=apnb")
        args = [str(tmp_path / "apnb.ckpt") if a == "{apnb}" else a for a in args]
    argv = ["attention", str(tmp_path / "scene.png"), "--checkpoint", str(checkpoint), *args,
            "--out", str(tmp_path / "a.png")]
    with pytest.raises(SystemExit) as error:
        main(argv)
    text = str(error.value) if error.value.code != 2 else capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(message, text) and "\n" not in text
    assert not (tmp_path / "a.png").exists()
