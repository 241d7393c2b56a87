"""``annseg bench blocks``: the paper's efficiency table, NonLocal2d against APNB.

What is measured follows the authors: the attention part of a block (projections,
attention, W; no fusion conv) on a (1, 2048, H, W) map with Ck = Cv = 256, in eval mode.
Each case runs in a fresh subprocess so that CPU peak memory is that case's alone:
forward time is the median of ``repeats`` runs after ``warmup`` runs (CUDA events on a GPU),
peak memory is measured above the baseline of the built block and its input.
Multiply-accumulates are counted analytically (``count_macs``), matching what the code computes.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from annseg.bench.machine import PeakMemory, describe
from annseg.layers import APNB, NonLocal2d

BLOCKS = ("nb", "apnb")
PAPER_SIZES = ((96, 96), (128, 128), (128, 256))
QUICK_SIZES = ((24, 24), (32, 32), (32, 64))
README_START = "<!-- annseg bench blocks: start -->"
README_END = "<!-- annseg bench blocks: end -->"


@dataclass(frozen=True)
class BlockCase:
    """One measurement: a block on a (1, channels, height, width) input."""

    block: str
    height: int
    width: int
    channels: int = 2048
    key_channels: int = 256
    value_channels: int = 256
    sizes: tuple[int, ...] = (1, 3, 6, 8)
    share_query_key: bool = True

    def build(self, fused_attention: bool = True) -> nn.Module:
        """The block's attention part (no fusion), in eval mode."""
        options = dict(key_channels=self.key_channels, value_channels=self.value_channels,
                       fusion=False, fused_attention=fused_attention,
                       share_query_key=self.share_query_key)
        if self.block == "nb":
            return NonLocal2d(self.channels, **options).eval()
        if self.block == "apnb":
            return APNB(self.channels, sizes=self.sizes, **options).eval()
        raise ValueError(f"unknown block {self.block!r}; choose from {list(BLOCKS)}")

    @property
    def anchors(self) -> int:
        """S: positions attended to (N for the non-local block)."""
        return self.height * self.width if self.block == "nb" else sum(s * s for s in self.sizes)


def count_macs(case: BlockCase) -> dict[str, int]:
    """Multiply-accumulates of the attention part, by stage, as our code computes them.

    The query shares the key projection unless ``share_query_key`` is off; values are
    projected after pooling (S positions);
    pyramid pooling is two matmuls per map (see ``PyramidSampling``); BN, ReLU, softmax and
    bias additions are not counted.
    """
    C, Ck, Cv, H, W = case.channels, case.key_channels, case.value_channels, case.height, case.width
    N, S = H * W, case.anchors
    macs = {
        "key_projection": N * C * Ck,
        "query_projection": 0 if case.share_query_key else N * C * Ck,
        "value_projection": S * C * Cv,
        "pooling": 0,
        "attention": N * S * (Ck + Cv),
        "output_projection": N * Cv * C,
    }
    if case.block == "apnb":
        T = sum(case.sizes)
        macs["pooling"] = (Ck + C) * T * (H * W + H * T)  # the key map and the input
    macs["total"] = sum(macs.values())
    return macs


def measure(case: BlockCase, device: torch.device, repeats: int, warmup: int, threads: int) -> dict[str, object]:
    """Time and peak memory of one case in this process (run it in a fresh one)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    block = case.build().to(device)
    with torch.inference_mode():
        block(torch.randn(1, case.channels, 8, 8, device=device))  # initialise kernels and pools
        x = torch.randn(1, case.channels, case.height, case.width, device=device)
        with PeakMemory(device) as memory:
            out = block(x)
        del out
        for _ in range(warmup):
            block(x)
        times = [_time_forward(block, x, device) for _ in range(repeats)]
    return {
        "time_ms": statistics.median(times),
        "times_ms": [round(t, 3) for t in times],
        "peak_mib": memory.peak / 2**20,
        "memory_method": memory.method,
    }


def _time_forward(block: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        block(x)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    block(x)
    return (time.perf_counter() - start_s) * 1000


@dataclass
class BenchResult:
    """Everything one ``annseg bench blocks`` run produced, as written to results.json."""

    command: str
    machine: dict[str, object]
    repeats: int
    warmup: int
    cases: list[dict[str, object]] = field(default_factory=list)


def run_blocks(
    sizes: Sequence[tuple[int, int]],
    *,
    blocks: Sequence[str] = BLOCKS,
    channels: int = 2048,
    key_channels: int = 256,
    value_channels: int = 256,
    anchor_sizes: tuple[int, ...] = (1, 3, 6, 8),
    device: str = "auto",
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    command: str = "",
    on_case: Callable[[int, int, dict[str, object]], None] | None = None,
) -> BenchResult:
    """Measure every (size, block) pair, each in a fresh subprocess."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)  # the matmul yardstick in describe() runs on these threads
    result = BenchResult(command, describe(dev, threads), repeats, warmup)
    cases = [BlockCase(b, h, w, channels, key_channels, value_channels, anchor_sizes)
             for h, w in sizes for b in blocks]
    for index, case in enumerate(cases, 1):
        record = {**asdict(case), "anchors": case.anchors, "macs": count_macs(case)}
        record.update(_measure_in_subprocess(case, dev, repeats, warmup, threads))
        result.cases.append(record)
        if on_case is not None:
            on_case(index, len(cases), record)
    return result


