"""The ``annseg`` command. Library code never prints; this module reports."""

from __future__ import annotations

import argparse
import errno
import logging
import math
import re
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from annseg import __version__
from annseg.bench.blocks import BASELINES, BLOCKS as BLOCK_NAMES, DEFAULT_BLOCKS


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
        if height < 1 or width < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HEIGHTxWIDTH with positive ints, e.g. 128x256")
    return height, width


def _anchor_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(","))
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"anchor sizes {text!r} are not comma-separated positive ints, e.g. 1,3,6,8")
    return sizes


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``low``, else an error naming the value."""
    what = "a positive int" if low == 1 else f"an int >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
            if value < low:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def _scale(text: str) -> float:
    try:
        value = float(text)
        if not (math.isfinite(value) and value > 0):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 0, e.g. 0.75 1.0 1.25")
    return value


def _coordinate(text: str) -> int | float:
    """An image coordinate: an int, or a float for a position between pixel corners."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (image pixels), got {text!r}") from None
    return int(value) if value.is_integer() else value


def _out_path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("the output path is empty; name a folder or file")
    return Path(text)


def _devices(text: str) -> int | list[int] | str:
    """Lightning's devices: ``auto``, a count (``2``) or device indices (``0,1``); not 0 or -1."""
    if text == "auto":
        return text
    try:
        if "," in text:
            indices = [int(part) for part in text.split(",") if part.strip()]
            if not indices or min(indices) < 0 or len(set(indices)) < len(indices):
                raise ValueError
            return indices
        count = int(text)
        if count < 1:
            raise ValueError
        return count
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not auto, a number of devices >= 1 (e.g. 2) or distinct "
                                         "device indices (e.g. 0,1)")


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")  # Lightning's names


def _warn_slow_bf16(precision: object, device_type: str) -> None:
    """bf16 on a CPU without native bf16 kernels runs correctly but through torch's slow reference
    kernels (about a hundred times fp32's time for a wide matmul): say so before a long run."""
    if "bf16" not in str(precision) or device_type != "cpu":
        return
    import torch

    from annseg.bench.machine import native_bf16

    if not native_bf16(torch.device("cpu")):
        print(f"annseg: warning: precision {precision} on a CPU without native bf16 (AVX512-BF16 or AMX): torch "
              "runs bf16 through slow reference kernels here, far slower than fp32; fp32 is the faster choice on "
              "this machine", file=sys.stderr, flush=True)


