"""One training run: config -> Lightning Trainer -> checkpoints, logs and final validation."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import Dataset

from annseg.engine.builders import build_model
from annseg.engine.checkpoint import (
    AtomicCheckpointIO,
    atomic_file,
    latest_checkpoint,
    model_meta,
    read_checkpoint,
    remove_partial_writes,
)
from annseg.engine.config import Config, ConfigError, dump_config
from annseg.engine.datamodule import SegmentationDataModule
from annseg.engine.module import SegmentationModule
from annseg.losses import ANNLoss

log = logging.getLogger(__name__)


@dataclass
class Hardware:
    """Where the run executes; Lightning reads torchrun / SLURM variables to join the job."""

    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1


def resolve_resume(resume: str | None, out_dir: Path) -> Path | None:
    """``--resume``: a checkpoint path, or ``latest``: the newest good one in ``<out>/checkpoints``.

    A named checkpoint that is truncated or corrupt is an error naming it. ``latest`` skips
    such files (logging why) and falls back to the previous good checkpoint; with no
    checkpoint there yet it starts at iteration 0, so a re-queued job can always pass it.
    """
    if resume is None:
        return None
    if resume != "latest":
        path = Path(resume)
        try:
            read_checkpoint(path)
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"--resume: {error}") from None
        return path
    folder = out_dir / "checkpoints"
    path, skipped = latest_checkpoint(folder)
    for reason in skipped:
        log.warning("--resume latest: skipping %s", reason)
    if path is None and skipped:
        raise ValueError(f"--resume latest: no readable checkpoint in {folder} ({len(skipped)} damaged); "
                         "name a good one with --resume PATH, or start afresh in another --out")
    if path is None:
        log.warning("--resume latest: no checkpoint in %s yet; starting at iteration 0", folder)
    else:
        log.info("resuming from %s", path)
    return path


def check_resumable(path: Path, config: Config, classes: list[str]) -> int:
    """The checkpoint at ``path`` must hold this run's network and classes (a clear error, not a
    size-mismatch traceback from ``load_state_dict``); returns the iteration it was saved at."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    meta = checkpoint["annseg"]
    saved = meta["config"]["model"]
    if saved != _plain_model(config):
        raise ConfigError(f"--resume: checkpoint {path} holds model {saved}, but this run's config builds "
                          f"{_plain_model(config)}; resume with the checkpoint's model settings")
    if len(meta["classes"]) != len(classes):
        raise ConfigError(f"--resume: checkpoint {path} was trained for {len(meta['classes'])} classes, but dataset "
                          f"{config.data.dataset!r} has {len(classes)}; resume on the dataset it was trained on")
    return int(checkpoint["global_step"])


