"""SIGKILL a training run at random moments, inside steps, checkpoint writes and validations;
resume must end exactly where an uninterrupted run ends (deterministic mode, same machine)."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from annseg.engine.checkpoint import read_checkpoint
from tests.engine.tiny import tiny_cli_args

ROOT = Path(__file__).resolve().parents[2]
# Validations at 6 (right after the checkpoint at 6) and at the end, 10.
RUN = tiny_cli_args("train.max_iters=10", "train.checkpoint_every=3", "train.val_every=6")
SEED = int(os.environ.get("ANNSEG_KILL_SEED", "0"))  # other seeds pick other moments


def start(markers: Path, out: Path, step_pause: float | None = None) -> subprocess.Popen:
    for marker in markers.glob("*"):
        marker.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if step_pause is not None:
        env["KILLABLE_STEP_PAUSE"] = str(step_pause)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.engine.killable", str(markers), "train", *RUN, "--out", str(out),
         "--resume", "latest"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def kill_at(proc: subprocess.Popen, markers: Path, kind: str, count: int, delay: float) -> None:
    """SIGKILL once ``count`` markers of ``kind`` ("step", "saving", "validating") exist, after ``delay`` s."""
    deadline = time.monotonic() + 300
    while len(list(markers.glob(f"{kind}-*"))) < count:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {count} {kind} markers (seed {SEED}):\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {kind} marker {count} within 300 s")
        time.sleep(0.005)
    time.sleep(delay)
    proc.kill()  # SIGKILL: no handler, no clean-up
    proc.communicate()


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "logs" / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"]


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    reference = start(markers, tmp_path / "reference")
    _, stderr = reference.communicate()
    assert reference.returncode == 0, stderr[-3000:]

    out = tmp_path / "killed"
    rng = random.Random(SEED)
    # Checkpoints at iterations 3, 6, 9 (each written twice: iter_NNNNNN.ckpt, then last.ckpt).
    # Killed in a step before any checkpoint, then in the first checkpoint write (both restart
    # at 0), then in a step after iteration 3 (resumes from 3, well before the run's middle),
    # then in a later checkpoint write (resumes from 3 or 6): every seed resumes mid-run. Last,
    # inside the validation at 6, which follows the checkpoint at 6 (or, resumed from 6, inside
    # the validation the resumed run repeats because its row is missing): its row must appear once.
    kills = [("step", rng.randint(1, 3)), ("saving", 1), ("step", rng.randint(4, 6)), ("saving", rng.randint(1, 2)),
             ("validating", 1)]
    saw_partial_write = False
    for kind, count in kills:
        kill_at(start(markers, out), markers, kind, count, delay=rng.uniform(0, 0.02 if kind == "step" else 0.08))
        checkpoints = out / "checkpoints"
        for path in checkpoints.glob("*.ckpt"):
            read_checkpoint(path)  # never half-written: every visible checkpoint is whole
        saw_partial_write |= any(checkpoints.glob(".*.tmp-*"))
    assert saw_partial_write, "no kill landed inside a checkpoint write"

    final = start(markers, out)
    _, stderr = final.communicate()
    assert final.returncode == 0, stderr[-3000:]
    assert "resuming from" in stderr
    assert "the validation after iteration 6 is missing" in stderr  # the killed one, repeated
    assert not any((out / "checkpoints").glob(".*.tmp-*"))
    expected, got = weights(tmp_path / "reference"), weights(out)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"seed {SEED}: resumed weights differ in {different[:5]}"
    assert json.loads((out / "metrics.json").read_text()) == json.loads((tmp_path / "reference" / "metrics.json").read_text())
    logged, once = _rows(out), _rows(tmp_path / "reference")  # the CSV log, whole and without repeats
    assert [(r["step"], r["val/mIoU"]) for r in logged] == [(r["step"], r["val/mIoU"]) for r in once]
    assert [r["step"] for r in logged if r["val/mIoU"]] == ["6", "10"]  # each validation's row exactly once
    # the kept checkpoints and best.ckpt are those of the uninterrupted run
    assert sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) == sorted(
        p.name for p in (tmp_path / "reference" / "checkpoints").glob("*.ckpt"))
    best, reference_best = (read_checkpoint(run / "checkpoints" / "best.ckpt") for run in (out, tmp_path / "reference"))
    assert best["global_step"] == reference_best["global_step"]
    assert all(torch.equal(best["state_dict"][k], reference_best["state_dict"][k]) for k in best["state_dict"])


def test_ctrl_c_stops_with_a_line_saying_how_to_resume(tmp_path: Path) -> None:
    markers, out = tmp_path / "markers", tmp_path / "run"
    # A long pause after each step marker: on a loaded machine the run could otherwise finish
    # its last steps before this process, polling, gets to send the signal.
    proc = start(markers, out, step_pause=1.0)
    deadline = time.monotonic() + 300
    while not (markers / "step-4").exists():  # after the checkpoint at iteration 3
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"annseg: interrupted; the checkpoints in {out / 'checkpoints'} are whole; continue with --resume latest")
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] >= 3