def _check_hardware(accelerator: str, devices: int | list[int] | str) -> str:
    """Refuse, before Lightning does with a traceback, hardware this machine does not have; the
    kind of device the run will use ("cpu", "cuda", "mps", "tpu")."""
    import importlib.util

    import torch

    counts = {"cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    counts["gpu"] = counts["cuda"] or counts["mps"]
    kind = accelerator
    if accelerator == "auto":
        kind = "cuda" if counts["cuda"] else "mps" if counts["mps"] else "cpu"
    if kind == "tpu":
        if importlib.util.find_spec("torch_xla") is None:
            raise ValueError("--accelerator tpu needs torch_xla, which is not installed; use --accelerator auto")
        return kind
    if kind == "cpu":
        if isinstance(devices, list):
            raise ValueError(f"--devices {','.join(map(str, devices))}: device indices need a GPU and this run uses "
                             "the CPU; give a number of processes (e.g. --devices 2) or --accelerator gpu")
        return kind
    have = counts[kind]
    if have == 0:
        raise ValueError(f"--accelerator {accelerator}: torch sees no {kind} device on this machine; use "
                         "--accelerator cpu or auto")
    if isinstance(devices, int) and devices > have:
        raise ValueError(f"--devices {devices}: this machine has {have} {kind} device(s)")
    if isinstance(devices, list) and max(devices) >= have:
        raise ValueError(f"--devices {','.join(map(str, devices))}: device index {max(devices)} does not exist; "
                         f"this machine has {have} {kind} device(s), 0 to {have - 1}")
    return kind


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="annseg",
        description="Asymmetric Non-local Neural Networks for semantic segmentation (Zhu et al., ICCV 2019).",
    )
    parser.add_argument("--version", action="version", version=f"annseg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="list the named models with their parameter counts")
    models.add_argument("--num-classes", type=_positive, default=19, help="classes of the classifier (default 19)")
    models.set_defaults(run=_cmd_models)

    configs = commands.add_parser("configs", help="list the packaged run configs (--config NAME)")
    configs.set_defaults(run=_cmd_configs)

    bench = commands.add_parser("bench", help="efficiency benchmarks")
    bench_commands = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    blocks = bench_commands.add_parser(
        "blocks",
        help="plain NB vs NonLocal2d vs APNB vs AFNB (and DenseASPP, PSA, CC): the paper's efficiency table, completed",
        description="Forward and training (forward + backward) time, peak memory and "
        "multiply-accumulates of the attention part of each block on (1, C, H, W) inputs, each "
        "case in a fresh subprocess. --anchors with several sets sweeps APNB's pooling sizes.",
    )
    blocks.add_argument("--sizes", type=_size, nargs="+", metavar="HxW",
                        help="input sizes (default: the paper's 96x96 128x128 128x256)")
    blocks.add_argument("--quick", action="store_true",
                        help="small sizes (24x24 32x32 32x64), 3 repeats, forward only: a quick check")
    blocks.add_argument("--blocks", nargs="+", choices=list(BLOCK_NAMES), default=list(DEFAULT_BLOCKS),
                        help=f"blocks to measure (default: {' '.join(DEFAULT_BLOCKS)}); the other papers' "
                        f"context modules {' '.join(BASELINES)} on request (PSA's memory grows as N^2)")
    blocks.add_argument("--channels", type=_positive, default=2048, help="input and output channels (2048)")
    blocks.add_argument("--key-channels", type=_positive, default=256, help="Ck (256)")
    blocks.add_argument("--value-channels", type=_positive, default=256, help="Cv (256)")
    blocks.add_argument("--anchors", type=_anchor_sizes, nargs="+", default=[(1, 3, 6, 8)], metavar="S1,S2,...",
                        help="APNB pooling sizes (1,3,6,8); several sets sweep them, e.g. 1 1,2 1,3,6,8 1,2,3,6")
    blocks.add_argument("--forward-only", action="store_true", help="skip the training (forward + backward) runs")
    _add_run_options(blocks, "bench-out/blocks", "20 on a GPU, the paper's protocol; 5 on the CPU; 3 with --quick")
    blocks.set_defaults(run=_cmd_bench_blocks)

    model = bench_commands.add_parser(
        "model",
        help="whole-network forward latency and peak memory, with each part's share of the time",
        description="Forward latency and peak memory of named models (eval mode, batch 1) and "
        "the share of time spent in the backbone, AFNB, APNB and the head, each model and size "
        "in a fresh subprocess.",
    )
    model.add_argument("--models", nargs="+", default=None, metavar="NAME",
                       help="named models (default: the ResNet-101 ablation variants fcn, nb, apnb, afnb, ann)")
    model.add_argument("--sizes", type=_size, nargs="+", metavar="HxW",
                       help="image sizes (default: 512x1024 1024x2048 on a GPU, 256x512 512x1024 on the CPU)")
    model.add_argument("--no-fuse", action="store_true",
                       help="keep the blocks' BatchNorms and W unfolded (default: fuse_for_inference())")
    model.add_argument("--tf32", action="store_true",
                       help="CUDA matmuls in TF32, as cuDNN runs the backbone's convolutions by default")
    _add_lever_options(model)
    _add_run_options(model, "bench-out/model", "20 on a GPU, the paper's protocol; 3 on the CPU")
    model.set_defaults(run=_cmd_bench_model)

    train = bench_commands.add_parser(
        "train",
        help="whole-network training step time and peak memory, split into backbone, AFNB, APNB, heads, loss, "
        "optimiser",
        description="One SGD training step as annseg trains (cross-entropy + 0.4 x auxiliary, no OHEM; SGD lr 0.01, "
        "momentum 0.9, weight decay 5e-4) of named models on random batches: time, peak memory (gradients and "
        "momentum included) and each part's forward and backward time, each model and size in a fresh subprocess. At least one warm-up step runs (the "
        "first step allocates SGD's momentum buffers).",
    )
    train.add_argument("--models", nargs="+", default=["ann_resnet50"], metavar="NAME",
                       help="named models (ann_resnet50)")
    train.add_argument("--sizes", type=_size, nargs="+", default=[(384, 384)], metavar="HxW",
                       help="crop sizes (384x384)")
    train.add_argument("--batch", type=_positive, default=2, help="images per step (2)")
    train.add_argument("--mmseg-options", action="store_true",
                       help="build with MMSEG_OPTIONS, the settings under which the network computes "
                       "mmsegmentation's ANN")
    _add_lever_options(train)
    _add_run_options(train, "bench-out/train", "20 on a GPU; 3 on the CPU")
    train.set_defaults(run=_cmd_bench_train)

    readme = bench_commands.add_parser(
        "readme",
        help="regenerate the README's efficiency section and plots from committed results",
        description="Reads every results.json below --results, draws the plots into it and "
        "replaces the text between the README's benchmark markers.",
    )
    readme.add_argument("--results", type=Path, default=Path("benchmarks"), help="results folder (benchmarks)")
    readme.add_argument("--readme", type=Path, default=Path("README.md"), help="the README to update (README.md)")
    readme.set_defaults(run=_cmd_bench_readme)
    _add_pipeline_commands(commands)
    return parser


DEFAULT_RUN = Path("runs/default")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, metavar="NAME|YAML",
                        help="a packaged config by name (`annseg configs` lists them, e.g. cityscapes) or a YAML "
                             "file (default: the built-in dataset and a small ANN)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.max_iters=1000 (repeatable)")


