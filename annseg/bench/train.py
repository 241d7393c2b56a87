"""``annseg bench train``: one whole-network training step, its time, peak memory and parts.

A step is what ``annseg train`` does per batch: ``zero_grad(set_to_none=True)``, forward of
the named model in train mode on a (B, 3, H, W) batch of normalised images, ``ANNLoss`` as
plain cross-entropy on the main logits + 0.4 x cross-entropy on the auxiliary ones (no OHEM),
backward, and an SGD step (lr 0.01, momentum 0.9, weight decay 5e-4). Each (model, size)
runs in a fresh subprocess. Time: median of ``repeats`` steps after ``warmup`` (at least one:
the first step allocates SGD's momentum buffers). Peak memory: the high-water mark over the
warmup and timed steps, above the memory held once the model, optimiser and batch are built,
so gradients, momentum buffers and activations count.

The split by part comes from separate passes (see ``step_parts``).
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from annseg.bench.machine import PeakMemory
from annseg.bench.runner import BenchResult, autocast, machine_line, run_named_models, timed

logger = logging.getLogger(__name__)
NUM_CLASSES = 19
AUX_WEIGHT = 0.4
SGD = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
# Parts of a step, each with a forward and a backward time (the optimiser's only one).
PARTS = ("backbone", "afnb", "apnb", "heads", "loss")


def step_loss() -> nn.Module:
    """The benchmark's loss: cross-entropy on the main logits + 0.4 x on the auxiliary ones, no OHEM."""
    from annseg.losses import ANNLoss

    return ANNLoss(aux_weight=AUX_WEIGHT, ohem=False)


def measure_step(step: Callable[[], object], device: torch.device, repeats: int,
                 warmup: int) -> dict[str, object]:
    """Time and peak memory of a repeated ``step`` (a training step, or a forward to compare with
    another library's by the same method).

    Call it once the model, optimiser and inputs are built: the peak is the high-water mark
    over ``max(warmup, 1)`` untimed and ``repeats`` timed steps above the memory held now. One
    ``PeakMemory`` spans all steps (on the CPU the allocator keeps freed memory, which would
    hide a peak measured per step).
    """
    with PeakMemory(device) as memory:
        times = timed(step, device, repeats, max(warmup, 1))
    return {"time_ms": statistics.median(times), "times_ms": [round(t, 3) for t in times],
            "peak_mib": memory.peak / 2**20, "memory_method": memory.method}


def training_step(model: nn.Module, images: Tensor, masks: Tensor, device: torch.device,
                  precision: str = "fp32", compile: bool = False) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """annseg's training step on ``model`` (put in train mode) and its SGD optimiser."""
    model.train()
    runner = torch.compile(model) if compile else model
    loss_fn = step_loss()
    optimizer = torch.optim.SGD(model.parameters(), **SGD)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = loss_fn(runner(images), masks)
        loss.backward()
        optimizer.step()

    return step, optimizer


