"""Running measurements: timing, fresh worker processes, result files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


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