def _add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_RUN / "checkpoints" / "last.ckpt",
                        help=f"trained checkpoint (default: {DEFAULT_RUN}/checkpoints/last.ckpt, what "
                             "`annseg train` writes by default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the checkpoint's config, e.g. --set data.root=/data/cityscapes "
                             "or --set eval.mode=slide")
    parser.add_argument("--mode", choices=("whole", "slide"), default=None, help="inference mode (config: eval.mode)")
    parser.add_argument("--scales", type=_scale, nargs="+", default=None, help="test scales (config: eval.scales)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="add horizontally flipped views (config: eval.flip)")
    parser.add_argument("--no-fuse", action="store_true",
                        help="keep every BatchNorm unfolded (default: folded into its conv for inference, "
                             "the same function up to rounding)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")


def _add_pipeline_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train", help="train a model (default: the built-in dataset, a few minutes on a CPU)",
        description="Train with SGD + poly lr on OHEM + 0.4 aux loss. Checkpoints, CSV/TensorBoard logs and the "
        "final validation scores go to --out. Several GPUs or nodes: --devices N (and --num-nodes), or launch "
        "with torchrun / srun, which Lightning detects.")
    _add_config_arguments(train)
    train.add_argument("--out", type=_out_path, default=None,
                       help="run folder (default: runs/<config name>, e.g. runs/cityscapes; runs/default without "
                            "--config)")
    train.add_argument("--resume", default=None, metavar="CKPT|latest",
                       help="continue from a checkpoint; 'latest' = the newest whole checkpoint in "
                            "<out>/checkpoints (last.ckpt or iter_*.ckpt, damaged ones skipped), or iteration 0 "
                            "when there is none")
    train.add_argument("--accelerator", default="auto", choices=ACCELERATORS,
                       help="auto (default), cpu, gpu, cuda, mps or tpu (Lightning's names)")
    train.add_argument("--devices", type=_devices, default="auto",
                       help="devices per node: auto (default), a number (e.g. 2) or GPU indices (e.g. 0,1)")
    train.add_argument("--num-nodes", type=_positive, default=1)
    train.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    train.set_defaults(run=_cmd_train)

    evaluate = commands.add_parser(
        "eval", help="mIoU, per-class IoU and pixel accuracy of a checkpoint on a split",
        description="Evaluates on the checkpoint's dataset (override with --set data.root=...). Whole-image, "
        "sliding-window and multi-scale + flip inference; writes the scores as JSON.")
    _add_inference_arguments(evaluate)
    evaluate.add_argument("--split", default=None, help="dataset split (default: the config's data.val_split)")
    evaluate.add_argument("--out", type=_out_path, default=None,
                          help="scores JSON (default: <run folder>/eval-<split>.json, the run folder being the one "
                               "that holds checkpoints/)")
    evaluate.set_defaults(run=_cmd_eval)

    predict = commands.add_parser(
        "predict", help="label PNGs and colour overlays for images or folders",
        description="Writes <out>/<name>.png (class ids, with the class colours as palette) and the overlay "
        "<out>/<name>_overlay.png, or with --format cityscapes the official Cityscapes label ids that the "
        "benchmark server expects (no overlays). Outputs mirror the inputs' tree: a single folder's images keep "
        "their paths relative to it (photos/2024/x.jpg -> <out>/2024/x.png); any other inputs keep theirs "
        "relative to the deepest folder holding them all (a/x.png b/x.png x.jpg -> <out>/a/x.png, <out>/b/x.png, "
        "<out>/x.png). Two inputs that would still write the same file (x.png and x.jpg of one folder, or "
        "x_overlay.png beside x.png) are an error before anything is written. Overlays are PNGs upscaled "
        "(nearest-neighbour) to a short side of at least 256 px, with a legend of the classes present; class 0 "
        "named like a background (background, bg, void, unlabeled, other) is left uncoloured.")
    predict.add_argument("inputs", nargs="+", type=Path, help="image files or folders (searched recursively)")
    _add_inference_arguments(predict)
    predict.add_argument("--out", type=_out_path, default=Path("predictions"), help="output folder (predictions)")
    predict.add_argument("--format", choices=("color", "cityscapes"), default="color",
                         help="color: palette PNG + overlay; cityscapes: label-id PNGs for the test server")
    predict.add_argument("--overlay", choices=("blend", "panels", "none"), default=None,
                         help="the picture beside each label PNG: blend = the classes mixed 50%% into the photo "
                              "(default), panels = image | prediction side by side, none = no picture; "
                              "--format cityscapes writes none")
    predict.set_defaults(run=_cmd_predict)

    plot = commands.add_parser(
        "plot", help="training curves of a run as a PNG (loss, lr, val mIoU, per-class IoU)",
        description="Reads RUN_DIR/logs/metrics.csv and draws the training loss, the learning rate, the val mIoU "
        "and, when the log has columns such as val/IoU/<class>, each class's IoU against the logged step. "
        "Needs matplotlib: pip install \"annseg[plot]\".")
    plot.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder written by annseg train / demo")
    plot.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    plot.set_defaults(run=_cmd_plot)

    convert = commands.add_parser(
        "convert", help="a published checkpoint (mmsegmentation's, the authors') as an annseg checkpoint",
        description="Renames every tensor of CKPT to annseg's layout, infers the model (depth, widths, classes) "
        "from the shapes, loads it strictly (a key left over on either side is an error listing it) and writes an "
        "annseg checkpoint that `annseg eval` and `annseg predict` read.")
    convert.add_argument("format", choices=_Names(_converter_names), metavar="FORMAT",
                         help="who wrote CKPT: %(choices)s")
    convert.add_argument("checkpoint", type=Path, metavar="CKPT", help="the published checkpoint (.pth)")
    convert.add_argument("out", type=_out_path, metavar="OUT", help="the annseg checkpoint to write")
    convert.add_argument("--dataset", choices=_Names(_dataset_names), default=None, metavar="NAME",
                         help="the dataset it was trained on (%(choices)s), for class names and the eval config "
                              "(default: the checkpoint's own names, else the dataset its class count suggests)")
    convert.set_defaults(run=_cmd_convert)

    export = commands.add_parser("export", help="export a trained model: onnx, or its weights alone")
    formats = export.add_subparsers(dest="format", required=True, metavar="FORMAT")
    onnx = formats.add_parser(
        "onnx", help="ONNX file of the network, checked against PyTorch with onnxruntime",
        description="Writes the network's eval forward as ONNX (default opset 18, torch.export-based exporter): "
        "input 'image' float32 (B, 3, H, W), RGB in [0, 1] minus mean over std (the checkpoint's normalisation, "
        "stored with the class names and palette in the file's metadata); output 'logits' (B, K, H, W), whose "
        "argmax over K is the label map. Then runs random inputs through onnxruntime and PyTorch and prints the "
        "largest absolute difference. Needs pip install \"annseg[onnx]\".")
    _add_export_files(onnx, "ONNX file", "model.onnx")
    onnx.add_argument("--height", type=_positive, default=None, help="input height (default: the config's "
                      "data.crop_size); with --dynamic the size traced and checked")
    onnx.add_argument("--width", type=_positive, default=None, help="input width (default: data.crop_size)")
    onnx.add_argument("--dynamic", action="store_true",
                      help="batch, height and width free at run time (default: fixed 1 x 3 x H x W)")
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset, 17 to 23 (default 18, the exporter's own)")
    onnx.set_defaults(run=_cmd_export_onnx)
    weights = formats.add_parser(
        "weights", help="the network and its metadata alone: a small checkpoint for eval, predict and annseg.load",
        description="Writes the network's weights with the class names, palette, normalisation and config of a "
        "training checkpoint, without the optimiser state, lr schedule and RNG states (about half the size "
        "for SGD with momentum). eval, predict, annseg.load and train.init_from read it; --resume does not.")
    _add_export_files(weights, "checkpoint of the weights", "model.ckpt")
    weights.set_defaults(run=_cmd_export_weights)

    attention = commands.add_parser(
        "attention", help="a picture of where chosen pixels attend: APNB's or AFNB's weights over its anchors",
        description="Runs the network once on IMAGE at its own size and draws, for each --at point, the image "
        "with the point marked and one panel per pyramid level (1x1, 3x3, 6x6, 8x8): each pooled cell shades "
        "the image pixels its bin averages by its attention weight (overlapping bins add up). A point (x, y) maps "
        "to feature row floor(y * H_f / H) and column floor(x * W_f / W).")
    attention.add_argument("image", type=Path, metavar="IMAGE", help="the image file")
    attention.add_argument("--checkpoint", type=Path, default=DEFAULT_RUN / "checkpoints" / "last.ckpt",
                           help=f"trained checkpoint (default: {DEFAULT_RUN}/checkpoints/last.ckpt)")
    attention.add_argument("--at", dest="points", nargs=2, type=_coordinate, action="append", required=True,
                           metavar=("X", "Y"), help="a query point in image pixels, x then y (repeatable)")
    attention.add_argument("--block", choices=("apnb", "afnb"), default="apnb",
                           help="apnb (default): context-map queries over their own anchors; afnb: high-level "
                                "queries over the low-level map's anchors")
    attention.add_argument("--out", type=Path, default=Path("attention.png"), help="PNG to write (attention.png)")
    attention.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    attention.set_defaults(run=_cmd_attention)

    demo = commands.add_parser(
        "demo", help="the main job: train on the built-in dataset, evaluate, write overlays (minutes on a CPU)",
        description="Trains the default config (a small ANN on the generated dataset whose labels need "
        "long-range context), evaluates it, writes overlays and prints the per-class table.")
    _add_config_arguments(demo)
    demo.add_argument("--variant", choices=("fcn", "nb", "apnb", "afnb", "ann"), default=None,
                      help="network variant (default: the config's model.variant, ann)")
    demo.add_argument("--out", type=_out_path, default=None, help="run folder (default: runs/demo-<variant>)")
    demo.add_argument("--overlays", type=_non_negative, default=6, help="validation images to render (6)")
    demo.set_defaults(run=_cmd_demo)


def _add_export_files(parser: argparse.ArgumentParser, what: str, name: str) -> None:
    """``--checkpoint`` (what to export) and ``--out`` (the file written) of an export command."""
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_RUN / "checkpoints" / "last.ckpt",
                        help=f"trained checkpoint (default: {DEFAULT_RUN}/checkpoints/last.ckpt)")
    parser.add_argument("--out", type=_out_path, default=None,
                        help=f"{what} (default: <run folder>/{name}, the run folder being the one that holds "
                             "checkpoints/)")


