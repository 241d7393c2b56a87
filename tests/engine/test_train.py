import csv
import shutil
from pathlib import Path

import pytest
import torch

from annseg.engine import fit, load_config, load_model, read_checkpoint
from annseg.engine.datamodule import IterationDataset, IterationSampler
from annseg.engine.module import poly_factor
from annseg.engine.train import hyperparameters, read_log
from annseg.data import Synthetic
from tests.engine.tiny import TINY


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_training_runs_and_resume_equals_uninterrupted(tmp_path: Path) -> None:
    config = load_config(None, [*TINY, "train.max_iters=6", "train.val_every=3"])
    scores = fit(config, tmp_path / "full", progress=0)
    full = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in full.iterdir()) == [
        "best.ckpt", "iter_000002.ckpt", "iter_000004.ckpt", "iter_000006.ckpt", "last.ckpt"]
    assert scores["iterations"] == 6 and 0.0 <= scores["mIoU"] <= 1.0
    assert (tmp_path / "full" / "logs" / "metrics.csv").is_file()
    assert any((tmp_path / "full" / "logs").glob("events.out.tfevents*"))

    # A run stopped after iteration 2 (its checkpoint is the same file; its logs went on to the
    # end), resumed in a fresh Trainer. Resuming in the first half of the run matters: Lightning
    # restores the batch index, so a sampler that reported only the remaining length ended the
    # epoch early and replayed batches.
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "iter_000002.ckpt", tmp_path / "cut" / "checkpoints" / "last.ckpt")
    shutil.copytree(tmp_path / "full" / "logs", tmp_path / "cut" / "logs")
    fit(config, tmp_path / "cut", resume="latest", progress=0)
    # the copied checkpoint names another folder: last.ckpt is still replaced, not versioned
    assert _iteration_files(tmp_path / "cut" / "checkpoints") == [
        "best.ckpt", "iter_000004.ckpt", "iter_000006.ckpt", "last.ckpt"]
    resumed, expected = _weights(tmp_path / "cut" / "checkpoints" / "last.ckpt"), _weights(full / "last.ckpt")
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key
    # and it really trained on: the weights moved between iteration 2 and 6
    assert any(not torch.equal(_weights(full / "iter_000002.ckpt")[k], expected[k]) for k in expected)
    checkpoint = read_checkpoint(full / "last.ckpt")
    assert checkpoint["global_step"] == 6 and checkpoint["lr_schedulers"][0]["last_epoch"] == 6

    # The CSV log keeps the rows from before the checkpoint and logs the rest once, as one run.
    rows, uninterrupted = _csv(tmp_path / "cut" / "logs" / "metrics.csv"), _csv(tmp_path / "full" / "logs" / "metrics.csv")
    assert [r["step"] for r in rows] == [r["step"] for r in uninterrupted]
    assert rows[0] == uninterrupted[0] and int(rows[0]["step"]) <= 2
    assert [r["val/mIoU"] for r in rows] == [r["val/mIoU"] for r in uninterrupted]

    model, meta = load_model(full / "last.ckpt")
    assert meta["classes"] == list(Synthetic.classes) and meta["config"] == config
    assert not model.training


