"""The pipeline commands driven as a user drives them: the installed ``annseg`` script."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from annseg.data import CITYSCAPES_TRAIN_TO_LABEL_ID
from annseg.engine import Config, dump_config
from tests.data.trees import stripes, write_cityscapes
from tests.engine.tiny import tiny_cli_args
from annseg.cli import main
from tests.test_cli import run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    proc = run("train", *tiny_cli_args(), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| object_red" in proc.stdout and "mIoU" in proc.stdout
    return out


def test_train_writes_run_folder(trained: Path) -> None:
    assert (trained / "checkpoints" / "last.ckpt").is_file() and (trained / "config.yaml").is_file()
    scores = json.loads((trained / "metrics.json").read_text())
    assert scores["iterations"] == 4 and set(scores["IoU"]) == {"background", "beacon", "object_red", "object_blue"}


def test_export_weights_drops_the_training_state_and_still_evaluates(trained: Path, tmp_path: Path) -> None:
    """`annseg export weights`: no optimiser, schedule or RNG state; eval, predict and annseg.load agree with
    the training checkpoint it came from; --resume refuses it (nothing to resume)."""
    import torch

    import annseg
    from annseg.engine.checkpoint import read_checkpoint

    last = trained / "checkpoints" / "last.ckpt"
    out = tmp_path / "model.ckpt"
    proc = run("export", "weights", "--checkpoint", str(last), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    content = read_checkpoint(out)
    assert set(content) == {"state_dict", "annseg"} and out.stat().st_size < 0.55 * last.stat().st_size  # SGD momentum: one buffer per weight
    assert content["annseg"] == read_checkpoint(last)["annseg"]
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    np.testing.assert_array_equal(annseg.load(out).predict(image), annseg.load(last).predict(image))
    scores = []
    for checkpoint in (last, out):
        proc = run("eval", "--checkpoint", str(checkpoint), "--out", str(tmp_path / f"{checkpoint.stem}.json"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        scores.append(json.loads((tmp_path / f"{checkpoint.stem}.json").read_text())["mIoU"])
    assert scores[0] == scores[1]
    proc = run("export", "weights", "--checkpoint", str(out), "--out", str(out))
    assert proc.returncode != 0 and "is the checkpoint itself" in proc.stderr and out.is_file()
    with torch.no_grad():
        assert torch.equal(annseg.load(out).network.classifier.weight, annseg.load(last).network.classifier.weight)


def test_eval_slide_flip_writes_json(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.json"
    proc = run("eval", "--checkpoint", str(trained / "checkpoints" / "last.ckpt"), "--mode", "slide", "--flip",
               "--scales", "0.75", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["eval"]["mode"] == "slide" and record["eval"]["flip"] and record["eval"]["scales"] == [0.75, 1.0]
    assert 0.0 <= record["mIoU"] <= 1.0 and record["pixels"] == 4 * 32 * 48
    assert "mIoU" in proc.stdout


def test_predict_folder_of_gray_rgba_and_16bit_images(trained: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((30, 50), 90, np.uint8)).save(images / "gray.png")
    Image.fromarray(np.full((20, 70, 4), 200, np.uint8)).save(images / "rgba.png")
    Image.fromarray(np.full((25, 40), 40000, np.uint16)).save(images / "deep.png")
    assert Image.open(images / "deep.png").mode == "I;16"
    out = tmp_path / "pred"
    proc = run("predict", str(images), "--checkpoint", str(trained / "checkpoints" / "last.ckpt"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = Image.open(out / "gray.png")
    assert labels.mode == "P" and labels.size == (50, 30) and np.asarray(labels).max() < 4
    assert Image.open(out / "rgba_overlay.png").size == (70 * 13, 20 * 13 + 32)  # upscaled, a one-row legend
    assert Image.open(out / "deep.png").size == (40, 25)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--set", "train.max_iter=3"], "unknown config key train.'max_iter'; did you mean train.'max_iters'"),
        (["train", "--set", "data.batch_size=two"], "data.batch_size: expected int, got 'two'"),
        (["train", "--config", "missing.yaml"], "config file missing.yaml does not exist"),
        (["eval", "--checkpoint", "missing.ckpt"], "checkpoint missing.ckpt does not exist"),
        (["predict", "nowhere.png", "--checkpoint", "x.ckpt"], "input nowhere.png does not exist"),
        (["train", "--set", "data.dataset=cityscapes"], "data.root is required for dataset 'cityscapes'"),
        (["train", "--set", "data.dataset=cityscapes", "--set", "data.root=nowhere"], "nowhere"),
    ],
)
def test_user_errors_are_one_line(args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as error:
        main(args)
    assert str(error.value).startswith("annseg: error: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_errors_reach_the_terminal_without_traceback(tmp_path: Path) -> None:
    proc = run("train", "--set", "train.max_iter=3", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("annseg: error: unknown config key train.'max_iter'")


def test_print_config_is_the_shipped_default() -> None:
    proc = run("train", "--print-config")
    assert proc.returncode == 0 and proc.stdout == dump_config(Config())


def test_cityscapes_tree_trains_and_predicts_label_ids(tmp_path: Path) -> None:
    """A tiny Cityscapes tree through train -> predict --format cityscapes (official label ids)."""
    masks = {f"aachen/aachen_00000{i}_000019": stripes([7, 26, 0, 24], 32, 48) for i in range(2)}
    root = write_cityscapes(tmp_path / "cs", "train", masks)
    write_cityscapes(root, "val", masks)
    out = tmp_path / "run"
    proc = run("train", *tiny_cli_args("data.dataset=cityscapes", f"data.root={root}", "train.max_iters=2",
                                       "train.checkpoint_every=2", "train.val_every=2"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| road" in proc.stdout
    images = root / "leftImg8bit" / "val"
    proc = run("predict", str(images), "--checkpoint", str(out / "checkpoints" / "last.ckpt"), "--format", "cityscapes",
               "--out", str(tmp_path / "submit"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(p.relative_to(tmp_path / "submit").as_posix() for p in (tmp_path / "submit").rglob("*.png"))
    assert written == [f"aachen/aachen_00000{i}_000019_leftImg8bit.png" for i in range(2)]  # no overlays
    ids = np.asarray(Image.open(tmp_path / "submit" / written[0]))
    assert ids.shape == (32, 48) and set(np.unique(ids)) <= set(CITYSCAPES_TRAIN_TO_LABEL_ID)


def test_demo_trains_evaluates_and_renders(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = run("demo", "--variant", "fcn", *tiny_cli_args(), "--out", str(out), "--overlays", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fcn_resnet18 on the built-in dataset, 4 iterations" in proc.stdout and "| object_blue" in proc.stdout
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["val_00000.png", "val_00001.png"]
    # image | ground truth | prediction, 32x48 upscaled 8x, 6 px borders, a title band and a legend
    assert Image.open(out / "overlays" / "val_00000.png").size == (3 * 384 + 2 * 6, 28 + 256 + 32)
    assert json.loads((out / "metrics.json").read_text())["train_seconds"] > 0


def test_two_process_ddp_on_cpu_agrees(tmp_path: Path) -> None:
    """Lightning DDP (gloo) with 2 CPU processes; validation is sharded, the scores are summed."""
    proc = run("train", "--accelerator", "cpu", "--devices", "2", *tiny_cli_args("data.val_length=5"),
               "--out", str(tmp_path / "ddp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Each rank reports on the shared stdout; read the reports wherever the two processes' writes landed.
    reports = sorted(re.findall(r"rank (\d+)/(\d+): val mIoU (\d+\.\d{6})", proc.stdout))
    assert [(rank, world) for rank, world, _ in reports] == [("0", "2"), ("1", "2")], proc.stdout
    assert reports[0][2] == reports[1][2]
    scores = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert scores["world_size"] == 2 and scores["pixels"] == 5 * 32 * 48  # every val image once
