"""What a benchmark ran on, and peak-memory probes for the CPU and CUDA."""

from __future__ import annotations

import platform
import resource
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls and convolutions natively: a GPU that supports bf16,
    or a CPU with AVX512-BF16 or AMX. Elsewhere torch falls back to slow reference kernels
    (a 2048-wide matmul about a hundred times slower than in fp32), so bf16 timings would
    measure the fallback, not bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


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

    CUDA: ``max_memory_allocated`` after a reset. CPU, ``tensors=True``: the most bytes of
    tensor storage alive at once among the tensors created inside the block (``LiveTensors``),
    the CPU's counterpart of CUDA's allocated memory: unlike the resident set, it does not
    depend on what the C allocator keeps after a free. ``rss_peak`` then holds the resident-set
    figure too. CPU otherwise: the process's resident-set high-water mark (VmHWM), reset
    through /proc/self/clear_refs so that only the measured code counts; where that reset is
    impossible, ``ru_maxrss`` (an upper bound that includes set-up).
    """

    def __init__(self, device: torch.device, tensors: bool = False) -> None:
        self.device = device
        self.tensors = tensors and device.type == "cpu"
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else "tensors" if self.tensors else "VmHWM"
        self.peak = 0
        self.rss_peak = 0
        self._live: LiveTensors | None = None

    def __enter__(self) -> "PeakMemory":
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _status_kib("VmRSS") * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._rss_method = "VmHWM"
        except OSError:
            self._rss_method = "ru_maxrss"
            if not self.tensors:
                self.method = "ru_maxrss"
        if self.tensors:
            self._live = LiveTensors().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        if self.device.type == "cuda":
            self.peak = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
            return
        if self._live is not None:
            self._live.__exit__(*exc)
        if self._rss_method == "VmHWM":
            top = _status_kib("VmHWM") * 1024
        else:
            top = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.rss_peak = max(0, top - self._base)
        self.peak = self._live.peak if self._live is not None else self.rss_peak


class LiveTensors(TorchDispatchMode):
    """The most bytes of tensor storage alive at once, among storages created while it is active.

    Every op's outputs are seen through torch's dispatcher (the CPU autograd engine runs the
    backward in the calling thread, so backward ops are seen too); a storage counts from its
    creation until it is freed. Storages that existed before (the model, its inputs) do not
    count; scratch memory a kernel allocates and frees inside one op is not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        # An output sharing an input's storage (a view, an in-place op) allocated nothing.
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in inputs or key in self._sizes:
                continue
            self._sizes[key] = storage.nbytes()
            self.current += storage.nbytes()
            weakref.finalize(storage, self._freed, key)
        self.peak = max(self.peak, self.current)
        return out

    def _freed(self, key: int) -> None:
        self.current -= self._sizes.pop(key, 0)


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
