"""annseg against mmsegmentation 1.2.2's own ANN-R50, side by side on one machine, in one run.

Not part of annseg: annseg never imports it. Two pieces of work, each side in a fresh process:

- **training step**, 2x3x384x384: mmseg's ``model.loss`` + ``parse_losses`` + backward + SGD
  step against ``annseg.bench.train``'s step of ``ann_resnet50`` built with ``MMSEG_OPTIONS``
  (cross-entropy + 0.4 x auxiliary on both sides; SGD lr 0.01, momentum 0.9, weight decay 5e-4);
- **eval forward**, 1x3x512x1024: an mmseg ANN-R50 (random weights, BatchNorm statistics from a
  few train-mode forwards) saved as an mmseg checkpoint and converted with ``annseg convert
  mmseg``; mmseg's ``encode_decode`` against ``annseg.load(converted)``'s forward, both under
  ``torch.inference_mode()``. Both sides' argmax and logits are compared once on that input.

Both sides' arithmetic is counted once too (torch's ``FlopCounterMode``: convolutions and matrix
products, forward and backward), so that a time ratio can be read against the FLOP ratio.

Time is the median of ``--repeats`` runs after ``--warmup``; peak memory is the high-water mark
over those runs above what the built model and its inputs hold (``annseg.bench.train.measure_step``
for both sides). annseg's opt-in levers (bf16 autocast, torch.compile) are extra rows beside the
fp32 headline. With ``torch.compile`` the first warm-up run compiles, and its memory counts.

Install (on top of the torch annseg pins; mmcv-lite has no compiled ops, and ANN needs none)::

    pip install mmengine mmcv-lite==2.1.0 prettytable scipy ftfy regex
    pip install --no-deps mmsegmentation==1.2.2

Run::

    python benchmarks/peers/mmseg_ann.py --threads 2 --out benchmarks/peers/mmseg-cpu
    python benchmarks/peers/mmseg_ann.py --readme README.md   # the README's table from --out's results
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import types
from importlib import metadata
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from annseg.bench.blocks import resolve_device, update_readme
from annseg.bench.machine import describe, native_bf16
from annseg.bench.runner import autocast, machine_line, run_process
from annseg.bench.train import SGD, measure_step, measure_train, random_batch, training_step

README_START = "<!-- mmseg side by side: start -->"
README_END = "<!-- mmseg side by side: end -->"
DEFAULT_OUT = Path(__file__).resolve().parent / "mmseg-cpu"
WORKS = ("train", "eval")
LEVERS = {"train": ("bf16", "compile"), "eval": ("bf16", "compile")}
NUM_CLASSES = 19

# mmseg's configs/_base_/models/ann_r50-d8.py with BatchNorm in place of SyncBN (one process).
_NORM = {"type": "BN", "requires_grad": True}
MMSEG_ANN_R50: dict[str, Any] = {
    "type": "EncoderDecoder",
    "backbone": {"type": "ResNetV1c", "depth": 50, "num_stages": 4, "out_indices": (0, 1, 2, 3),
                 "dilations": (1, 1, 2, 4), "strides": (1, 2, 1, 1), "norm_cfg": _NORM, "norm_eval": False,
                 "style": "pytorch", "contract_dilation": True},
    "decode_head": {"type": "ANNHead", "in_channels": [1024, 2048], "in_index": [2, 3], "channels": 512,
                    "project_channels": 256, "query_scales": (1,), "key_pool_scales": (1, 3, 6, 8),
                    "dropout_ratio": 0.1, "num_classes": NUM_CLASSES, "norm_cfg": _NORM, "align_corners": False,
                    "loss_decode": {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": 1.0}},
    "auxiliary_head": {"type": "FCNHead", "in_channels": 1024, "in_index": 2, "channels": 256, "num_convs": 1,
                       "concat_input": False, "dropout_ratio": 0.1, "num_classes": NUM_CLASSES, "norm_cfg": _NORM,
                       "align_corners": False,
                       "loss_decode": {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": 0.4}},
    "train_cfg": {},
    "test_cfg": {"mode": "whole"},
}


# --- mmseg's side (imported only inside functions: the tests run without mmseg) -------------------

def _stand_in_mmcv_ops() -> None:
    """mmcv-lite has no compiled ``mmcv.ops``, yet mmseg imports names from it at import time:
    a module whose every name is a class that raises when used (ANN uses none of them)."""
    if "mmcv.ops" in sys.modules:
        return

    class Missing:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("mmcv.ops is not available in mmcv-lite; ANN does not need it")

    def attribute(name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return Missing

    ops = types.ModuleType("mmcv.ops")
    ops.__getattr__ = attribute  # type: ignore[method-assign]
    sys.modules["mmcv.ops"] = ops


def build_mmseg(device: torch.device) -> torch.nn.Module:
    """mmseg's ANN-R50 (seed 0), built by its registry."""
    _stand_in_mmcv_ops()
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    torch.manual_seed(0)
    return MODELS.build(MMSEG_ANN_R50).to(device)