def random_batch(batch: int, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Normalised-looking images (B, 3, H, W) and masks (B, H, W) of ``NUM_CLASSES`` classes."""
    images = torch.randn(batch, 3, height, width, device=device)
    masks = torch.randint(0, NUM_CLASSES, (batch, height, width), device=device)
    return images, masks


def measure_train(name: str, height: int, width: int, batch: int, device: torch.device, repeats: int,
                  warmup: int, threads: int, options: dict[str, Any] | None = None,
                  precision: str = "fp32", compile: bool = False, parts: bool = True) -> dict[str, object]:
    """Time, peak memory and per-part times of one training step of a named model, in this process.

    ``options`` go to ``create_model``. ``parts``: also split the step by part, in extra
    passes. With ``compile`` the parts are not measured: their hooks would split the compiled
    graph and time another program.
    """
    from annseg.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, **(options or {})).to(device)
    images, masks = random_batch(batch, height, width, device)
    step, optimizer = training_step(model, images, masks, device, precision, compile)
    record = measure_step(step, device, repeats, warmup)
    if parts and not compile:
        passes = [step_parts(model, step_loss(), optimizer, images, masks,
                             device, precision) for _ in range(repeats)]
        record["parts_ms"] = {key: statistics.median(p[key] for p, _ in passes) for key in passes[0][0]}
        record["parts_total_ms"] = statistics.median(total for _, total in passes)
    return {**record, "options": options or {}, "precision": precision, "compile": compile,
            "batch": batch, "parameters": sum(p.numel() for p in model.parameters())}


def step_parts(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor,
               masks: Tensor, device: torch.device, precision: str = "fp32") -> tuple[dict[str, float], float]:
    """One training step split into parts: ({part: ms}, the step's own total ms), from one clock.

    Keys: ``{part}_fwd`` and ``{part}_bwd`` for ``PARTS``, and ``optimizer`` (zero_grad +
    step). Forward: pre/post hooks on ``backbone``, ``afnb`` and ``apnb`` (the network's
    attribute names; NB sits in ``apnb``) give their spans; heads = the network's forward minus
    those (context conv, classifier, auxiliary head, upsampling); loss = from the network's
    output to the loss value. Backward: tensor hooks on the boundary tensors (the logits, APNB's
    input and output, AFNB's output, the backbone's outputs) record when each gradient is
    complete, which is when the engine starts the backward of the op that made the tensor.
    The engine runs a CPU backward in the calling thread, latest-made op first, so the first
    arrival at each boundary cuts it into consecutive spans: from ``backward()`` to the first
    logits gradient is the loss; from there to APNB's output the heads (auxiliary head,
    upsampling, classifier); then APNB (to its input), the context conv (heads, to AFNB's
    output), AFNB (to the first backbone output) and the backbone (to the end). A variant
    without a block skips its boundaries and its span joins the heads. All spans are read
    from one clock, so the parts add up to the step's total. On CUDA each hook
    synchronises the device first.
    """
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    fwd: dict[str, float] = {}
    arrivals: dict[str, list[float]] = {}
    grad_hooks: list[torch.utils.hooks.RemovableHandle] = []

    def on_grad(label: str) -> Callable[[Tensor], None]:
        return lambda _grad: arrivals.setdefault(label, []).append(now())

    def watch(label: str, tensors: object) -> None:
        for t in tensors if isinstance(tensors, (tuple, list)) else (tensors,):
            if isinstance(t, Tensor) and t.requires_grad:
                grad_hooks.append(t.register_hook(on_grad(label)))

    handles = []
    for part in ("network", "backbone", "afnb", "apnb"):
        module = model if part == "network" else getattr(model, part, None)
        if module is None:
            continue

        def start(_m: nn.Module, inputs: tuple, part: str = part) -> None:
            fwd[part] = -now()
            if part == "apnb":
                watch("apnb_in", inputs)

        def stop(_m: nn.Module, _inputs: tuple, output: object, part: str = part) -> None:
            fwd[part] += now()
            watch("logits" if part == "network" else f"{part}_out", output)

        handles += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
    try:
        begin = now()
        optimizer.zero_grad(set_to_none=True)
        zeroed = now()
        with autocast(device, precision):
            outputs = model(images)
            network_end = now()
            loss = loss_fn(outputs, masks)
        backward_start = now()
        loss.backward()
        backward_end = now()
        optimizer.step()
        end = now()
    finally:
        for handle in handles + grad_hooks:
            handle.remove()
    parts = {f"{p}_fwd": fwd.get(p, 0.0) for p in ("backbone", "afnb", "apnb")}
    parts["heads_fwd"] = fwd["network"] - sum(parts.values())
    parts["loss_fwd"] = backward_start - network_end
    # The backward's boundaries in the order the engine reaches them; each starts a part.
    bounds = [("loss", backward_start), ("heads", min(arrivals["logits"]))]
    for label, part in (("apnb_out", "apnb"), ("apnb_in", "heads"), ("afnb_out", "afnb"), ("backbone_out", "backbone")):
        if label in arrivals:
            bounds.append((part, min(arrivals[label])))
    bounds.append(("end", backward_end))
    if any(t1 < t0 for (_, t0), (_, t1) in zip(bounds, bounds[1:])):
        logger.warning("the backward reached the parts' boundaries out of order; its split is not meaningful")
    for p in PARTS:
        parts[f"{p}_bwd"] = 0.0
    for (part, t0), (_, t1) in zip(bounds, bounds[1:]):
        parts[f"{part}_bwd"] += t1 - t0
    parts["optimizer"] = (zeroed - begin) + (end - backward_end)
    return {k: v * 1000 for k, v in parts.items()}, (end - begin) * 1000


def run_train(
    models: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    *,
    batch: int = 2,
    options: dict[str, Any] | None = None,
    precision: str = "fp32",
    compile: bool = False,
    device: str = "auto",
    repeats: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    command: str = "",
    on_case: Callable[[int, int, dict[str, object]], None] | None = None,
) -> BenchResult:
    """Measure a training step of every (size, model) pair, each in a fresh subprocess."""
    request = {"batch": batch, "options": dict(options or {}), "precision": precision, "compile": compile}
    return run_named_models("train", models, sizes, request, device=device, repeats=repeats, warmup=max(warmup, 1),
                            threads=threads, command=command, on_case=on_case, shown={"batch": batch})


def write_results(result: BenchResult, out_dir: Path) -> tuple[Path, Path]:
    """Write results.json and results.md (the table) into ``out_dir``; return their paths."""
    return result.write(out_dir, render_markdown)


def levers(case: dict) -> str:
    """A case's options and levers in one cell: ``bf16, compile, dropout=0.1``; ``defaults``."""
    words = [case["precision"]] if case.get("precision", "fp32") != "fp32" else []
    words += ["compile"] if case.get("compile") else []
    words += [f"{key}={value}" for key, value in sorted(case.get("options", {}).items())]
    return ", ".join(words) or "defaults"


def render_markdown(result: dict) -> str:
    """One row per (size, model): step time, peak memory, each part's forward / backward time."""
    lines = [
        f"Whole network, one SGD training step (zero_grad, forward in train mode, cross-entropy + "
        f"{AUX_WEIGHT} x auxiliary cross-entropy, backward, SGD with momentum), 19 classes; time is the median "
        f"of {result['repeats']} steps after {result['warmup']} untimed. Peak memory is above the built model, "
        f"optimiser and batch, so gradients, momentum buffers and activations count. Parts (forward / backward ms) "
        f"from separate passes timed by hooks: heads = context conv + classifier + auxiliary head + upsampling; "
        f"optimiser = zero_grad + step. {machine_line(result)}",
        "",
        "| model | batch x size | options | time (ms) | peak (MiB) | backbone | AFNB | APNB / NB | heads | loss "
        "| optimiser (ms) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["cases"]:
        head = f"| {c['model']} | {c['batch']}x{c['height']}x{c['width']} "
        if "error" in c:
            lines.append(head + f"| | {c['error']} | | | | | | | |")
            continue
        parts = c.get("parts_ms")
        cells = ["-"] * (len(PARTS) + 1) if parts is None else [
            f"{parts[f'{p}_fwd']:,.0f} / {parts[f'{p}_bwd']:,.0f}" if parts[f"{p}_fwd"] or parts[f"{p}_bwd"] else "-"
            for p in PARTS] + [f"{parts['optimizer']:,.0f}"]
        lines.append(head + f"| {levers(c)} | {c['time_ms']:,.0f} | {c['peak_mib']:,.0f} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def _worker(request_json: str) -> None:
    r = json.loads(request_json)
    record = measure_train(r["model"], r["height"], r["width"], r["batch"], torch.device(r["device"]), r["repeats"],
                           r["warmup"], r["threads"], r["options"], r["precision"], r["compile"])
    print(json.dumps(record))


if __name__ == "__main__":
    _worker(sys.argv[1])