def _checkpoint_run_folder(checkpoint: Path) -> Path:
    """The run folder of a checkpoint: the one holding ``checkpoints/``, else the checkpoint's own folder."""
    folder = checkpoint.parent
    return folder.parent if folder.name == "checkpoints" else folder


def _cmd_models(args: argparse.Namespace) -> None:
    from annseg.models import list_models
    from annseg.models.zoo import parameter_count

    names = list_models()
    width = max(map(len, names))
    print(f"{'model':<{width}} {'parameters':>12}   ({args.num_classes} classes)")
    for name in names:
        print(f"{name:<{width}} {parameter_count(name, args.num_classes):>12,}")


def _cmd_configs(args: argparse.Namespace) -> None:
    from annseg.configs import describe, packaged_configs

    rows = [describe(path) for path in packaged_configs().values()]
    width = max(len(row["name"]) for row in rows)
    print(f"{'config':<{width}}  {'dataset':<14}  description")
    for row in rows:
        print(f"{row['name']:<{width}}  {str(row['dataset']):<14}  {row['description']}")
    print("use with --config NAME, e.g. annseg train --config cityscapes --print-config")


def _add_run_options(parser: argparse.ArgumentParser, out: str, repeats: str) -> None:
    parser.add_argument("--repeats", type=_positive, default=None, help=f"timed runs per case ({repeats})")
    parser.add_argument("--warmup", type=_non_negative, default=1, help="untimed runs before timing (1)")
    parser.add_argument("--threads", type=_positive, default=None, help="CPU threads (torch's default)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--out", type=_out_path, default=Path(out), help=f"folder for results.json and results.md ({out})")


def _add_lever_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32, or bf16 autocast around the forward (and the loss) (fp32)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network (its parts are not split then)")
    parser.add_argument("--option", dest="options", type=_model_option, action="append", default=[],
                        metavar="KEY=VALUE",
                        help="a create_model option, the value read as YAML (e.g. dropout=0.1, sizes=[1,3]); "
                        "repeatable")


def _model_option(text: str) -> tuple[str, object]:
    from annseg.engine.config import ConfigError, parse_override

    try:
        ((key, value),) = parse_override(text).items()
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error))
    if isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"option {text!r}: KEY is one create_model option, without dots")
    return key, tuple(value) if isinstance(value, list) else value


def _model_options(args: argparse.Namespace, base: dict | None = None) -> dict:
    """``base`` with each ``--option KEY=VALUE`` over it, in order."""
    return {**(base or {}), **dict(args.options)}


