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
    ITERATION_FILE,
    latest_checkpoint,
    load_model,
    model_meta,
    read_checkpoint,
    remove_partial_writes,
)
from annseg.engine.config import Config, ConfigError, TrainConfig, config_from_dict, dump_config, load_config
from annseg.engine.resume import RESUME_RULES, changed_settings, check_same_run, config_values, show_value
from annseg.engine.datamodule import SegmentationDataModule
from annseg.engine.module import SegmentationModule
from annseg.losses import ANNLoss
from annseg.models.weights import read_file

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
    A run folder is never mixed with another run: without ``--resume`` an ``--out`` that holds
    checkpoints is refused, and so is a checkpoint from elsewhere resumed into such an ``--out``.
    """
    folder = out_dir / "checkpoints"
    held = _run_checkpoints(folder)
    if resume is None:
        if held:
            raise ValueError(f"{out_dir} already holds a run ({held.relative_to(out_dir)}); pass --resume latest to "
                             "continue it or choose another --out")
        return None
    if resume != "latest":
        path = Path(resume)
        try:
            read_checkpoint(path)
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"--resume: {error}") from None
        if held and path.resolve().parent != folder.resolve():
            raise ValueError(f"--resume {path}: {out_dir} already holds another run ({held}); continue that run with "
                             f"--resume latest, or resume {path} into another --out")
        return path
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


def _run_checkpoints(folder: Path) -> Path | None:
    """A checkpoint of the run in ``folder`` (``last.ckpt`` first), or None when it holds none."""
    held = sorted(folder.glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", p.name)) if folder.is_dir() else []
    return held[0] if held else None


def _load_plain(path: Path, what: str) -> dict[str, Any]:
    """The checkpoint at ``path``, memory-mapped, through the one safe reader (plain data only: no
    code in it runs); its errors with ``what`` (the flag) in front. ``resolve_resume`` verified it whole."""
    try:
        return read_file(path, "checkpoint", mmap=True)
    except ValueError as error:
        raise type(error)(f"{what}: {error}") from None


def _saved_config(meta: dict[str, Any], path: Path, what: str) -> Config:
    try:
        return config_from_dict(meta["config"])
    except (ConfigError, KeyError, TypeError) as error:
        raise ValueError(f"{what}: checkpoint {path} holds a config this annseg cannot read: {error}") from None


def check_resumable(path: Path, config: Config, classes: list[str]) -> dict[str, Any]:
    """The checkpoint at ``path`` (memory-mapped), checked to continue this run.

    It must hold a training state (not weights alone), this run's must-match settings
    (``annseg.engine.resume``) and classes: a clear error, not a size-mismatch traceback from
    ``load_state_dict`` or a silent mix of two runs. Each changed may-change setting is logged.
    """
    checkpoint = _load_plain(path, "--resume")
    if "global_step" not in checkpoint:
        raise ValueError(f"--resume: {path} holds network weights only (no iteration, optimiser or lr schedule to "
                         f"continue); to start a new run from these weights, use --set train.init_from={path}")
    meta = checkpoint["annseg"]
    saved = _saved_config(meta, path, "--resume")
    check_same_run(saved, config, f"checkpoint {path}")
    if list(meta["classes"]) != list(classes):
        raise ConfigError(f"--resume: checkpoint {path} was trained for classes {meta['classes']}, but dataset "
                          f"{config.data.dataset!r} has {classes}; resume on the dataset it was trained on")
    step = int(checkpoint["global_step"])
    for key, old, new in changed_settings(saved, config):
        log.info("resume: %s %s -> %s from iteration %d", key, show_value(old), show_value(new), step)
    return checkpoint


def init_weights(module: SegmentationModule, path: Path, config: Config) -> None:
    """``train.init_from``: the network starts from the weights of an annseg checkpoint (training
    or weights-only, loaded safely by ``load_model``); it must be the same network, strictly."""
    try:
        network, meta = load_model(path)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"train.init_from: {error}") from None
    check_same_run(meta["config"], config, f"checkpoint {path}", "train.init_from",
                   keys=[key for key in RESUME_RULES if key.startswith("model.")],
                   advice="its weights fit only the network they were trained in")
    classes = module.class_names
    if len(meta["classes"]) != len(classes):
        raise ConfigError(f"train.init_from: checkpoint {path} has {len(meta['classes'])} classes {meta['classes']}, "
                          f"but dataset {config.data.dataset!r} has {len(classes)} {classes}; start from a checkpoint "
                          "trained for as many classes")
    if list(meta["classes"]) != classes:
        log.warning("train.init_from: checkpoint %s names its classes %s, this run %s; class i starts from "
                    "the weights of the checkpoint's class i", path, meta["classes"], classes)
    module.model.load_state_dict(network.state_dict(), strict=True)
    log.info("train.init_from: starting at iteration 0 from the network weights of %s", path)


class _ContinuingCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, appending to the file of the run being resumed (its own deletes it)."""

    def _check_log_dir_exists(self) -> None:
        pass