def _metas(height: int, width: int) -> dict[str, tuple[int, int]]:
    return {"img_shape": (height, width), "ori_shape": (height, width), "pad_shape": (height, width)}


def mmseg_train_step(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor):
    """mmseg's own training step: ``loss`` + ``parse_losses`` + backward + SGD (annseg's settings)."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    samples = []
    for mask in masks:
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=mask[None])
        sample.set_metainfo(_metas(*mask.shape))
        samples.append(sample)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), **SGD)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model.parse_losses(model.loss(images, samples))
        loss.backward()
        optimizer.step()

    return step


def save_mmseg_checkpoint(path: Path, height: int, width: int) -> None:
    """An mmseg ANN-R50 with non-trivial BatchNorm statistics, saved as mmseg saves checkpoints."""
    import mmseg

    from annseg.data.meta import CITYSCAPES_CLASSES

    model = build_mmseg(torch.device("cpu")).train()
    with torch.no_grad():
        for seed in range(3):  # running means and variances away from their 0 / 1 start
            torch.manual_seed(100 + seed)
            features = model.extract_feat(torch.randn(2, 3, height, width))
            model.decode_head(features)
            model.auxiliary_head(features)
    torch.save({"state_dict": model.state_dict(),
                "meta": {"mmseg_version": mmseg.__version__, "dataset_meta": {"classes": list(CITYSCAPES_CLASSES)}}},
               path)


def load_mmseg_checkpoint(path: Path, device: torch.device) -> torch.nn.Module:
    model = build_mmseg(device)
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True)["state_dict"])
    return model.eval()


def eval_input(height: int, width: int, device: torch.device) -> torch.Tensor:
    """The normalised image both sides read (seeded: every process draws the same one)."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, 3, height, width, generator=generator).to(device)


