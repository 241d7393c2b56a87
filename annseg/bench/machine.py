"""What a benchmark ran on, and peak-memory probes for the CPU and CUDA."""

from __future__ import annotations

import platform
import resource
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_gflops(device: torch.device, size: int = 4096, repeats: int = 3) -> float:
    """fp32 GFLOP/s of a size x size matmul, the yardstick to scale timings between machines."""
    a = torch.randn(size, size, device=device)
    torch.matmul(a, a)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, a)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def describe(device: torch.device, threads: int) -> dict[str, object]:
    """Machine, software and device facts recorded beside every result."""
    info: dict[str, object] = {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": torch.multiprocessing.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
    }
    info["matmul_4096_fp32_gflops"] = round(matmul_gflops(device), 1)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory above a baseline while a block of code runs, in bytes.

    CUDA: ``max_memory_allocated`` after a reset. CPU: the process's resident-set high-water
    mark (VmHWM), reset through /proc/self/clear_refs so that only the measured code counts;
    where that reset is impossible, ``ru_maxrss`` (an upper bound that includes set-up).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM"
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _status_kib("VmRSS") * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            self.method = "ru_maxrss"
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        if self.device.type == "cuda":
            top = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "VmHWM":
            top = _status_kib("VmHWM") * 1024
        else:
            top = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak = max(0, top - self._base)


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
