"""The ``annseg`` command. Library code never prints; this module reports."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from annseg import __version__


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
        help="NonLocal2d vs APNB, the paper's efficiency table",
        description="Forward time, peak memory and multiply-accumulates of the attention part of "
        "NonLocal2d and APNB on (1, C, H, W) inputs, each case in a fresh subprocess.",
    )
    blocks.add_argument("--sizes", type=_size, nargs="+", metavar="HxW",
                        help="input sizes (default: the paper's 96x96 128x128 128x256)")
    blocks.add_argument("--quick", action="store_true",
                        help="small sizes (24x24 32x32 32x64) and 3 repeats: a quick check in seconds")
    blocks.add_argument("--blocks", nargs="+", choices=("nb", "apnb"), default=["nb", "apnb"])
    blocks.add_argument("--channels", type=_positive, default=2048, help="input and output channels (2048)")
    blocks.add_argument("--key-channels", type=_positive, default=256, help="Ck (256)")
    blocks.add_argument("--value-channels", type=_positive, default=256, help="Cv (256)")
    blocks.add_argument("--anchors", type=_anchor_sizes, default=(1, 3, 6, 8), metavar="S1,S2,...",
                        help="APNB pooling sizes (1,3,6,8)")
    blocks.add_argument("--repeats", type=_positive, default=None, help="timed runs per case (5; 3 with --quick)")
    blocks.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (1)")
    blocks.add_argument("--threads", type=_positive, default=None, help="CPU threads (torch's default)")
    blocks.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    blocks.add_argument("--out", type=Path, default=Path("bench-out/blocks"),
                        help="folder for results.json and results.md (bench-out/blocks)")
    blocks.add_argument("--update-readme", type=Path, default=None, metavar="README",
                        help="also replace the benchmark table between the markers in this README")
    blocks.set_defaults(run=_cmd_bench_blocks)
    return parser


def _cmd_models(args: argparse.Namespace) -> None:
    from annseg.models import create_model, list_models

    print(f"{'model':<18} {'parameters':>12}   ({args.num_classes} classes)")
    for name in list_models():
        model = create_model(name, num_classes=args.num_classes)
        print(f"{name:<18} {sum(p.numel() for p in model.parameters()):>12,}")


def _cmd_bench_blocks(args: argparse.Namespace) -> None:
    import torch

    from annseg.bench.blocks import PAPER_SIZES, QUICK_SIZES, render_markdown, run_blocks, update_readme, write_results

    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise SystemExit(f"annseg: error: --device {args.device!r} is not a device (auto, cpu, cuda, cuda:N)")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("annseg: error: --device cuda was asked for but torch sees no CUDA device")
    if args.update_readme is not None and not args.update_readme.is_file():
        raise SystemExit(f"annseg: error: --update-readme {args.update_readme} does not exist")
    sizes = args.sizes or (QUICK_SIZES if args.quick else PAPER_SIZES)
    repeats = args.repeats or (3 if args.quick else 5)

    def report(index: int, total: int, case: dict) -> None:
        shape = f"[1,{case['channels']},{case['height']},{case['width']}]"
        status = case.get("error") or f"{case['time_ms']:9.1f} ms {case['peak_mib']:8.1f} MiB"
        print(f"[{index}/{total}] {case['block']:<5} {shape:<18} {status}", file=sys.stderr, flush=True)

    result = run_blocks(
        sizes, blocks=args.blocks, channels=args.channels, key_channels=args.key_channels,
        value_channels=args.value_channels, anchor_sizes=args.anchors, device=args.device,
        repeats=repeats, warmup=args.warmup, threads=args.threads,
        command="annseg " + shlex.join(sys.argv[1:]), on_case=report,
    )
    json_path, md_path = write_results(result, args.out)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    if args.update_readme is not None:
        from dataclasses import asdict

        update_readme(args.update_readme, render_markdown(asdict(result)))
        print(f"updated the benchmark table in {args.update_readme}")


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