def convert(checkpoint: Path, out: Path) -> None:
    """``annseg convert mmseg CKPT OUT``, the command a user runs (this interpreter's annseg)."""
    cli = "import sys; from annseg.cli import main; sys.argv[0] = 'annseg'; main()"
    proc = subprocess.run([sys.executable, "-c", cli, "convert", "mmseg", str(checkpoint), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"annseg convert mmseg {checkpoint} failed: {proc.stderr.strip().splitlines()[-1:]}")


# --- the workers: one (side, work, lever) per fresh process -------------------------------------

def work_prepare(r: dict) -> dict[str, object]:
    """Save and convert the eval checkpoint; check once that both sides compute the same function."""
    import annseg

    folder = Path(r["folder"])
    height, width = r["eval_size"]
    save_mmseg_checkpoint(folder / "mmseg_ann_r50.pth", 64, 128)
    convert(folder / "mmseg_ann_r50.pth", folder / "annseg_ann_r50.pt")
    torch.set_num_threads(r["threads"])
    cpu = torch.device("cpu")
    x = eval_input(height, width, cpu)
    mmseg_model, annseg_network = load_mmseg_checkpoint(folder / "mmseg_ann_r50.pth", cpu), annseg.load(
        folder / "annseg_ann_r50.pt")
    with torch.inference_mode():
        theirs = mmseg_model.encode_decode(x, [_metas(height, width)])
        ours = annseg_network(x)
        flops = {"eval": {"annseg": count_gflop(lambda: annseg_network(x)),
                          "mmseg": count_gflop(lambda: mmseg_model.encode_decode(x, [_metas(height, width)]))}}
    flops["train"] = train_gflop(r["batch"], *r["train_size"])
    return {"argmax_agreement": (ours.argmax(1) == theirs.argmax(1)).double().mean().item(),
            "max_abs_logit_diff": (ours - theirs).abs().max().item(), "logit_scale": theirs.abs().max().item(),
            "gflop": flops}


def count_gflop(run: Callable[[], object]) -> float:
    """Floating-point operations of ``run()`` in G, as torch's FlopCounterMode counts them
    (convolutions and matrix products, forward and backward; 2 per multiply-accumulate)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 1e9


def train_gflop(batch: int, height: int, width: int) -> dict[str, float]:
    """Both sides' training step, counted once on the CPU after one step that builds SGD's buffers."""
    from annseg.models import create_model
    from annseg.models.zoo import MMSEG_OPTIONS

    cpu = torch.device("cpu")
    images, masks = random_batch(batch, height, width, cpu)
    steps = {"annseg": training_step(create_model("ann_resnet50", num_classes=NUM_CLASSES, **MMSEG_OPTIONS),
                                     images, masks, cpu)[0],
             "mmseg": mmseg_train_step(build_mmseg(cpu), images, masks)}
    counts = {}
    for side, step in steps.items():
        step()
        counts[side] = count_gflop(step)
    return counts


def work_case(r: dict) -> dict[str, object]:
    """Time and peak memory of one (side, work, lever)."""
    device = torch.device(r["device"])
    torch.set_num_threads(r["threads"])
    lever = r["lever"]
    precision = "bf16" if lever == "bf16" else "fp32"
    if r["work"] == "train":
        height, width = r["train_size"]
        if r["side"] == "annseg":
            from annseg.models.zoo import MMSEG_OPTIONS

            return measure_train("ann_resnet50", height, width, r["batch"], device, r["repeats"], r["warmup"],
                                 r["threads"], MMSEG_OPTIONS, precision, lever == "compile", parts=False)
        model = build_mmseg(device)
        torch.manual_seed(0)
        step = mmseg_train_step(model, *random_batch(r["batch"], height, width, device))
        return measure_step(step, device, r["repeats"], r["warmup"])
    height, width = r["eval_size"]
    folder = Path(r["folder"])
    x = eval_input(height, width, device)
    if r["side"] == "annseg":
        import annseg

        network = annseg.load(folder / "annseg_ann_r50.pt").to(device)
        run = torch.compile(network) if lever == "compile" else network
    else:
        model = load_mmseg_checkpoint(folder / "mmseg_ann_r50.pth", device)
        metas = [_metas(height, width)]

        def run(images: torch.Tensor) -> torch.Tensor:
            return model.encode_decode(images, metas)

    def forward() -> None:
        with torch.inference_mode(), autocast(device, precision):
            run(x)

    return measure_step(forward, device, r["repeats"], r["warmup"])


def _worker(request_json: str) -> None:
    request = json.loads(request_json)
    record = work_prepare(request) if request["side"] == "prepare" else work_case(request)
    print(json.dumps(record))


# --- the run, its results and their rendering -----------------------------------------------------

def run_all(args: argparse.Namespace) -> dict[str, object]:
    """Every (side, work, lever) in a fresh process; the results record."""
    device = resolve_device(args.device)
    threads = args.threads or torch.get_num_threads()
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    base = {"device": str(device), "threads": threads, "repeats": repeats, "warmup": max(args.warmup, 1),
            "batch": args.batch, "train_size": list(args.train_size), "eval_size": list(args.eval_size)}
    plan = [(side, work, "fp32") for work in WORKS for side in ("annseg", "mmseg")]
    plan += [("annseg", work, lever) for work in WORKS for lever in LEVERS[work] if lever in args.levers]
    cases = []
    if not native_bf16(device):  # torch's bf16 fallback would be timed, not bf16
        skipped = [case for case in plan if case[2] == "bf16"]
        plan = [case for case in plan if case[2] != "bf16"]
        cases += [{"side": side, "work": work, "lever": lever,
                   "error": "not measured: no native bf16 on this device (a CPU needs AVX512-BF16 or AMX)"}
                  for side, work, lever in skipped]
    with tempfile.TemporaryDirectory(prefix="mmseg-ann-") as folder:
        agreement = _run({**base, "side": "prepare", "folder": folder})
        print(f"[prepare] {agreement}", file=sys.stderr, flush=True)
        for index, (side, work, lever) in enumerate(plan, 1):
            record = {"side": side, "work": work, "lever": lever,
                      **_run({**base, "side": side, "work": work, "lever": lever, "folder": folder})}
            cases.append(record)
            status = record.get("error") or f"{record['time_ms']:,.1f} ms {record['peak_mib']:,.0f} MiB"
            print(f"[{index}/{len(plan)}] {side:<6} {work:<5} {lever:<7} {status}", file=sys.stderr, flush=True)
    versions = {name: metadata.version(name) for name in ("mmsegmentation", "mmengine", "mmcv-lite", "torch")}
    command = "python " + shlex.join(["benchmarks/peers/mmseg_ann.py", *sys.argv[1:]])
    return {"kind": "mmseg-side-by-side", "command": command,
            "machine": describe(device, threads), "versions": versions, **base, "agreement": agreement, "cases": cases}


def _run(request: dict) -> dict[str, object]:
    return run_process([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(request)])


def _cell(case: dict | None) -> str:
    if case is None:
        return "not run"
    return case["error"] if "error" in case else f"{case['time_ms']:,.0f} ms, {case['peak_mib']:,.0f} MiB"


def _ratio(ours: dict | None, theirs: dict | None, key: str) -> str:
    if not ours or not theirs or "error" in ours or "error" in theirs or not theirs[key]:
        return "-"
    return f"{ours[key] / theirs[key]:.2f}x"


def render_markdown(result: dict) -> str:
    """The side-by-side table (fp32, annseg's defaults), annseg's lever rows, the agreement check."""
    b, (th, tw), (eh, ew) = result["batch"], result["train_size"], result["eval_size"]
    works = {"train": f"training step, {b}x3x{th}x{tw} (CE + 0.4 aux, SGD)",
             "eval": f"eval forward, 1x3x{eh}x{ew} (converted checkpoint, `annseg.load`)"}
    find = {(c["side"], c["work"], c["lever"]): c for c in result["cases"]}
    v = result["versions"]
    lines = [
        f"annseg against mmsegmentation {v['mmsegmentation']} (mmengine {v['mmengine']}, mmcv-lite {v['mmcv-lite']}) "
        f"ANN-R50, each side in a fresh process on the same machine, in one run; time is the median of "
        f"{result['repeats']} runs after {result['warmup']} untimed, peak memory is above the built model and its "
        f"inputs (training: gradients and momentum count). {machine_line(result)}",
        "",
        "| work | annseg | mmseg | time, annseg / mmseg | peak memory, annseg / mmseg |",
        "|---|---:|---:|---:|---:|",
    ]
    for work, label in works.items():
        ours, theirs = find.get(("annseg", work, "fp32")), find.get(("mmseg", work, "fp32"))
        lines.append(f"| {label} | {_cell(ours)} | {_cell(theirs)} | {_ratio(ours, theirs, 'time_ms')} "
                     f"| {_ratio(ours, theirs, 'peak_mib')} |")
    levers = [c for c in result["cases"] if c["side"] == "annseg" and c["lever"] != "fp32"]
    if levers:
        lines += ["", "annseg's opt-in levers, against the same mmseg fp32 runs (with `compile`, the first "
                  "warm-up run compiles and its memory counts):", "",
                  "| work | lever | annseg | time, annseg / mmseg | peak memory, annseg / mmseg |",
                  "|---|---|---:|---:|---:|"]
        for c in levers:
            theirs = find.get(("mmseg", c["work"], "fp32"))
            lines.append(f"| {works[c['work']]} | {c['lever']} | {_cell(c)} | {_ratio(c, theirs, 'time_ms')} "
                         f"| {_ratio(c, theirs, 'peak_mib')} |")
    a = result["agreement"]
    if "error" in a:
        lines += ["", f"Agreement check on the eval input failed: {a['error']}"]
    else:
        lines += ["", f"Both sides compute the same function: on the eval input their argmax agrees at "
                  f"{100 * a['argmax_agreement']:.3f}% of pixels, the largest logit difference is "
                  f"{a['max_abs_logit_diff']:.2e} (logits up to {a['logit_scale']:.2f})."]
        if "gflop" in a:
            counted = "; ".join(f"{works[w].split(',')[0]}: annseg {g['annseg']:,.0f} GFLOP, mmseg {g['mmseg']:,.0f} "
                                f"({g['annseg'] / g['mmseg']:.2f}x)" for w, g in a["gflop"].items())
            lines += ["", f"Arithmetic of each side (torch's FlopCounterMode: convolutions and matrix products, "
                      f"forward and backward), fp32: {counted}. At the same arithmetic speed the time ratios would be "
                      f"these."]
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def write_results(result: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(render_markdown(result))
    return out / "results.json", out / "results.md"


def update_readme_block(readme: Path, results: Path) -> None:
    """Replace the README's side-by-side block with the table of ``results`` (a results.json)."""
    if not results.is_file():
        raise FileNotFoundError(f"{results} does not exist; run this script without --readme first")
    update_readme(readme, render_markdown(json.loads(results.read_text())), README_START, README_END)


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 384x384") from None
    return height, width


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-size", type=_size, default=(384, 384), metavar="HxW", help="training crop (384x384)")
    parser.add_argument("--batch", type=int, default=2, help="training batch (2)")
    parser.add_argument("--eval-size", type=_size, default=(512, 1024), metavar="HxW", help="eval image (512x1024)")
    parser.add_argument("--levers", nargs="*", default=["bf16", "compile"], choices=["bf16", "compile"],
                        help="annseg's opt-in levers to measure beside the fp32 rows (bf16 compile)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (3 on the CPU, 20 on a GPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (1; at least 1)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch's default)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for results.json and results.md")
    parser.add_argument("--readme", type=Path, default=None,
                        help="only render --out's results.json into this README's side-by-side block")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return _worker(args.worker)
    if args.readme is not None:
        update_readme_block(args.readme, args.out / "results.json")
        print(f"updated {args.readme} from {args.out / 'results.json'}")
        return
    json_path, md_path = write_results(run_all(args), args.out)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