def _iteration_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.ckpt"))


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run checkpointed every iteration, validated every 2, stopped at 4 and resumed to 7."""
    out = tmp_path_factory.mktemp("pruned")
    settings = [*TINY, "train.checkpoint_every=1", "train.val_every=2", "train.log_every=2"]
    fit(load_config(None, [*settings, "train.max_iters=4"]), out, progress=0)
    assert _iteration_files(out / "checkpoints") == [
        "best.ckpt", "iter_000002.ckpt", "iter_000003.ckpt", "iter_000004.ckpt", "last.ckpt"]
    fit(load_config(None, [*settings, "train.max_iters=7"]), out, resume="latest", progress=0)
    return out


def test_keep_checkpoints_keeps_the_newest_three_across_a_resume(pruned_run: Path) -> None:
    # the files from before the resume (iterations 2 to 4) are pruned too
    assert _iteration_files(pruned_run / "checkpoints") == [
        "best.ckpt", "iter_000005.ckpt", "iter_000006.ckpt", "iter_000007.ckpt", "last.ckpt"]
    assert read_checkpoint(pruned_run / "checkpoints" / "last.ckpt")["global_step"] == 7


def test_best_checkpoint_is_the_best_validation(pruned_run: Path) -> None:
    validations = [(int(r["step"]), float(r["val/mIoU"])) for r in _csv(pruned_run / "logs" / "metrics.csv")
                   if r["val/mIoU"]]
    assert [step for step, _ in validations] == [2, 4, 6, 7]  # 7: the final validation after training
    best = max(score for _, score in validations)
    best_step = next(step for step, score in validations if score == best)  # the first to reach it
    checkpoint = read_checkpoint(pruned_run / "checkpoints" / "best.ckpt")
    assert checkpoint["global_step"] == best_step
    assert checkpoint["callbacks"]["RunCheckpoints"]["best_mIoU"] == pytest.approx(best, abs=1e-6)
    model, _ = load_model(pruned_run / "checkpoints" / "best.ckpt")  # a whole, loadable checkpoint
    assert not model.training


@pytest.mark.parametrize("keep, expected", [(0, []), (-1, [f"iter_00000{i}.ckpt" for i in range(1, 5)])])
def test_keep_checkpoints_none_or_all(tmp_path: Path, keep: int, expected: list[str]) -> None:
    config = load_config(None, [*TINY, "train.checkpoint_every=1", f"train.keep_checkpoints={keep}"])
    fit(config, tmp_path, progress=0)
    assert _iteration_files(tmp_path / "checkpoints") == sorted(["best.ckpt", "last.ckpt", *expected])


def test_log_steps_are_checkpoint_iterations(pruned_run: Path) -> None:
    header, rows = read_log(pruned_run)
    assert "epoch" not in header
    assert [r["step"] for r in rows if r["train/loss"]] == ["2", "4", "6"]  # log_every=2: iterations 2, 4, 6
    classes = list(Synthetic.classes)
    assert sorted(f"val/IoU/{name}" for name in classes) == sorted(k for k in header if k.startswith("val/IoU/"))
    for row in rows:
        if row["val/mIoU"]:
            ious = [float(row[f"val/IoU/{name}"]) for name in classes]
            present = [iou for iou in ious if iou == iou]  # NaN: a class in neither target nor prediction
            assert float(row["val/mIoU"]) == pytest.approx(sum(present) / len(present), abs=1e-6)


def test_hparams_yaml_holds_the_config(pruned_run: Path) -> None:
    import yaml

    hparams = yaml.safe_load((pruned_run / "logs" / "hparams.yaml").read_text())
    config = load_config(pruned_run / "config.yaml")
    assert hparams["train.max_iters"] == 7 and hparams["train.keep_checkpoints"] == 3
    assert hparams == hyperparameters(config)
    assert {key.split(".")[0] for key in hparams} == set(config.to_dict())


def test_resume_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--resume: checkpoint .*nowhere.ckpt does not exist"):
        fit(load_config(None, TINY), tmp_path, resume=str(tmp_path / "nowhere.ckpt"), progress=0)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.ckpt is truncated or not a torch checkpoint"):
        load_model(bad)


def test_data_order_is_a_function_of_the_position() -> None:
    dataset = IterationDataset(Synthetic("train", size=(32, 48), length=5), seed=3)
    ranks = [list(IterationSampler(2, 4, batch_size=3, rank=r, world_size=2)) for r in range(2)]
    assert ranks == [[12, 13, 14, 18, 19, 20], [15, 16, 17, 21, 22, 23]]  # disjoint, contiguous per micro-batch
    assert len(IterationSampler(2, 4, batch_size=3)) == 12  # the whole run's length (see its docstring)
    first, again = dataset[7], dataset[7]
    assert first["name"] == again["name"] and torch.equal(first["image"], again["image"])
    epoch = [dataset[p]["name"] for p in range(5)]
    assert sorted(epoch) == sorted(f"train_{i:05d}" for i in range(5))  # each item once per epoch


def test_poly_schedule() -> None:
    assert poly_factor(0, 100, 0.9) == 1.0 and poly_factor(100, 100, 0.9) == 0.0 and poly_factor(200, 100, 0.9) == 0.0
    assert abs(poly_factor(50, 100, 0.9) - 0.5**0.9) < 1e-12


def test_bf16_autocast_with_gradient_accumulation(tmp_path: Path) -> None:
    config = load_config(None, [*TINY, "train.precision=bf16-mixed", "train.accumulate=2", "train.max_iters=2",
                                "train.checkpoint_every=2", "train.val_every=2"])
    scores = fit(config, tmp_path, progress=0)
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert scores["iterations"] == 2 and checkpoint["global_step"] == 2  # 4 micro-batches, 2 optimizer steps
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_same_seed_gives_identical_weights_and_metrics(tmp_path: Path) -> None:
    """README: on one machine, deterministic mode and the same seed reproduce a run bit for bit."""
    config = load_config(None, TINY)
    first, second = (fit(config, tmp_path / name, progress=0) for name in ("a", "b"))
    assert first == second
    a, b = (_weights(tmp_path / name / "checkpoints" / "last.ckpt") for name in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = fit(load_config(None, [*TINY, "train.seed=1"]), tmp_path / "c", progress=0)
    assert _weights(tmp_path / "c" / "checkpoints" / "last.ckpt")["model.classifier.weight"].ne(
        a["model.classifier.weight"]).any() and other["iterations"] == first["iterations"]


def test_write_json_writes_non_finite_floats_as_null(tmp_path: Path) -> None:
    import json

    from annseg.engine.train import write_json

    write_json(tmp_path / "scores.json", {"mIoU": float("nan"), "IoU": {"a": 0.5, "b": float("inf")},
                                          "curve": (1.0, float("-inf")), "pixels": 0})

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in JSON")

    assert json.loads((tmp_path / "scores.json").read_text(), parse_constant=refuse) == {
        "mIoU": None, "IoU": {"a": 0.5, "b": None}, "curve": [1.0, None], "pixels": 0}