def _device(args: argparse.Namespace) -> "torch.device":
    import torch

    from annseg.bench.blocks import resolve_device

    try:
        device = resolve_device(args.device)
    except RuntimeError:
        raise SystemExit(f"annseg: error: --device {args.device!r} is not a device (auto, cpu, cuda, cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("annseg: error: --device cuda was asked for but torch sees no CUDA device")
    return device


def _report(index: int, total: int, case: dict) -> None:
    name = case.get("block") or case.get("model")
    shape = f"[1,{case['channels']},{case['height']},{case['width']}]" if "channels" in case else \
        f"{case['height']}x{case['width']}"
    status = case.get("error") or " ".join(
        f"{label} {case[key]:9.1f} {unit}" for label, key, unit in
        (("step" if "batch" in case else "fwd", "time_ms", "ms"), ("", "peak_mib", "MiB"), ("train", "train_time_ms", "ms"),
         ("", "train_peak_mib", "MiB")) if key in case)
    print(f"[{index}/{total}] {name:<16} {shape:<18} {status}", file=sys.stderr, flush=True)


def _finish(result, args: argparse.Namespace, write_results) -> None:
    json_path, md_path = write_results(result, args.out)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")


def _cmd_bench_blocks(args: argparse.Namespace) -> None:
    from annseg.bench.blocks import PAPER_SIZES, QUICK_SIZES, run_blocks, write_results

    device = _device(args)
    sizes = args.sizes or (QUICK_SIZES if args.quick else PAPER_SIZES)
    repeats = args.repeats or (3 if args.quick else 20 if device.type == "cuda" else 5)
    result = run_blocks(
        sizes, blocks=args.blocks, channels=args.channels, key_channels=args.key_channels,
        value_channels=args.value_channels, anchor_sets=args.anchors, device=str(device),
        repeats=repeats, warmup=args.warmup, threads=args.threads, train=not (args.forward_only or args.quick),
        command="annseg " + shlex.join(sys.argv[1:]), on_case=_report,
    )
    _finish(result, args, write_results)


def _cmd_bench_model(args: argparse.Namespace) -> None:
    from annseg.bench.model import ABLATIONS, CPU_SIZES, GPU_SIZES, run_model, write_results
    from annseg.models import list_models

    device = _device(args)
    models = args.models or list(ABLATIONS)
    unknown = sorted(set(models) - set(list_models()))
    if unknown:
        raise SystemExit(f"annseg: error: unknown model(s) {unknown}; choose from {list_models()}")
    sizes = args.sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    result = run_model(models, sizes, device=str(device), repeats=repeats, warmup=args.warmup,
                       threads=args.threads, fuse=not args.no_fuse, tf32=args.tf32, options=_model_options(args),
                       precision=args.precision, compile=args.compile,
                       command="annseg " + shlex.join(sys.argv[1:]), on_case=_report)
    _finish(result, args, write_results)


def _cmd_bench_train(args: argparse.Namespace) -> None:
    from annseg.bench.train import run_train, write_results
    from annseg.models.zoo import MMSEG_OPTIONS

    device = _device(args)
    result = run_train(args.models, args.sizes, batch=args.batch,
                       options=_model_options(args, MMSEG_OPTIONS if args.mmseg_options else None),
                       precision=args.precision, compile=args.compile, device=str(device),
                       repeats=args.repeats or (20 if device.type == "cuda" else 3), warmup=args.warmup,
                       threads=args.threads, command="annseg " + shlex.join(sys.argv[1:]), on_case=_report)
    _finish(result, args, write_results)


def _cmd_bench_readme(args: argparse.Namespace) -> None:
    from annseg.bench.report import update_readme_section

    if not args.readme.is_file():
        raise SystemExit(f"annseg: error: --readme {args.readme} does not exist")
    for path in update_readme_section(args.readme, args.results):
        print(f"wrote {path}")
    print(f"updated the efficiency section of {args.readme}")


def _quiet_lightning() -> None:
    """Keep Lightning's banner lines and known third-party deprecation noise off the terminal."""
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    for pattern in (".*LeafSpec.*", ".*litlogger.*", ".*smaller than the logging interval.*",
                    ".*does not have many workers.*", ".*sync_dist=True.*",
                    # resuming: the checkpoint folder is meant to be there, and the train sampler
                    # continues at the checkpoint's iteration (IterationSampler), so it is resumable
                    ".*Checkpoint directory .* exists and is not empty.*", ".*dataloader is not resumable.*"):
        warnings.filterwarnings("ignore", message=pattern)


def _training_progress():
    """A progress bar on a terminal; plain lines every 30 s in a log file (batch jobs), where a bar's
    carriage returns and cursor moves would garble it."""
    if sys.stderr.isatty():
        return 1
    from annseg.engine.progress import LineProgressBar

    return LineProgressBar()


def _progress(items, desc: str, unit: str):
    """``items`` with a progress bar on a terminal, or plain progress lines in a log file."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit=unit, file=sys.stderr)
    from annseg.engine.progress import progress_lines

    return progress_lines(items, desc, unit)


def check_out_folder(folder: Path, flag: str = "--out") -> None:
    """Stop before any work when ``folder`` cannot receive the run's files.

    It must be a folder or not exist yet, and its nearest existing folder must take a new
    file. That is a write probe (an unnamed temporary file), not the permission bits: root
    writes into a ``chmod a-w`` folder and nobody writes to a read-only mount.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"is inside {existing}, which is a file"
        raise NotADirectoryError(f"{flag} {folder} {where}; expected a folder: choose another {flag}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise PermissionError(f"{flag} {folder}: cannot write in {existing} ({error.strerror or error}); "
                              f"choose a writable {flag}") from None


def check_out_file(path: Path, flag: str = "--out") -> None:
    """``check_out_folder`` for a single output file: ``path`` must not be a folder."""
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a directory; expected the path of the file to write")
    check_out_folder(path.parent, flag)


def _run_folder(args: argparse.Namespace, prefix: str = "") -> Path:
    if args.out is not None:
        return args.out
    return Path("runs") / (prefix + (args.config.stem if args.config is not None else "default"))


def _cmd_train(args: argparse.Namespace) -> None:
    from annseg.engine import Hardware, dump_config, fit, format_table, load_config

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(config), end="")
        return
    out = _run_folder(args)
    check_out_folder(out)
    _warn_slow_bf16(config.train.precision, _check_hardware(args.accelerator, args.devices))
    _quiet_lightning()
    scores = fit(config, out, resume=args.resume, progress=_training_progress(),
                 hardware=Hardware(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes))
    if scores.get("world_size", 1) > 1:
        # One write of the whole line: the ranks share the terminal, and print()'s separate
        # newline could land after the other rank's line on an unbuffered stream.
        sys.stdout.write(f"rank {scores['rank']}/{scores['world_size']}: val mIoU {scores['mIoU']:.6f}\n")
        sys.stdout.flush()
    if scores.get("rank", 0) == 0:
        print(format_table(scores))
        print(f"checkpoints in {out / 'checkpoints'}, logs in {out / 'logs'}, scores in {out / 'metrics.json'}")


