"""Checkpoints: written atomically, read back into a ready model with its metadata."""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from annseg import __version__
from annseg.engine.builders import build_model
from annseg.engine.config import Config, ConfigError, config_from_dict
from annseg.models.weights import UnsafeFileError, read_file


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` only when the block completes.

    It is written to a temporary file in the same folder, synced and renamed: a rename is
    atomic on POSIX file systems, so a job killed meanwhile leaves the previous file intact and
    at worst a stray ``.<name>.tmp-<pid>`` (``remove_partial_writes`` deletes those).
    A failed write (a full disk: ``torch.save`` reports it as a RuntimeError whose context is
    the OSError) raises an OSError naming ``path``, with the errno of the cause.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except Exception as error:
        cause = _os_error(error)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from error
    finally:
        temporary.unlink(missing_ok=True)


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError with an errno behind ``error`` (itself, or along its cause/context chain)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer through ``atomic_file``: never a half-written checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        with atomic_file(path) as file:
            torch.save(checkpoint, file)

    def load_checkpoint(self, path: str | Path, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """What Lightning restores on resume, read as every annseg checkpoint is (plain data only,
        whatever ``weights_only`` says), onto the CPU: Lightning moves the states to the device."""
        return read_checkpoint(path)


def model_meta(config: Config, classes: list[str], palette: list[list[int]]) -> dict[str, Any]:
    """What a checkpoint carries besides weights, so that it alone rebuilds a ready model."""
    return {"config": config.to_dict(), "classes": list(classes), "palette": [list(c) for c in palette],
            "normalization": {"mean": list(config.data.mean), "std": list(config.data.std)},
            "annseg_version": __version__}


def save_model(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """An annseg checkpoint of ``model`` alone (no optimiser state), written atomically.

    ``meta`` comes from ``model_meta``; ``load_model``, ``annseg eval`` and ``predict`` read
    the file like a training checkpoint (converted and exported models use this).
    """
    state = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    AtomicCheckpointIO().save_checkpoint({"state_dict": state, "annseg": meta}, path)


def export_weights(checkpoint: str | Path, out: str | Path) -> None:
    """``out``: the network and metadata of the annseg checkpoint ``checkpoint``, without the
    optimiser state, schedule, RNG states or iteration (``annseg export weights``).

    The network is rebuilt and loaded strictly first (``load_model``), so a checkpoint that does
    not fit its own config is refused rather than copied. ``eval``, ``predict``, ``annseg.load``
    and ``train.init_from`` read the result; ``--resume`` does not (nothing to resume).
    """
    load_model(checkpoint)
    content = read_checkpoint(checkpoint)
    state = {k: v for k, v in content["state_dict"].items() if k.startswith("model.")}
    AtomicCheckpointIO().save_checkpoint({"state_dict": state, "annseg": content["annseg"]}, out)


def verify_checkpoint(path: str | Path) -> None:
    """Raise ValueError naming ``path`` when the file is truncated or corrupt.

    ``torch.save`` writes a zip archive with a CRC-32 per record but ``torch.load`` never
    checks them: a flipped byte inside a tensor loads silently. Reading every record through
    ``zipfile`` checks them all (about 1 s per GB) and finds truncation too.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(f"checkpoint {path} is truncated or not a torch checkpoint ({error})") from None
    if bad is not None:
        raise ValueError(f"checkpoint {path} is corrupt: its record {bad!r} fails the CRC check")


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint dict at ``path``, checked whole, with errors that name the file.

    Every checkpoint annseg reads comes through here and ``read_file``: plain data only
    (``weights_only=True``); one holding a pickled object raises ``UnsafeFileError`` and
    nothing in it runs. ``mmap`` maps the tensors instead of reading them.
    """
    path = Path(path)
    if path.is_dir():
        last = path / "checkpoints" / "last.ckpt"
        hint = f" such as {last}" if last.is_file() else ""
        raise IsADirectoryError(f"checkpoint {path} is a directory; expected a checkpoint file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    verify_checkpoint(path)
    try:
        checkpoint = read_file(path, "checkpoint", mmap=mmap)
    except UnsafeFileError:
        raise
    except ValueError as error:
        raise ValueError(f"{error}; it may be truncated or not a torch checkpoint") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "annseg" not in checkpoint:
        raise ValueError(f"checkpoint {path} is not an annseg training checkpoint (no 'state_dict' / 'annseg' entry)")
    return checkpoint


ITERATION_FILE = re.compile(r"iter_(\d+)\.ckpt")  # a numbered checkpoint, its iteration


def latest_checkpoint(folder: str | Path) -> tuple[Path | None, list[str]]:
    """The newest readable checkpoint in a run's ``checkpoints/`` folder, and why others were skipped.

    Candidates are ``last.ckpt`` and ``iter_NNNNNN.ckpt``, newest iteration first (``last.ckpt``
    wins a tie: it is written after the numbered one). ``best.ckpt`` is never one: it is chosen
    by its validation score, not as the newest state. Each is verified whole; a corrupt or
    truncated one is skipped, with its reason in the returned list. ``None`` when none is good.
    A file holding a pickled object is never skipped: its ``UnsafeFileError`` propagates, since
    annseg never writes one and quietly resuming from an older checkpoint would hide it.
    """
    folder = Path(folder)
    candidates: list[tuple[int, int, Path]] = []
    skipped: list[str] = []
    for path in folder.glob("*.ckpt") if folder.is_dir() else ():
        if path.name == "last.ckpt":
            try:  # its step, without reading the tensors (memory-mapped)
                step = int(read_checkpoint(path, mmap=True).get("global_step", -1))
            except UnsafeFileError:
                raise
            except (ValueError, OSError) as error:
                skipped.append(str(error))
                continue
            candidates.append((step, 1, path))
        elif match := ITERATION_FILE.fullmatch(path.name):
            candidates.append((int(match.group(1)), 0, path))
    for _, _, path in sorted(candidates, reverse=True):
        try:
            read_checkpoint(path)
        except UnsafeFileError:
            raise
        except (ValueError, OSError) as error:
            skipped.append(str(error))
            continue
        return path, skipped
    return None, skipped


def remove_partial_writes(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed ``AtomicCheckpointIO`` left in ``folder``; returns them."""
    folder = Path(folder)
    stray = sorted(folder.glob(".*.tmp-*")) if folder.is_dir() else []
    for path in stray:
        path.unlink(missing_ok=True)
    return stray


def load_model(path: str | Path, *, fuse: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The trained network of an annseg checkpoint (eval mode, CPU) and its metadata.

    Metadata: ``config`` (a Config), ``classes``, ``palette``, ``normalization``. ``fuse``:
    fold the BatchNorms for inference (``ANN.fuse_for_inference``): faster, the same function
    up to rounding, but the network can no longer be trained or its weights saved as trained.
    """
    checkpoint = read_checkpoint(path)
    meta = dict(checkpoint["annseg"])
    try:
        meta["config"] = config_from_dict(meta["config"])
    except ConfigError as error:
        raise ValueError(f"checkpoint {path} holds a config this annseg cannot read: {error}") from None
    model = build_model(meta["config"].model, len(meta["classes"]), load_backbone_weights=False)
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit its model {meta['config'].model.name}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    if fuse:
        model.fuse_for_inference()
    return model, meta
