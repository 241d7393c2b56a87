"""The LightningModule: a built network trained with SGD + poly lr on the ANN loss."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from annseg.engine.metrics import SegmentationMetrics
from annseg.losses import ANNLoss

log = logging.getLogger(__name__)


def poly_factor(step: int, max_iters: int, power: float) -> float:
    """Poly schedule: lr = base * (1 - step / max_iters) ** power, 0 from max_iters on."""
    return (1.0 - min(step, max_iters) / max_iters) ** power


class PolyLR(torch.optim.lr_scheduler.LambdaLR):
    """Poly learning rate per iteration (docs/method.md, "Training"); a class so that it pickles."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, power: float = 0.9) -> None:
        self.max_iters, self.power = max_iters, power
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        return poly_factor(step, self.max_iters, self.power)


def _numpy_state_to_tensors(state: tuple) -> tuple:
    """numpy's RNG state with its key array as a tensor: checkpoints stay loadable with weights_only."""
    name, keys, position, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)


def _numpy_state_from_tensors(state: tuple) -> tuple:
    name, keys, position, has_gauss, cached = state
    return name, keys.numpy().astype(np.uint32), position, has_gauss, cached


class NonFiniteError(FloatingPointError):
    """Training met a NaN/inf loss, gradient or weight; the message names the iteration."""


def _describe(loss: Tensor | None, grad_norm: Tensor | None) -> str:
    """What was not finite, for the warning or error of a bad step (a failure path: syncs freely)."""
    value = float("nan") if loss is None else loss.item()
    if not math.isfinite(value):
        return f"the loss is {value}"
    norm = float("nan") if grad_norm is None else grad_norm.item()
    return f"the loss is {value:.4g} but the gradient norm is {norm}"