def _require_default_checkpoint(checkpoint: Path) -> None:
    """The default checkpoint is missing until `annseg train` ran: say so (other paths: load_model says)."""
    if not checkpoint.is_file() and checkpoint == DEFAULT_RUN / "checkpoints" / "last.ckpt":
        raise FileNotFoundError(f"no checkpoint at {checkpoint}: run `annseg train` first, or name one "
                                "with --checkpoint")


def _inference_setup(args: argparse.Namespace):
    """The checkpoint's model and config, with the command line's overrides applied."""
    from annseg.engine import load_model
    from annseg.engine.config import apply_overrides, config_from_dict

    _require_default_checkpoint(args.checkpoint)
    model, meta = load_model(args.checkpoint, fuse=not args.no_fuse)
    values = apply_overrides(meta["config"].to_dict(), args.overrides)
    for key, value in (("mode", args.mode), ("scales", args.scales), ("flip", args.flip)):
        if value is not None:
            values["eval"][key] = value
    config = config_from_dict(values)
    device = _device(args)
    _warn_slow_bf16(config.eval.precision, device.type)
    return model, meta, config, device


def _cmd_eval(args: argparse.Namespace) -> None:
    from annseg.engine import format_table
    from annseg.engine.train import write_json
    from annseg.engine.builders import build_val_dataset
    from annseg.engine.evaluate import evaluate

    model, meta, config, device = _inference_setup(args)
    split = args.split or config.data.val_split
    out = args.out or _checkpoint_run_folder(args.checkpoint) / f"eval-{split}.json"
    check_out_file(out)
    dataset = build_val_dataset(config, split)
    scores = evaluate(model, dataset, meta["classes"], config.eval, device=device,
                      num_workers=config.data.num_workers,
                      progress=lambda items: _progress(items, f"eval {split}", "img"))
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"checkpoint": str(args.checkpoint), "split": split, "eval": config.to_dict()["eval"], **scores}
    write_json(out, record)
    print(format_table(scores))
    print(f"wrote {out}")


def _cmd_predict(args: argparse.Namespace) -> None:
    from annseg.data import read_image
    from annseg.engine.predict import plan_outputs
    from annseg.engine.segmenter import Segmenter
    from annseg.viz import overlay_picture, panels_picture

    check_out_folder(args.out)
    if args.format == "cityscapes" and args.overlay not in (None, "none"):
        raise ValueError(f"--format cityscapes writes label ids only (the test server reads every PNG); drop "
                         f"--overlay {args.overlay}")
    kind = args.overlay or ("none" if args.format == "cityscapes" else "blend")
    plan = plan_outputs(args.inputs, args.out, overlays=kind != "none")
    model, meta, config, device = _inference_setup(args)
    segmenter = Segmenter.from_meta(model, meta, config.eval).to(device)
    if args.format == "cityscapes":
        from annseg.data import cityscapes_label_ids

        if segmenter.num_classes != 19:
            raise ValueError(f"--format cityscapes needs a 19-class Cityscapes model; {args.checkpoint} "
                             f"has {segmenter.num_classes} classes")
    for item in _progress(plan, "predict", "img"):
        image = read_image(item.source)
        labels = segmenter.predict(image)
        item.labels.parent.mkdir(parents=True, exist_ok=True)
        if args.format == "cityscapes":
            from PIL import Image

            Image.fromarray(cityscapes_label_ids(labels).astype("uint8")).save(item.labels)
            continue
        segmenter.colorize(labels).save(item.labels)
        rgb = image.permute(1, 2, 0).numpy()
        if kind == "blend":
            overlay_picture(rgb, labels, segmenter.classes, segmenter.palette).save(item.overlay)
        elif kind == "panels":
            panels_picture(rgb, [("prediction", labels)], segmenter.classes, segmenter.palette).save(item.overlay)
    overlays = "" if kind == "none" else f" and {kind} overlays"
    print(f"wrote {len(plan)} label PNG(s){overlays} to {args.out}")


def _cmd_plot(args: argparse.Namespace) -> None:
    from annseg.viz.curves import plot_curves

    print(f"wrote {plot_curves(args.run_dir, args.out)}")


class _Names:
    """argparse choices read when first needed: the converters import timm and Lightning
    (seconds), which no other command should wait for while its parser is built."""

    def __init__(self, names: Callable[[], list[str]]) -> None:
        self.names = names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self.names()


def _converter_names() -> list[str]:
    from annseg.convert import CONVERTERS

    return sorted(CONVERTERS)


def _dataset_names() -> list[str]:
    from annseg.convert.common import DATASET_BY_CLASSES

    return sorted(DATASET_BY_CLASSES.values())


