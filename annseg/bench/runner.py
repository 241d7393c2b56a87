"""Running measurements: timing, fresh worker processes, result files."""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

PRECISIONS = ("fp32", "bf16")


def timed(run: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``repeats`` runs after ``warmup`` untimed ones (CUDA events on a GPU)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            run()
            times.append((time.perf_counter() - start_s) * 1000)
    return times


@dataclass
class BenchResult:
    """Everything one ``annseg bench`` run produced, as written to results.json."""

    kind: str  # "blocks", "model" or "train"
    command: str
    machine: dict[str, object]
    repeats: int
    warmup: int
    cases: list[dict[str, object]] = field(default_factory=list)

    def write(self, out_dir: Path, render: Callable[[dict], str]) -> tuple[Path, Path]:
        """Write results.json and results.md (``render`` of the JSON) into ``out_dir``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out_dir / "results.json", out_dir / "results.md"
        record = asdict(self)
        json_path.write_text(json.dumps(record, indent=2) + "\n")
        md_path.write_text(render(record))
        return json_path, md_path


def script_arguments(doc: str, script: str) -> argparse.Namespace:
    """The command line of a standalone benchmark script: ``--threads`` (applied to torch) and
    ``--out`` (default: the script's own folder)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(script).resolve().parent)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def write_script_results(out_dir: Path, record: dict[str, object], table: Sequence[str]) -> str:
    """A benchmark script's results: ``record`` (with its ``command``) as results.json, and the
    ``table`` lines followed by the command as results.md, in ``out_dir``; returns the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(record, indent=2))
    markdown = "\n".join([*table, "", f"Command: `{record['command']}`", ""])
    (out_dir / "results.md").write_text(markdown)
    return markdown


def run_worker(module: str, request: str) -> dict[str, object]:
    """Run ``python -m module request`` in a fresh process; its last stdout line is the JSON record."""
    return run_process([sys.executable, "-m", module, request])


def run_process(argv: Sequence[str]) -> dict[str, object]:
    """Run ``argv``, a fresh worker process; its last stdout line is the JSON record, else
    ``{"error": ...}`` with its last line of stderr (or "out of memory")."""
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        oom = "out of memory" in proc.stderr.lower() or proc.returncode in (-9, 137)
        return {"error": "out of memory" if oom else last}
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {"error": "the worker printed no result"}


def machine_line(result: dict) -> str:
    """Where and how a result was measured, for the line above its table."""
    m = result["machine"]
    return (f"Device: {m['device_name']} ({m['device']}), {m['threads']} CPU threads, torch {m['torch']}, "
            f"4096x4096 fp32 matmul {m['matmul_4096_fp32_gflops']:,} GFLOP/s.")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``precision`` "bf16", nothing for "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def run_named_models(
    kind: str,
    models: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    request: dict[str, Any],
    *,
    device: str,
    repeats: int,
    warmup: int,
    threads: int | None,
    command: str,
    on_case: Callable[[int, int, dict[str, object]], None] | None,
    shown: dict[str, Any] | None = None,
) -> BenchResult:
    """Every (size, model) pair of ``annseg.bench.{kind}``, each in a fresh worker process.

    ``request`` (with ``options`` for ``create_model`` and ``precision``) goes to every worker
    besides the case, device, repeats, warm-up and threads; ``shown`` keys open each record.
    Unknown models, options and precisions are refused before any worker starts.
    """
    from annseg.bench.blocks import resolve_device
    from annseg.bench.machine import cpu_name, describe, native_bf16
    from annseg.models.zoo import parameter_count

    autocast(torch.device("cpu"), request["precision"])
    for name in models:  # create_model's own message; built on the meta device, which takes no memory
        parameter_count(name, 19, **request["options"])
    dev = resolve_device(device)
    if request["precision"] == "bf16" and not native_bf16(dev):
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
        raise ValueError(f"--precision bf16: {dev} ({name}) has no native bf16 kernels (a CPU needs AVX512-BF16 or "
                         f"AMX); torch would fall back to slow reference kernels and time those, not bf16")
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    result = BenchResult(kind, command, describe(dev, threads), repeats, warmup)
    cases = [(name, h, w) for h, w in sizes for name in models]
    for index, (name, h, w) in enumerate(cases, 1):
        case = {"model": name, "height": h, "width": w}
        work = json.dumps({**case, **request, "device": str(dev), "repeats": repeats, "warmup": warmup,
                           "threads": threads})
        record = {**case, **(shown or {}), **run_worker(f"annseg.bench.{kind}", work)}
        result.cases.append(record)
        if on_case is not None:
            on_case(index, len(cases), record)
    return result
