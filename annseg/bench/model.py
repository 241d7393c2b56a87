"""``annseg bench model``: whole-network forward latency, peak memory and where the time goes.

Each (model, image size) runs in a fresh subprocess, in eval mode on one image. Latency is
the median of ``repeats`` forward passes (CUDA events on a GPU); peak memory is measured
above the built model and its input. The share of each part (backbone, AFNB, APNB or NB,
head = everything else: context conv, classifier, upsampling) comes from separate passes
timed with hooks that synchronise the device at each part's boundaries. When AFNB is folded
into the context conv (``FoldedContext``), AFNB's part is its attention and the composed conv
less the context conv's share (``input_conv``, of the context conv's shape).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from annseg.bench.machine import PeakMemory
from annseg.bench.runner import BenchResult, autocast, machine_line, run_named_models, timed

ABLATIONS = ("fcn_resnet101", "nb_resnet101", "apnb_resnet101", "afnb_resnet101", "ann_resnet101")
GPU_SIZES = ((512, 1024), (1024, 2048))
CPU_SIZES = ((256, 512), (512, 1024))
PARTS = ("backbone", "afnb", "apnb", "head")


def measure_model(name: str, height: int, width: int, device: torch.device, repeats: int, warmup: int,
                  threads: int, fuse: bool = True, tf32: bool = False, options: dict[str, Any] | None = None,
                  precision: str = "fp32", compile: bool = False) -> dict[str, object]:
    """Latency, peak memory and per-part time of one named model in this process.

    ``tf32``: CUDA matmuls (the blocks' 1x1 projections) in TF32, as cuDNN runs the
    backbone's convolutions by default; torch's default keeps matmuls in full fp32.
    ``options`` go to ``create_model``; ``precision`` "bf16" runs the forward under bf16
    autocast; ``compile`` runs it through ``torch.compile`` (then the parts are not split: their
    hooks would break the compiled graph).
    """
    from annseg.models import create_model

    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(name, num_classes=19, **(options or {})).eval().to(device)
    if fuse:
        model.fuse_for_inference()
    runner = torch.compile(model) if compile else model
    image = torch.randn(1, 3, height, width, device=device)
    with torch.inference_mode(), autocast(device, precision):
        if device.type == "cuda":  # initialise kernels; on the CPU this would hide the peak (freed
            runner(torch.randn(1, 3, 64, 64, device=device))  # memory stays with the allocator)
        if compile:  # compiles for this input; its compile-time memory is not the model's
            runner(image)
        # Live tensor bytes on the CPU (not the compiled graph's kernels, which bypass the dispatcher):
        # folding ran the network once already, and the resident set keeps what that freed.
        with PeakMemory(device, tensors=not compile) as memory:
            runner(image)
        times = timed(lambda: runner(image), device, repeats, warmup)
        parts = None if compile else _part_times(model, image, device, repeats)
    total = statistics.median(times)
    return {
        "time_ms": total,
        "times_ms": [round(t, 3) for t in times],
        "peak_mib": memory.peak / 2**20,
        "rss_peak_mib": memory.rss_peak / 2**20,
        "memory_method": memory.method,
        "parts_ms": parts,
        "fused": fuse,
        "cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_conv_tf32": torch.backends.cudnn.allow_tf32,
        "options": options or {},
        "precision": precision,
        "compile": compile,
    }


def _part_times(model: nn.Module, image: torch.Tensor, device: torch.device, repeats: int) -> dict[str, float]:
    """Median milliseconds of the backbone, AFNB and APNB (or NB) per pass; head = the rest."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    spans: dict[str, float] = {}
    handles = []
    for part in ("backbone", "afnb", "apnb"):
        module = getattr(model, part, None)
        if module is None:
            continue

        def start(*_: object, part: str = part) -> None:
            sync()
            spans[part] = -time.perf_counter()

        def stop(*_: object, part: str = part) -> None:
            sync()
            spans[part] += time.perf_counter()

        handles += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
    composed = getattr(model, "afnb_context", None)
    if composed is not None:
        # Folded AFNB: its attention runs as ``afnb.attend`` and its fusion inside the composed context
        # conv. AFNB's part is the attention plus that conv minus its ``input_conv`` (the context conv's
        # shape and cost, which stays in the head's share as before the composition).
        for name, module in (("afnb_context", composed), ("context_input", composed.input_conv)):
            handles += [module.register_forward_pre_hook(lambda *_, n=name: start(part=n)),
                        module.register_forward_hook(lambda *_, n=name: stop(part=n))]
        attend = model.afnb.attend

        def timed_attend(*args: torch.Tensor) -> torch.Tensor:
            start(part="afnb")
            out = attend(*args)
            stop(part="afnb")
            return out

        model.afnb.attend = timed_attend  # an instance attribute, removed below
    runs: dict[str, list[float]] = {part: [] for part in PARTS}
    try:
        for _ in range(repeats):
            spans.clear()
            sync()
            begin = time.perf_counter()
            model(image)
            sync()
            total = time.perf_counter() - begin
            if composed is not None:
                spans["afnb"] += spans.pop("afnb_context") - spans.pop("context_input")
            for part in ("backbone", "afnb", "apnb"):
                runs[part].append(spans.get(part, 0.0) * 1000)
            runs["head"].append(total * 1000 - sum(spans.values()) * 1000)
    finally:
        for handle in handles:
            handle.remove()
        if composed is not None:
            del model.afnb.attend
    return {part: statistics.median(values) for part, values in runs.items()}


def run_model(
    models: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    *,
    device: str = "auto",
    repeats: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    fuse: bool = True,
    tf32: bool = False,
    options: dict[str, Any] | None = None,
    precision: str = "fp32",
    compile: bool = False,
    command: str = "",
    on_case: Callable[[int, int, dict[str, object]], None] | None = None,
) -> BenchResult:
    """Measure every (size, model) pair, each in a fresh subprocess."""
    request = {"fuse": fuse, "tf32": tf32, "options": dict(options or {}), "precision": precision, "compile": compile}
    return run_named_models("model", models, sizes, request, device=device, repeats=repeats, warmup=warmup,
                            threads=threads, command=command, on_case=on_case)


def write_results(result: BenchResult, out_dir: Path) -> tuple[Path, Path]:
    """Write results.json and results.md (the table) into ``out_dir``; return their paths."""
    return result.write(out_dir, render_markdown)


def render_markdown(result: dict) -> str:
    """One row per (image size, model): latency, memory, each part's share of the time."""
    fused = any(c.get("fused") for c in result["cases"])
    precision = "bf16 autocast" if any(c.get("precision") == "bf16" for c in result["cases"]) else "fp32"
    if result["machine"]["device"].startswith("cuda"):
        flags = (("matmuls", "cuda_matmul_tf32"), ("cuDNN convolutions", "cudnn_conv_tf32"))
        tf32 = [name for name, key in flags if any(c.get(key) for c in result["cases"])]
        if not any(key in c for c in result["cases"] for _, key in flags):
            precision += " (torch's default TF32 flags, not recorded by this run)"
        else:
            precision += f" (TF32 in {' and '.join(tf32)})" if tf32 else " (no TF32)"
    if any(c.get("compile") for c in result["cases"]):
        precision += ", torch.compile (parts not split)"
    options = next((c["options"] for c in result["cases"] if c.get("options")), None)
    if options:
        precision += ", create_model options " + ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
    lines = [
        f"Whole network, forward, eval mode, {precision}, batch 1, 19 classes{', blocks fused for inference' if fused else ''}; "
        f"latency is the median of {result['repeats']} runs. Parts from separate passes with synchronising hooks: "
        f"head = context conv + classifier + upsampling. blocks / backbone = (AFNB + APNB or NB) time over the "
        f"backbone's. {machine_line(result)}",
        "",
        "| image | model | latency (ms) | peak (MiB) | backbone (ms) | AFNB (ms) | APNB / NB (ms) | head (ms) "
        "| blocks / backbone |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["cases"]:
        if "error" in c:
            lines.append(f"| {c['height']}x{c['width']} | {c['model']} | {c['error']} | | | | | | |")
            continue
        parts = c["parts_ms"]
        if parts is None:
            lines.append(f"| {c['height']}x{c['width']} | {c['model']} | {c['time_ms']:,.0f} | {c['peak_mib']:,.0f} "
                         + "| - " * (len(PARTS) + 1) + "|")
            continue
        blocks = parts["afnb"] + parts["apnb"]
        lines.append(
            f"| {c['height']}x{c['width']} | {c['model']} | {c['time_ms']:,.0f} | {c['peak_mib']:,.0f} "
            + "".join(f"| {parts[p]:,.1f} " if parts[p] else "| - " for p in PARTS)
            + f"| {100 * blocks / parts['backbone']:.1f}% |"
        )
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def _worker(request_json: str) -> None:
    r = json.loads(request_json)
    record = measure_model(r["model"], r["height"], r["width"], torch.device(r["device"]), r["repeats"],
                           r["warmup"], r["threads"], r["fuse"], r["tf32"], r["options"], r["precision"], r["compile"])
    print(json.dumps(record))


if __name__ == "__main__":
    _worker(sys.argv[1])
