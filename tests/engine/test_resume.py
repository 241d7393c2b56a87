"""Resume semantics as a user meets them: ``annseg train ... --resume`` (annseg.cli.main in-process).

Which settings may change on resume and which must match (annseg.engine.resume), the
schedule taking effect from the resumed iteration, run folders never mixed, finished runs
left alone, weights-only checkpoints refused for --resume and accepted by train.init_from.
"""

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from annseg.cli import main
from annseg.engine import read_checkpoint
from annseg.engine.module import poly_factor
from annseg.engine.resume import MAY, MUST, RESUME_RULES, config_keys, rules_markdown
from tests.engine.tiny import tiny_checkpoint, tiny_cli_args

ROOT = Path(__file__).resolve().parents[2]
# Validations at 2 and 4, both during training (logged at steps 1 and 3): the final validation
# follows the checkpoint at 4.
BASE = ("train.max_iters=4", "train.checkpoint_every=2", "train.val_every=2")


def train(out: Path, *extra: str, resume: str | None = None) -> None:
    main(["train", *tiny_cli_args(*BASE, *extra), "--out", str(out), *(["--resume", resume] if resume else [])])


def rows(out: Path) -> list[dict[str, str]]:
    with (out / "logs" / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "run"
    train(out)
    return out


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run, for a test to resume."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def test_every_config_key_is_classified() -> None:
    assert set(config_keys()) == set(RESUME_RULES) and set(RESUME_RULES.values()) == {MUST, MAY}


def test_readme_lists_the_resume_rules() -> None:
    assert rules_markdown() in (ROOT / "README.md").read_text()


def test_changed_lr_and_longer_run_follow_the_schedule_from_the_resumed_iteration(
        run: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="annseg"):
        train(run, "train.lr=0.01", "train.max_iters=8", resume="latest")
    assert "resume: train.max_iters 4 -> 8 from iteration 4" in caplog.text
    assert "resume: train.lr 0.02 -> 0.01 from iteration 4" in caplog.text
    assert "resume: train.val_every" not in caplog.text  # only what changed
    logged = [(int(r["step"]), float(r["train/lr"])) for r in rows(run) if r["train/lr"]]
    # A row's step is the iteration it completes, which used the lr after step - 1 iterations.
    # Until 4 the old settings.
    assert [s for s, _ in logged] == [2, 4, 6, 8]
    for step, lr in logged:
        done = step - 1
        expected = 0.02 * poly_factor(done, 4, 0.9) if done < 4 else 0.01 * poly_factor(done, 8, 0.9)
        assert lr == pytest.approx(expected, rel=1e-6) and lr > 0, step
    at_6 = read_checkpoint(run / "checkpoints" / "iter_000006.ckpt")  # the lr of iteration 7
    assert at_6["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.01 * poly_factor(6, 8, 0.9))
    checkpoint = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 8
    assert checkpoint["lr_schedulers"][0]["max_iters"] == 8 and checkpoint["lr_schedulers"][0]["base_lrs"] == [0.01]
    assert [r["step"] for r in rows(run) if r["val/mIoU"]] == ["2", "4", "6", "8"]  # each once


def test_resuming_a_finished_run_changes_nothing(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    log, scores = (run / "logs" / "metrics.csv").read_text(), (run / "metrics.json").read_text()
    with caplog.at_level(logging.INFO, logger="annseg"):
        train(run, resume="latest")
    assert "is already complete (iteration 4, train.max_iters 4)" in caplog.text
    assert (run / "logs" / "metrics.csv").read_text() == log and (run / "metrics.json").read_text() == scores


def test_a_validation_killed_after_the_last_checkpoint_is_repeated_once(
        run: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Killed during the final validation: last.ckpt is the one written just before it (as
    iter_000004.ckpt), the CSV lacks the validation's row and metrics.json is not there."""
    complete, scores = rows(run), json.loads((run / "metrics.json").read_text())
    assert complete[-1]["step"] == "4" and complete[-1]["val/mIoU"]
    shutil.copy(run / "checkpoints" / "iter_000004.ckpt", run / "checkpoints" / "last.ckpt")
    path = run / "logs" / "metrics.csv"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    (run / "metrics.json").unlink()
    with caplog.at_level(logging.INFO, logger="annseg"):
        train(run, resume="latest")
    assert "the validation after iteration 4 is missing" in caplog.text
    assert rows(run) == complete and json.loads((run / "metrics.json").read_text()) == scores


@pytest.mark.parametrize(("setting", "how", "message"), [
    ("train.seed=1", "latest", r"--resume latest: train.seed is 0 in .*config.yaml but 1 in this run's config"),
    ("data.crop_size=[32, 32]", "path", r"--resume: data.crop_size is \[32, 48\] in checkpoint .*iter_000002.ckpt "
                                        r"but \[32, 32\] in this run's config, and a resumed run must keep it; set it"),
    ("train.ohem=true", "path", r"--resume: train.ohem is false in checkpoint .* but true"),
])
def test_a_must_match_change_is_refused_naming_the_key(run: Path, tmp_path: Path, setting: str, how: str,
                                                       message: str) -> None:
    before = sorted(p.name for p in (run / "checkpoints").iterdir()), (run / "config.yaml").read_text()
    named = str(run / "checkpoints" / "iter_000002.ckpt")
    out, resume = (run, "latest") if how == "latest" else (tmp_path / "new", named)
    with pytest.raises(SystemExit, match=f"^annseg: error: {message}"):
        train(out, setting, resume=resume)
    assert (sorted(p.name for p in (run / "checkpoints").iterdir()), (run / "config.yaml").read_text()) == before


def test_a_run_folder_is_never_mixed_with_another_run(finished: Path, run: Path) -> None:
    with pytest.raises(SystemExit, match=rf"^annseg: error: {run} already holds a run \(checkpoints/last.ckpt\); "
                                         "pass --resume latest to continue it or choose another --out$"):
        train(run)
    elsewhere = finished / "checkpoints" / "iter_000002.ckpt"
    with pytest.raises(SystemExit, match=rf"^annseg: error: --resume {elsewhere}: {run} already holds another run "
                                         rf"\({run}/checkpoints/last.ckpt\)"):
        train(run, resume=str(elsewhere))


def test_resume_refuses_a_weights_only_checkpoint(tmp_path: Path) -> None:
    tiny_checkpoint(tmp_path / "weights.ckpt", classes=4)
    with pytest.raises(SystemExit, match=r"^annseg: error: --resume: .*weights.ckpt holds network weights only .* "
                                         r"use --set train.init_from=.*weights.ckpt$"):
        train(tmp_path / "run", resume=str(tmp_path / "weights.ckpt"))


def _parameters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("model.") and "running_" not in k and "num_batches" not in k}


@pytest.mark.parametrize("kind", ["weights-only", "training"])
def test_init_from_starts_at_iteration_0_from_the_checkpoint_weights(
        finished: Path, tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    source = tmp_path / "weights.ckpt"
    if kind == "weights-only":
        tiny_checkpoint(source, classes=4)
    else:
        source = finished / "checkpoints" / "last.ckpt"
    with caplog.at_level(logging.INFO, logger="annseg"):  # lr 1e-6: the weights stay where they started
        train(tmp_path / "run", f"train.init_from={source}", "train.lr=0.000001", "train.max_iters=1",
              "train.checkpoint_every=1", "train.val_every=1")
    end = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert f"starting at iteration 0 from the network weights of {source}" in caplog.text
    start = _parameters(read_checkpoint(source)["state_dict"])
    assert end["global_step"] == 1 and start.keys() == _parameters(end["state_dict"]).keys()
    far = [k for k in start if not torch.allclose(start[k], end["state_dict"][k], atol=1e-4)]
    assert not far, far[:5]


@pytest.mark.parametrize(("classes", "setting", "message"), [
    (4, "model.variant=fcn", r"train.init_from: model.variant is ann in checkpoint .*weights.ckpt but fcn in this "
                             r"run's config, and its weights fit only the network they were trained in"),
    (3, "train.seed=0", r"train.init_from: checkpoint .*weights.ckpt has 3 classes .* but dataset 'synthetic' has 4"),
])
def test_init_from_refuses_weights_of_another_network(tmp_path: Path, classes: int, setting: str, message: str) -> None:
    tiny_checkpoint(tmp_path / "weights.ckpt", classes=classes)
    with pytest.raises(SystemExit, match=f"^annseg: error: {message}"):
        train(tmp_path / "run", f"train.init_from={tmp_path / 'weights.ckpt'}", setting)