def _measure_in_subprocess(case: BlockCase, device: torch.device, repeats: int, warmup: int, threads: int) -> dict[str, object]:
    request = json.dumps({"case": asdict(case), "device": str(device), "repeats": repeats,
                          "warmup": warmup, "threads": threads})
    proc = subprocess.run([sys.executable, "-m", "annseg.bench.blocks", request],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        oom = "out of memory" in proc.stderr.lower() or proc.returncode in (-9, 137)
        return {"error": "out of memory" if oom else last}
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {"error": "the worker printed no result"}


def write_results(result: BenchResult, out_dir: Path) -> tuple[Path, Path]:
    """Write results.json and results.md into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(asdict(result), indent=2) + "\n")
    md_path.write_text(render_markdown(asdict(result)))
    return json_path, md_path


def render_markdown(result: dict) -> str:
    """The paper-style table (one row per input size) with the machine and the command."""
    by_size: dict[tuple[int, int, int], dict[str, dict]] = {}
    for case in result["cases"]:
        by_size.setdefault((case["channels"], case["height"], case["width"]), {})[case["block"]] = case
    m = result["machine"]
    lines = [
        f"Attention part (projections, attention, W), fp32 forward, eval mode, batch 1, "
        f"Ck = Cv = {result['cases'][0]['key_channels']}, median of {result['repeats']} runs. "
        f"Device: {m['device_name']} ({m['device']}), {m['threads']} threads, torch {m['torch']}, "
        f"4096x4096 fp32 matmul {m['matmul_4096_fp32_gflops']} GFLOP/s.",
        "",
        "| input | NB time (ms) | APNB time (ms) | speed-up | NB peak (MiB) | APNB peak (MiB) "
        "| memory ratio | NB GMACs | APNB GMACs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (c, h, w), cases in by_size.items():
        nb, apnb = cases.get("nb", {}), cases.get("apnb", {})
        lines.append(
            f"| [1,{c},{h},{w}] | {_num(nb, 'time_ms')} | {_num(apnb, 'time_ms')} "
            f"| {_ratio(nb, apnb, 'time_ms')} | {_num(nb, 'peak_mib')} | {_num(apnb, 'peak_mib')} "
            f"| {_ratio(nb, apnb, 'peak_mib')} | {_gmacs(nb)} | {_gmacs(apnb)} |"
        )
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def _num(case: dict, key: str) -> str:
    if not case:
        return "-"
    return case.get("error") or f"{case[key]:.0f}"


def _ratio(slow: dict, fast: dict, key: str) -> str:
    if not slow or not fast or "error" in slow or "error" in fast or not fast[key]:
        return "-"
    return f"{slow[key] / fast[key]:.1f}x"


def _gmacs(case: dict) -> str:
    return f"{case['macs']['total'] / 1e9:.1f}" if case else "-"


def update_readme(readme: Path, markdown: str) -> None:
    """Replace the text between the README's benchmark markers with ``markdown``."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no '{README_START}' ... '{README_END}' markers to replace")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{markdown}{README_END}{tail}")


def _worker(request_json: str) -> None:
    request = json.loads(request_json)
    case = BlockCase(**{**request["case"], "sizes": tuple(request["case"]["sizes"])})
    record = measure(case, torch.device(request["device"]), request["repeats"], request["warmup"], request["threads"])
    print(json.dumps(record))


if __name__ == "__main__":
    _worker(sys.argv[1])
