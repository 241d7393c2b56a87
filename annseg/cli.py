"""The ``annseg`` command. Library code never prints; this module reports."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from annseg import __version__
from annseg.bench.blocks import BLOCKS as BLOCK_NAMES


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


def _positive(text: str) -> int:
    try:
        value = int(text)
        if value < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive int")
    return value


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

    bench = commands.add_parser("bench", help="efficiency benchmarks")
    bench_commands = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    blocks = bench_commands.add_parser(
        "blocks",
        help="plain NB vs NonLocal2d vs APNB vs AFNB: the paper's efficiency table, completed",
        description="Forward and training (forward + backward) time, peak memory and "
        "multiply-accumulates of the attention part of each block on (1, C, H, W) inputs, each "
        "case in a fresh subprocess. --anchors with several sets sweeps APNB's pooling sizes.",
    )
    blocks.add_argument("--sizes", type=_size, nargs="+", metavar="HxW",
                        help="input sizes (default: the paper's 96x96 128x128 128x256)")
    blocks.add_argument("--quick", action="store_true",
                        help="small sizes (24x24 32x32 32x64), 3 repeats, forward only: a quick check")
    blocks.add_argument("--blocks", nargs="+", choices=list(BLOCK_NAMES), default=list(BLOCK_NAMES))
    blocks.add_argument("--channels", type=_positive, default=2048, help="input and output channels (2048)")
    blocks.add_argument("--key-channels", type=_positive, default=256, help="Ck (256)")
    blocks.add_argument("--value-channels", type=_positive, default=256, help="Cv (256)")
    blocks.add_argument("--anchors", type=_anchor_sizes, nargs="+", default=[(1, 3, 6, 8)], metavar="S1,S2,...",
                        help="APNB pooling sizes (1,3,6,8); several sets sweep them, e.g. 1 1,2 1,3,6,8 1,2,3,6")
    blocks.add_argument("--forward-only", action="store_true", help="skip the training (forward + backward) runs")
    _add_run_options(blocks, "bench-out/blocks")
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
    _add_run_options(model, "bench-out/model")
    model.set_defaults(run=_cmd_bench_model)

    readme = bench_commands.add_parser(
        "readme",
        help="regenerate the README's efficiency section and plots from committed results",
        description="Reads every results.json below --results, draws the plots into it and "
        "replaces the text between the README's benchmark markers.",
    )
    readme.add_argument("--results", type=Path, default=Path("benchmarks"), help="results folder (benchmarks)")
    readme.add_argument("--readme", type=Path, default=Path("README.md"), help="the README to update (README.md)")
    readme.set_defaults(run=_cmd_bench_readme)
    return parser


def _cmd_models(args: argparse.Namespace) -> None:
    from annseg.models import create_model, list_models

    print(f"{'model':<18} {'parameters':>12}   ({args.num_classes} classes)")
    for name in list_models():
        model = create_model(name, num_classes=args.num_classes)
        print(f"{name:<18} {sum(p.numel() for p in model.parameters()):>12,}")


def _add_run_options(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--repeats", type=_positive, default=None,
                        help="timed runs per case (20 on a GPU, the paper's protocol; 5 on the CPU; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (1)")
    parser.add_argument("--threads", type=_positive, default=None, help="CPU threads (torch's default)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, default=Path(out), help=f"folder for results.json and results.md ({out})")


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
        (("fwd", "time_ms", "ms"), ("", "peak_mib", "MiB"), ("train", "train_time_ms", "ms"),
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
                       threads=args.threads, fuse=not args.no_fuse, tf32=args.tf32,
                       command="annseg " + shlex.join(sys.argv[1:]), on_case=_report)
    _finish(result, args, write_results)


def _cmd_bench_readme(args: argparse.Namespace) -> None:
    from annseg.bench.report import update_readme_section

    if not args.readme.is_file():
        raise SystemExit(f"annseg: error: --readme {args.readme} does not exist")
    for path in update_readme_section(args.readme, args.results):
        print(f"wrote {path}")
    print(f"updated the efficiency section of {args.readme}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        raise SystemExit("annseg: interrupted")
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"annseg: error: {error}")


if __name__ == "__main__":
    main()