def _cmd_convert(args: argparse.Namespace) -> None:
    from annseg.convert import CONVERTERS
    from annseg.engine.checkpoint import save_model

    check_out_file(args.out, "OUT")
    model, meta = CONVERTERS[args.format](args.checkpoint, dataset=args.dataset)
    save_model(args.out, model, meta)
    config = meta["config"]
    name = f"{config['model']['variant']}_{config['model']['backbone']}"
    dataset = config["data"]["dataset"]
    print(f"converted {args.format} checkpoint {args.checkpoint}: {meta['converted_from']['tensors']} tensors -> "
          f"{name} with options {config['model']['options']}, {len(meta['classes'])} classes "
          f"({dataset}: {', '.join(meta['classes'][:4])}{', ...' if len(meta['classes']) > 4 else ''})")
    source = meta["converted_from"]
    if source["format"] == "mmseg":
        print(f"settings read from its config ({source['config']}): key_pool_scales, dropout_ratio, align_corners, "
              "checked against the weights" if source["config"] else
              "its file holds no config: mmseg's ANN defaults assumed (key_pool_scales (1, 3, 6, 8), "
              "dropout_ratio 0.1, align_corners False)")
    print(_eval_settings(config["eval"], source["eval_from"]))
    print(f"wrote {args.out}; evaluate with: annseg eval --checkpoint {args.out} --set data.root=/path/to/{dataset}"
          + (" --set data.dataset=folder" if dataset == "folder" else "")
          + f"; predict with: annseg predict IMAGES --checkpoint {args.out}")


def _eval_settings(evaluation: dict, origin: str) -> str:
    """One line: the test protocol a converted checkpoint carries, and where it comes from."""
    crop, stride = ("x".join(map(str, evaluation[k])) for k in ("crop_size", "stride"))
    short = f", short side {evaluation['short_side']}" if evaluation["short_side"] else ""
    line = (f"eval settings ({origin}): mode {evaluation['mode']}, scales {evaluation['scales']}, "
            f"flip {'on' if evaluation['flip'] else 'off'}{short}; --mode slide uses {crop} windows, stride {stride}")
    if origin == "built-in defaults":
        line += (" (sized for the built-in dataset: name the dataset with --dataset, or set eval.crop_size and "
                 "eval.stride with --set when evaluating)")
    return line