def _csv_path(out_dir: Path) -> Path:
    return out_dir / "logs" / ExperimentWriter.NAME_METRICS_FILE


def read_log(out_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of ``<out>/logs/metrics.csv`` (empty when there is none yet)."""
    path = _csv_path(out_dir)
    if not path.is_file():
        return [], []
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def csv_logger(out_dir: Path, keep_through: int | None) -> CSVLogger:
    """``<out>/logs/metrics.csv``; a resumed run keeps the rows up to step ``keep_through``, the
    iteration it resumes from (a row's step is an iteration: ``SegmentationModule``).

    Later rows are dropped (the run logs those iterations again); the file is replaced whole,
    so a kill leaves either the old history or the trimmed one.
    """
    logger = CSVLogger(out_dir, name="logs", version="")
    path = _csv_path(out_dir)
    if keep_through is None or rank_zero_only.rank != 0 or not path.is_file():
        return logger
    header, rows = read_log(out_dir)
    text = io.StringIO(newline="")
    table = csv.DictWriter(text, fieldnames=header)
    table.writeheader()
    table.writerows(row for row in rows if int(row["step"]) <= keep_through)
    write_text(path, text.getvalue())
    writer = _ContinuingCSVWriter(logger.log_dir)
    writer.metrics_keys = header
    logger._experiment = writer  # what CSVLogger.experiment would create, minus the deletion
    return logger


def missing_validation(rows: list[dict[str, str]], step: int, train: TrainConfig) -> int | None:
    """``step`` when the validation due right after the checkpoint at iteration ``step`` is missing
    from ``rows`` (metrics.csv): a kill during that validation loses its row, since the
    checkpoint is written first. None when none was due or its row is there.

    A validation is logged at the iteration it scores, during training (every val_every) and
    after it (the final one, when max_iters is no multiple of val_every).
    """
    if step < train.max_iters and step % train.val_every:
        return None
    if any(int(row["step"]) == step and row.get("val/mIoU") for row in rows):
        return None
    return step


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
    network = build_model(config.model, len(classes))
    network.checkpoint_backbone = train.checkpoint_backbone
    if train.compile:
        network.compile()  # in place: the state dict keeps its keys
    return SegmentationModule(
        network, loss, class_names=classes, lr=train.lr, momentum=train.momentum,
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
    ``train.checkpoint_every`` iterations, the newest ``train.keep_checkpoints`` kept, ``last.ckpt``
    and ``best.ckpt``: ``RunCheckpoints``), ``logs/`` (CSV and TensorBoard, with the config as
    hyper-parameters) and ``metrics.json``. ``progress``: refresh the progress bar every this many iterations
    (0 = no bar), or a Lightning progress bar to use (``engine.progress.LineProgressBar`` for logs).

    ``resume`` continues a run (``resolve_resume``): its must-match settings are checked, a
    changed schedule applies from the resumed iteration, a validation whose row a kill lost is
    repeated first, and a finished run is left as it is. ``train.init_from`` starts a new run
    from a checkpoint's network weights.
    """
    out_dir = Path(out_dir)
    for stray in remove_partial_writes(out_dir / "checkpoints"):
        log.info("removed %s, a checkpoint write that was interrupted", stray)
    ckpt_path = resolve_resume(resume, out_dir)
    if resume == "latest" and (out_dir / "config.yaml").is_file():  # the run in --out: its own settings
        check_same_run(load_config(out_dir / "config.yaml"), config, str(out_dir / "config.yaml"), "--resume latest")
    train = config.train
    L.seed_everything(train.seed, workers=True, verbose=False)
    datamodule = SegmentationDataModule(config)
    datamodule.setup("validate")  # the validation set names the classes; fit() reuses it
    module = build_module(config, datamodule.val_set)
    checkpoint = None if ckpt_path is None else check_resumable(ckpt_path, config, module.class_names)
    if train.init_from is not None and checkpoint is None:
        init_weights(module, Path(train.init_from), config)
    elif train.init_from is not None:
        log.info("train.init_from is not used: the run continues from %s", ckpt_path)
    step = None if checkpoint is None else int(checkpoint["global_step"])
    finished = step is not None and step >= train.max_iters
    pending = None if step is None else missing_validation(read_log(out_dir)[1], step, train)
    # a finished run keeps its final validation's row (logged at its last step)
    trainer = _trainer(config, out_dir, hardware, progress, keep_log_through=step)
    checkpoints = trainer.checkpoint_callback
    assert isinstance(checkpoints, RunCheckpoints)
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "config.yaml", dump_config(config))
        for logger in trainer.loggers:
            logger.log_hyperparams(hyperparameters(config))
    if pending is not None:
        assert checkpoint is not None and ckpt_path is not None
        log.info("resume: the validation after iteration %d is missing from %s (the run stopped during it); "
                 "validating again", pending, _csv_path(out_dir))
        checkpoints.load_best(checkpoint)  # the Trainer restores the weights only
        module.validated_iteration, checkpoints.source = pending, ckpt_path
        trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        module.validated_iteration = checkpoints.source = None
    if finished:
        assert step is not None
        log.info("the run in %s is already complete (iteration %d, train.max_iters %d); nothing left to train; "
                 "raise train.max_iters to train on", out_dir, step, train.max_iters)
        saved = None if module.val_scores is not None else _read_scores(out_dir / "metrics.json")
        if module.val_scores is None and saved is None:  # the row is logged; metrics.json was not written
            module.log_validation = False
            trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    else:
        saved = None
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SystemExit:  # Lightning turns Ctrl-C into sys.exit(1) after its own clean-up
            if trainer.interrupted:
                raise KeyboardInterrupt(f"the checkpoints in {out_dir / 'checkpoints'} are whole; continue with "
                                        "--resume latest") from None
            raise
        last = out_dir / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(last)
        step = trainer.global_step
        if module.val_scores is None or step % train.val_every:
            checkpoints.source = last  # a best.ckpt from this validation is a copy of it
            trainer.validate(module, datamodule=datamodule, verbose=False)
    scores = saved if saved is not None else {
        **(module.val_scores or {}), "iterations": step, "skipped_iterations": module.skipped_iterations}
    scores = {**scores, "rank": trainer.global_rank, "world_size": trainer.world_size}
    if trainer.is_global_zero and saved is None:
        write_json(out_dir / "metrics.json", scores)
    return scores


def _trainer(config: Config, out_dir: Path, hardware: Hardware, progress: int,
             keep_log_through: int | None) -> L.Trainer:
    """The Lightning Trainer of a run: one epoch of ``train.max_iters`` iterations, checkpoints
    every ``train.checkpoint_every`` (``RunCheckpoints``), CSV and TensorBoard logs (``csv_logger``)."""
    train = config.train
    distributed = hardware.num_nodes > 1 or (isinstance(hardware.devices, int) and hardware.devices > 1)
    on_gpu = hardware.accelerator in ("gpu", "cuda") or (hardware.accelerator == "auto" and torch.cuda.is_available())
    checkpoints = RunCheckpoints(out_dir / "checkpoints", train.checkpoint_every, train.keep_checkpoints)
    return L.Trainer(
        accelerator=hardware.accelerator, devices=hardware.devices, num_nodes=hardware.num_nodes,
        strategy="ddp" if distributed else "auto",
        sync_batchnorm=distributed and on_gpu,  # torch's SyncBatchNorm is CUDA-only; CPU ranks keep local BN
        precision=train.precision, max_steps=train.max_iters, max_epochs=-1,
        accumulate_grad_batches=train.accumulate, val_check_interval=train.val_every * train.accumulate,
        check_val_every_n_epoch=None, log_every_n_steps=train.log_every, num_sanity_val_steps=0,
        deterministic="warn" if train.deterministic else False, use_distributed_sampler=False,
        callbacks=[checkpoints, *_progress_bar(progress)],
        logger=[csv_logger(out_dir, keep_log_through),
                TensorBoardLogger(out_dir, name="logs", version="", default_hp_metric=False)],
        plugins=[AtomicCheckpointIO()], default_root_dir=out_dir, enable_model_summary=False,
        enable_progress_bar=bool(progress),
    )


def hyperparameters(config: Config) -> dict[str, Any]:
    """The config as the loggers' hyper-parameters (``logs/hparams.yaml``): ``section.key: value``."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    return {key: plain(value) for key, value in config_values(config).items()}


class RunCheckpoints(ModelCheckpoint):
    """The checkpoints of a run in ``folder``: ``iter_NNNNNN.ckpt`` every ``every`` iterations, of
    which the newest ``keep`` stay (0: none, -1: all), ``last.ckpt`` beside each, and ``best.ckpt``.

    Old ``iter_*`` files are removed by listing the folder after each write, not from Lightning's
    top-k bookkeeping, so files from before a resume, or left by a kill between a write and a
    removal, are pruned as well; the newest are always whole before an older one goes.

    ``best.ckpt`` is the whole state (network, optimiser, schedule) at the iteration whose
    validation had the highest mIoU so far, written when a validation improves on it
    (``validated``). The best score travels in every checkpoint (this callback's state), so a
    resumed run compares with the runs before it. ``source``: the checkpoint of the iteration
    being validated when the Trainer is not training (a validation after training or repeated
    on resume), which best.ckpt then copies.
    """

    BEST = "best.ckpt"

    def __init__(self, folder: Path, every: int, keep: int) -> None:
        super().__init__(dirpath=folder, filename="iter_{step:06d}", every_n_train_steps=every,
                         save_top_k=0 if keep == 0 else -1, save_last=True, auto_insert_metric_name=False,
                         enable_version_counter=False)  # a checkpoint is replaced, never saved as last-v1.ckpt
        self.keep = keep
        self.best_miou: float | None = None
        self.best_iteration: int | None = None
        self.source: Path | None = None

    @property
    def state_key(self) -> str:
        return "RunCheckpoints"  # the same whatever the settings: a resume may change them

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_mIoU": self.best_miou, "best_iteration": self.best_iteration}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._take_best(state_dict)

    def load_best(self, checkpoint: dict[str, Any]) -> None:
        """The best score recorded in a training checkpoint (for a validation outside ``fit``)."""
        self._take_best(checkpoint.get("callbacks", {}).get(self.state_key, {}))

    def _take_best(self, state: dict[str, Any]) -> None:
        score = state.get("best_mIoU")
        if score is not None and (self.best_miou is None or score > self.best_miou):
            self.best_miou, self.best_iteration = float(score), state.get("best_iteration")

    def validated(self, trainer: L.Trainer, iteration: int, miou: float) -> None:
        """Write ``best.ckpt`` when ``miou``, the validation of ``iteration``, beats the best so far."""
        better = math.isfinite(miou) and (self.best_miou is None or miou > self.best_miou)
        if not trainer.strategy.broadcast(better, src=0):  # every rank takes rank 0's decision
            return
        self.best_miou, self.best_iteration = float(miou), iteration
        path = Path(self.dirpath) / self.BEST
        if self.source is None:
            trainer.save_checkpoint(path)
        elif trainer.is_global_zero:
            content = read_checkpoint(self.source)
            content.setdefault("callbacks", {})[self.state_key] = self.state_dict()
            AtomicCheckpointIO().save_checkpoint(content, path)
        log.info("iteration %d: val/mIoU %.4f is the best so far; saved %s", iteration, miou, path)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if self.keep > 0 and trainer.is_global_zero:
            numbered = sorted((int(m.group(1)), p) for p in Path(self.dirpath).glob("iter_*.ckpt")
                              if (m := ITERATION_FILE.fullmatch(p.name)))
            for _, old in numbered[:-self.keep]:
                trainer.strategy.remove_checkpoint(old)


def _read_scores(path: Path) -> dict[str, Any] | None:
    """A finished run's ``metrics.json``, or None when it is missing or unreadable."""
    try:
        scores = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return scores if isinstance(scores, dict) else None


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