class _ContinuingCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, appending to the file of the run being resumed (its own deletes it)."""

    def _check_log_dir_exists(self) -> None:
        pass


def csv_logger(out_dir: Path, resume_step: int | None) -> CSVLogger:
    """``<out>/logs/metrics.csv``; a resumed run keeps the rows logged before its checkpoint.

    Rows from after the checkpoint are dropped (the run logs those iterations again); the
    file is replaced whole, so a kill leaves either the old history or the trimmed one.
    """
    logger = CSVLogger(out_dir, name="logs", version="")
    path = Path(logger.log_dir) / ExperimentWriter.NAME_METRICS_FILE
    if resume_step is None or rank_zero_only.rank != 0 or not path.is_file():
        return logger
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        rows = [row for row in reader if int(row["step"]) < resume_step]
        header = list(reader.fieldnames or [])
    text = io.StringIO(newline="")
    table = csv.DictWriter(text, fieldnames=header)
    table.writeheader()
    table.writerows(rows)
    write_text(path, text.getvalue())
    writer = _ContinuingCSVWriter(logger.log_dir)
    writer.metrics_keys = header
    logger._experiment = writer  # what CSVLogger.experiment would create, minus the deletion
    return logger


def _plain_model(config: Config) -> dict[str, Any]:
    return config.to_dict()["model"]


def build_module(config: Config, dataset: Dataset) -> SegmentationModule:
    """The network, loss and optimiser settings of ``config``, with the metadata to rebuild them.

    ``dataset`` gives the class names and palette (the run's validation set).
    """
    classes, palette = list(dataset.classes), [list(c) for c in dataset.palette]  # type: ignore[attr-defined]
    train = config.train
    if train.class_weights is not None and len(train.class_weights) != len(classes):
        raise ConfigError(f"train.class_weights has {len(train.class_weights)} values for {len(classes)} classes")
    loss = ANNLoss(train.aux_weight, train.ohem_threshold, train.ohem_min_kept,
                   class_weights=train.class_weights, ohem=train.ohem)
    meta = model_meta(config, classes, palette)
    return SegmentationModule(
        build_model(config.model, len(classes)), loss, class_names=classes, lr=train.lr, momentum=train.momentum,
        weight_decay=train.weight_decay, max_iters=train.max_iters, power=train.power, meta=meta,
        skip_nonfinite=train.skip_nonfinite,
    )


def fit(
    config: Config,
    out_dir: str | Path,
    *,
    resume: str | None = None,
    hardware: Hardware = Hardware(),
    progress: int | ProgressBar = 1,
) -> dict[str, Any]:
    """Train ``config`` into ``out_dir``; returns the final validation scores (every rank).

    ``out_dir`` receives ``config.yaml``, ``checkpoints/`` (``iter_NNNNNN.ckpt`` every
    ``train.checkpoint_every`` iterations and ``last.ckpt``), ``logs/`` (CSV and TensorBoard)
    and ``metrics.json``. ``progress``: refresh the progress bar every this many iterations
    (0 = no bar), or a Lightning progress bar to use (``engine.progress.LineProgressBar`` for logs).
    """
    out_dir = Path(out_dir)
    for stray in remove_partial_writes(out_dir / "checkpoints"):
        log.info("removed %s, a checkpoint write that was interrupted", stray)
    ckpt_path = resolve_resume(resume, out_dir)
    train = config.train
    L.seed_everything(train.seed, workers=True, verbose=False)
    datamodule = SegmentationDataModule(config)
    datamodule.setup("validate")  # the validation set names the classes; fit() reuses it
    module = build_module(config, datamodule.val_set)
    resume_step = None if ckpt_path is None else check_resumable(ckpt_path, config, module.class_names)
    distributed = hardware.num_nodes > 1 or (isinstance(hardware.devices, int) and hardware.devices > 1)
    on_gpu = hardware.accelerator in ("gpu", "cuda") or (hardware.accelerator == "auto" and torch.cuda.is_available())
    checkpoints = ModelCheckpoint(
        dirpath=out_dir / "checkpoints", filename="iter_{step:06d}", every_n_train_steps=train.checkpoint_every,
        save_top_k=-1, save_last=True, auto_insert_metric_name=False,
    )
    trainer = L.Trainer(
        accelerator=hardware.accelerator, devices=hardware.devices, num_nodes=hardware.num_nodes,
        strategy="ddp" if distributed else "auto",
        sync_batchnorm=distributed and on_gpu,  # torch's SyncBatchNorm is CUDA-only; CPU ranks keep local BN
        precision=train.precision, max_steps=train.max_iters, max_epochs=-1,
        accumulate_grad_batches=train.accumulate, val_check_interval=train.val_every * train.accumulate,
        check_val_every_n_epoch=None, log_every_n_steps=train.log_every, num_sanity_val_steps=0,
        deterministic="warn" if train.deterministic else False, use_distributed_sampler=False,
        callbacks=[checkpoints, *_progress_bar(progress)],
        logger=[csv_logger(out_dir, resume_step), TensorBoardLogger(out_dir, name="logs", version="")],
        plugins=[AtomicCheckpointIO()], default_root_dir=out_dir, enable_model_summary=False,
        enable_progress_bar=bool(progress),
    )
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "config.yaml", dump_config(config))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SystemExit:  # Lightning turns Ctrl-C into sys.exit(1) after its own clean-up
        if trainer.interrupted:
            raise KeyboardInterrupt(f"the checkpoints in {out_dir / 'checkpoints'} are whole; continue with "
                                    "--resume latest") from None
        raise
    trainer.save_checkpoint(out_dir / "checkpoints" / "last.ckpt")
    if module.val_scores is None or trainer.global_step % train.val_every:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    scores = module.val_scores or {}
    scores = {**scores, "iterations": trainer.global_step, "skipped_iterations": module.skipped_iterations,
              "rank": trainer.global_rank, "world_size": trainer.world_size}
    if trainer.is_global_zero:
        write_json(out_dir / "metrics.json", scores)
    return scores


def _progress_bar(progress: int | ProgressBar) -> list[ProgressBar]:
    if isinstance(progress, ProgressBar):
        return [progress]
    return [TQDMProgressBar(refresh_rate=progress)] if progress else []


def write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) at ``path`` through ``atomic_file``: a kill leaves the old file or the new."""
    with atomic_file(path) as file:
        file.write(text.encode())


def write_json(path: Path, data: dict) -> None:
    """``data`` as JSON at ``path``, written atomically (``write_text``): every JSON file annseg writes.

    JSON has no NaN or infinity (Python's ``json`` would write invalid JSON), so a non-finite
    float -- a score with nothing to count -- is written as null.
    """

    def finite(value: Any) -> Any:
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    write_text(path, json.dumps(finite(data), indent=2, allow_nan=False) + "\n")