def _cmd_export_onnx(args: argparse.Namespace) -> None:
    import torch

    from annseg.engine.checkpoint import load_model
    from annseg.engine.export import check_onnx, export_onnx, require_onnx, validate_opset
    from annseg.engine.segmenter import Segmenter

    validate_opset(args.opset)  # a wrong flag first, before what the machine lacks
    try:
        require_onnx()
    except ImportError as error:
        raise SystemExit(f"annseg: error: {error}")
    out = args.out or _checkpoint_run_folder(args.checkpoint) / "model.onnx"
    check_out_file(out)
    _require_default_checkpoint(args.checkpoint)
    network, meta = load_model(args.checkpoint)
    segmenter = Segmenter.from_meta(network, meta)
    crop = meta["config"].data.crop_size
    height, width = args.height or crop[0], args.width or crop[1]
    shape = "dynamic batch, height and width" if args.dynamic else f"fixed 1x3x{height}x{width}"
    print(f"exporting {args.checkpoint} ({shape}, opset {args.opset}); tracing takes a while", file=sys.stderr,
          flush=True)
    info = export_onnx(segmenter, out, height, width, dynamic=args.dynamic, opset=args.opset)
    generator = torch.Generator().manual_seed(0)
    sizes = [(1, height, width)]
    if args.dynamic:  # another batch and size, odd where the export size is even
        sizes.append((2, max(17, height // 2 + 1), max(17, width // 2 + 3)))
    inputs = [torch.randn(b, 3, h, w, generator=generator) for b, h, w in sizes]
    check = check_onnx(out, segmenter, inputs)
    print(f"wrote {out} (opset {info.opset})")
    for kind, values in (("input", info.inputs), ("output", info.outputs)):
        for name, dims in values:
            print(f"  {kind:<6} {name:<7} [{', '.join(map(str, dims))}]")
    mean, std = segmenter.normalization.mean, segmenter.normalization.std
    print(f"  input: RGB in [0, 1], minus mean {list(mean)}, over std {list(std)}; classes, palette and "
          "normalization are in the file's metadata")
    tested = ", ".join("x".join(map(str, size)) for size in check.sizes)
    print(f"onnxruntime vs PyTorch on random inputs {tested}: max abs diff {check.max_abs_diff:.3g} "
          f"(logits up to {check.max_abs_logit:.3g})")


def _cmd_export_weights(args: argparse.Namespace) -> None:
    from annseg.engine.checkpoint import export_weights

    _require_default_checkpoint(args.checkpoint)
    out = args.out or _checkpoint_run_folder(args.checkpoint) / "model.ckpt"
    if out.resolve() == args.checkpoint.resolve():
        raise ValueError(f"--out {out} is the checkpoint itself; name another file")
    check_out_file(out)
    export_weights(args.checkpoint, out)
    size = lambda path: path.stat().st_size / 2**20  # noqa: E731
    print(f"wrote {out}: {size(out):,.1f} MiB (the checkpoint: {size(args.checkpoint):,.1f} MiB); "
          f"use it with: annseg eval --checkpoint {out}, annseg predict IMAGES --checkpoint {out}, "
          f"annseg.load({str(out)!r})")


def _cmd_attention(args: argparse.Namespace) -> None:
    from annseg.data import read_image
    from annseg.engine import load_model
    from annseg.engine.segmenter import Segmenter
    from annseg.viz.attention import attention_picture

    check_out_file(args.out)
    _require_default_checkpoint(args.checkpoint)
    image = read_image(args.image)
    segmenter = Segmenter.from_meta(*load_model(args.checkpoint, fuse=True)).to(_device(args))
    maps = segmenter.attention(image, [tuple(point) for point in args.points], block=args.block)
    attention_picture(image.permute(1, 2, 0).numpy(), maps).save(args.out)
    print(f"wrote {args.out}: {len(maps.points)} point(s), {args.block.upper()} anchors "
          f"{' + '.join(f'{s}x{s}' for s in maps.sizes)} = {maps.weights.shape[1]} on the "
          f"{maps.feature[0]}x{maps.feature[1]} feature map")


def _cmd_demo(args: argparse.Namespace) -> None:
    import json
    import time

    from annseg.engine import fit, format_table, load_config
    from annseg.engine.train import write_json
    from annseg.engine.builders import build_dataset
    from annseg.engine.checkpoint import load_model
    from annseg.data.transforms import Normalization
    from annseg.engine.predict import predict_labels
    from annseg.viz import panels_picture

    overrides = list(args.overrides) + ([f"model.variant={args.variant}"] if args.variant else [])
    config = load_config(args.config, overrides)
    out = args.out or Path("runs") / f"demo-{config.model.variant}"
    check_out_folder(out)
    _quiet_lightning()
    start = time.perf_counter()
    fit(config, out, progress=_training_progress())
    seconds = time.perf_counter() - start
    model, meta = load_model(out / "checkpoints" / "last.ckpt")
    raw = build_dataset(config.data, config.data.val_split, None, config.data.val_length)
    normalization = Normalization(config.data.mean, config.data.std)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    for index in range(min(args.overlays, len(raw))):
        item = raw[index]
        labels = predict_labels(model, item["image"], len(meta["classes"]), normalization, config.eval).numpy()
        truth = item["mask"].numpy()
        sheet = panels_picture(item["image"].permute(1, 2, 0).numpy(), [("ground truth", truth), ("prediction", labels)],
                               meta["classes"], meta["palette"])
        sheet.save(out / "overlays" / f"{item['name']}.png")
    scores = json.loads((out / "metrics.json").read_text())
    import torch

    from annseg.bench.machine import cpu_name

    scores.update(model=config.model.name, train_seconds=round(seconds, 1), command="annseg " + shlex.join(sys.argv[1:]),
                  torch=torch.__version__, threads=torch.get_num_threads(), machine=cpu_name())
    write_json(out / "metrics.json", scores)
    print(f"\n{config.model.name} on the built-in dataset, {config.train.max_iters} iterations in {seconds:.0f} s")
    print(format_table(scores))
    print(f"overlays (image | truth | prediction) in {out / 'overlays'}, scores in {out / 'metrics.json'}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _report_library_messages()
    try:
        args.run(args)
    except KeyboardInterrupt as interrupt:
        raise SystemExit(f"annseg: interrupted{f'; {interrupt}' if str(interrupt) else ''}")
    except (ValueError, FloatingPointError) as error:
        raise SystemExit(f"annseg: error: {_one_line(error)}")
    except OSError as error:
        raise SystemExit(f"annseg: error: {_os_error_line(error, _then(args), _out(args))}")
    except RuntimeError as error:
        if (line := _worker_killed_line(error, _then(args))) is None:
            raise
        raise SystemExit(f"annseg: error: {line}")


def _then(args: argparse.Namespace) -> str:
    """What to do once the cause is fixed: training continues from its last checkpoint."""
    return "--resume latest" if args.command == "train" else "run the command again"


def _out(args: argparse.Namespace) -> Path | None:
    """Where the command writes (for a write error that names no file, e.g. from Lightning's loggers)."""
    out = getattr(args, "out", None)
    return _run_folder(args) if out is None and args.command == "train" else out


def _os_error_line(error: OSError, then: str, out: Path | None = None) -> str:
    """One line for a fault of the machine: a full disk, a missing, unreadable or unwritable file."""
    if error.errno is None:  # raised by annseg with its own message
        return _one_line(error)
    if error.filename is not None:
        where = f" {error.filename}"
    else:
        where = f" a file in {out}" if out is not None else " a file"
    if error.errno == errno.ENOSPC:
        return f"no space left on device writing{where}; free space and {then}"
    return f"{error.strerror or error}:{where}"


_WORKER_KILLED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) "
                            r"(?:exited unexpectedly|is killed by signal: ([^.]*))")


def _worker_killed_line(error: RuntimeError, then: str) -> str | None:
    """One line for a DataLoader worker that died (the OOM killer's SIGKILL, most often); else None."""
    match = _WORKER_KILLED.search(str(error))
    if match is None:
        return None
    how = f"signal: {match.group(2).strip()}" if match.group(2) else "it exited unexpectedly"
    return (f"a data-loading worker (pid {match.group(1).strip()}) was killed ({how}), likely out of memory; "
            f"use fewer workers (--set data.num_workers=N) or a smaller batch (data.batch_size), then {then}")


def _report_library_messages() -> None:
    """The library logs (it never prints); the command shows its messages as ``annseg: ...`` lines."""
    logger = logging.getLogger("annseg")
    if not any(getattr(h, "annseg_cli", False) for h in logger.handlers):
        handler = _BarSafeHandler()
        handler.setFormatter(logging.Formatter("annseg: %(message)s"))
        handler.annseg_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class _BarSafeHandler(logging.Handler):
    """Writes each message on its own line through ``tqdm.write``, which clears an active progress bar
    first and redraws it after: nothing is glued to a bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def _one_line(error: BaseException) -> str:
    """The error's own message, also when a DataLoader worker re-raised it with its traceback.

    A worker's exception arrives as "Caught DataError in DataLoader worker process 0.\n
    Original Traceback ...\nannseg.data.base.DataError: <message>": keep only <message>.
    """
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
    return last.removeprefix(prefix).removeprefix(f"{type(error).__qualname__}: ")


if __name__ == "__main__":
    main()