class SegmentationModule(L.LightningModule):
    """Trains and validates a given segmentation network (it does not build one).

    Each logged row's ``step`` (CSV and TensorBoard) is an iteration number as checkpoints count
    them: the row of a training step is the iteration it completes, a validation's the
    iteration whose weights it scores (``iter_000006.ckpt`` and the validation after it are
    both step 6). Logging ``step`` also keeps Lightning from adding its ``epoch`` column.

    The network returns (main, aux) logits in training mode and main logits in eval mode.
    ``meta`` (config, class names, palette, normalisation) is stored in every checkpoint so
    that ``annseg eval`` / ``predict`` rebuild the model from the checkpoint alone. The
    RNG states travel with the checkpoint too, so a resumed run draws the same dropout masks
    as an uninterrupted one.

    A NaN/inf loss or gradient is caught before the optimiser step: training stops with a
    ``NonFiniteError`` naming the iteration, or, up to ``skip_nonfinite`` times, the step is
    skipped (weights, momentum and BatchNorm statistics stay as they were). A checkpoint is
    never written from non-finite weights.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: ANNLoss,
        *,
        class_names: Sequence[str],
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        max_iters: int = 60_000,
        power: float = 0.9,
        meta: dict[str, Any] | None = None,
        skip_nonfinite: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.class_names = list(class_names)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.max_iters, self.power = max_iters, power
        self.meta = meta or {}
        self.val_metrics = SegmentationMetrics(len(self.class_names), loss.ignore_index)
        self.val_scores: dict | None = None
        self.log_validation = True  # False: scores only, for a validation whose row is already logged
        # The iteration a validation is logged at, when it is not global_step (a validation repeated
        # on resume, whose Trainer restored the weights only); see the class docstring.
        self.validated_iteration: int | None = None
        self._restored_rng: dict | None = None
        self._count_logged_steps = False  # set on restore: see on_train_batch_start
        self.skip_nonfinite = skip_nonfinite
        self.skipped_iterations: list[int] = []  # saved in checkpoints: the budget survives a resume
        self._loss_finite: Tensor | None = None  # over the micro-batches of this optimiser step
        self._last_loss: Tensor | None = None
        self._buffers_before: list[Tensor] | None = None  # BatchNorm statistics, to undo a skipped step

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self.model(images)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if self.skip_nonfinite and self._buffers_before is None:
            self._buffers_before = [b.detach().clone() for b in self.model.buffers()]
        loss = self.loss(self.model(batch["image"]), batch["mask"])
        finite = torch.isfinite(loss.detach())  # stays on the device: checked once per optimiser step
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self._last_loss = loss.detach()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=True)
        self.log("step", float(self.global_step + 1))  # the iteration this step completes: see the class docstring
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop, or skip this step, when its loss or gradients are not finite."""
        finite, self._loss_finite = self._loss_finite, None
        buffers, self._buffers_before = self._buffers_before, None
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = None
        if grads and self.trainer.precision != "16-mixed":  # fp16's GradScaler skips inf steps itself
            grad_norm = torch.nn.utils.get_total_norm(grads)
            finite = torch.isfinite(grad_norm) if finite is None else finite & torch.isfinite(grad_norm)
        ok = True if finite is None else bool(finite)
        if self.trainer.world_size > 1:  # every rank takes the same decision
            ok = self.trainer.strategy.reduce_boolean_decision(ok, all=True)
        if ok:
            return
        iteration = self.global_step + 1
        what = _describe(self._last_loss, grad_norm)
        self.skipped_iterations.append(iteration)
        if len(self.skipped_iterations) > self.skip_nonfinite:
            done = f" after skipping iterations {self.skipped_iterations[:-1]}" if self.skip_nonfinite else ""
            raise NonFiniteError(
                f"training stopped at iteration {iteration}: {what}{done}. No checkpoint was written from it; "
                "lower train.lr (or check the data), then continue from the last good checkpoint with "
                "--resume latest, or allow skipped iterations with --set train.skip_nonfinite=N"
            )
        if self.trainer.is_global_zero:
            log.warning("iteration %d: %s; step skipped (%d of at most %d)", iteration, what,
                        len(self.skipped_iterations), self.skip_nonfinite)
        for param in self.model.parameters():  # SGD leaves a parameter without gradient untouched
            param.grad = None
        if buffers is not None:
            with torch.no_grad():
                for now, before in zip(self.model.buffers(), buffers):
                    now.copy_(before)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_metrics.update(self.model(batch["image"]), batch["mask"])

    def on_validation_epoch_end(self) -> None:
        self.val_scores = self.val_metrics.compute_scores(self.class_names)
        self.val_metrics.reset()
        if not self.log_validation:
            return
        iteration = self.global_step if self.validated_iteration is None else self.validated_iteration
        saver = getattr(self.trainer.checkpoint_callback, "validated", None)
        if saver is not None:  # best.ckpt is written before the row: a kill in between repeats the validation
            saver(self.trainer, iteration, self.val_scores["mIoU"])
        self.log("val/mIoU", self.val_scores["mIoU"], prog_bar=True, sync_dist=False)
        self.log("val/aAcc", self.val_scores["aAcc"], sync_dist=False)
        for name, iou in self.val_scores["IoU"].items():
            self.log(f"val/IoU/{name}", iou, sync_dist=False)
        self.log("step", float(iteration), sync_dist=False)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(
            self.model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        scheduler = PolyLR(optimizer, self.max_iters, self.power)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for name, tensor in self.model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteError(
                    f"refusing to write a checkpoint at iteration {self.global_step}: model weight {name} is not "
                    "finite. The previous checkpoint is kept; lower train.lr and resume with --resume latest"
                )
        checkpoint["annseg"] = self.meta
        checkpoint["skipped_iterations"] = list(self.skipped_iterations)
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state_to_tensors(np.random.get_state()),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Applied when training starts: Lightning's own set-up after loading must not shift it.
        self._restored_rng = checkpoint.get("rng")
        self.skipped_iterations = list(checkpoint.get("skipped_iterations", []))
        self._count_logged_steps = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self._count_logged_steps:
            return
        # Lightning adds one to its count of optimiser steps (which decides the iterations
        # train.log_every logs) when it restores a checkpoint, since one written during training
        # predates the count's update; one written after training (last.ckpt of a finished run,
        # resumed with a longer max_iters) is counted already, and it would log other iterations. At the
        # first batch the count is the number of steps taken, whichever checkpoint it was.
        self._count_logged_steps = False
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.global_step

    def on_train_start(self) -> None:
        self._apply_schedule()
        if self._restored_rng is None:
            return
        state, self._restored_rng = self._restored_rng, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
        random.setstate(state["python"])

    def _apply_schedule(self) -> None:
        """This run's lr, max_iters, power, momentum and weight decay, from the current iteration on.

        A restored optimiser and scheduler carry the settings of the run that saved them; a
        resumed run with changed settings uses its own: lr = lr * (1 - i / max_iters) ** power
        at iteration i. Unchanged settings give the restored values bit for bit (the same
        expression as ``LambdaLR``), and a fresh run is at i = 0, where nothing changes.
        """
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            assert isinstance(scheduler, PolyLR), "configure_optimizers makes one PolyLR"
            scheduler.max_iters, scheduler.power = self.max_iters, self.power
            scheduler.base_lrs = [self.lr for _ in scheduler.base_lrs]
            for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
                group.update(initial_lr=base_lr, lr=base_lr * scheduler._factor(scheduler.last_epoch),
                             momentum=self.momentum, weight_decay=self.weight_decay)
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
