"""Progress for streams that are not a terminal: whole lines, no carriage returns or cursor moves.

A progress bar redraws its line with ``\\r`` and moves the cursor up with escape codes; in a log
file (a batch job's output, ``annseg train ... 2> log``) that becomes one long garbled line. The
command picks these instead when its stderr is not a terminal. They write only to the stream they
are given, at most once per ``every`` seconds (and at the end), so a log stays short.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import IO, Any, TypeVar

from lightning.pytorch.callbacks.progress import ProgressBar

T = TypeVar("T")


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class _Pace:
    """When to write the next line: every ``every`` seconds, and at the last item."""

    def __init__(self, every: float) -> None:
        self.every, self.start, self.last = every, time.monotonic(), float("-inf")

    def due(self, done: int, total: int | None) -> bool:
        now = time.monotonic()
        if now - self.last < self.every and done != total:
            return False
        self.last = now
        return True

    def rate(self, done: int, total: int | None, unit: str) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        text = f"{done / elapsed:.2f} {unit}/s, {_duration(elapsed)} elapsed"
        if total and 0 < done < total:
            text += f", {_duration(elapsed / done * (total - done))} left"
        return text


def progress_lines(items: Iterable[T], desc: str, unit: str = "it", stream: IO[str] | None = None,
                   every: float = 30.0) -> Iterator[T]:
    """``items``, writing ``desc: 12/200 (6%), 1.50 img/s, 0:08 elapsed, 2:05 left`` lines as it goes."""
    stream = stream or sys.stderr
    total = len(items) if isinstance(items, Sized) else None
    pace = _Pace(every)
    done = 0
    for item in items:
        yield item
        done += 1
        if pace.due(done, total):
            share = f"/{total} ({done / total:.0%})" if total else ""
            print(f"{desc}: {done}{share}, {pace.rate(done, total, unit)}", file=stream, flush=True)


class LineProgressBar(ProgressBar):
    """Lightning's progress as lines: iteration, the logged progress metrics (loss, lr), speed, time left;
    and one line per validation with its scores."""

    def __init__(self, stream: IO[str] | None = None, every: float = 30.0) -> None:
        super().__init__()
        self.stream, self.every = stream, every
        self._enabled = True
        self._pace: _Pace | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, file=self.stream or sys.stderr, flush=True, **kwargs)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._pace = _Pace(self.every)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if self._pace is None or not self._pace.due(step, total):
            return
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = "".join(f", {k} {_value(v)}" for k, v in metrics.items())
        self.print(f"train: iteration {step}/{total} ({step / total:.0%}){shown}, "
                   f"{self._pace.rate(step, total, 'it')}")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        scores = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        shown = ", ".join(f"{k} {_value(float(v))}" for k, v in scores.items())
        self.print(f"validation at iteration {trainer.global_step}: {shown or 'done'}")
