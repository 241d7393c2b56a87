"""``annseg bench blocks``: the paper's efficiency table, completed.

What is measured follows the authors: the attention part of a block (projections,
attention, W; no fusion conv) on a (1, 2048, H, W) map with Ck = Cv = 256. Blocks: the plain
non-local block the paper compares against (``nb-plain``), our NonLocal2d (``nb``), APNB and
AFNB; and the context modules of other papers the paper compares against, DenseASPP and
PSANet's point-wise spatial attention, with CCNet's criss-cross attention (``BASELINES``:
each whole context module without its fusion, widths C/4 as their papers' on 2048 channels).
Forward (eval) and training (forward + backward). Each case and mode runs in a fresh subprocess
so that CPU peak memory is that case's alone: time is the median of ``repeats`` runs after
``warmup`` runs (CUDA events on a GPU), peak memory is measured above the baseline of the
built block and its input. Multiply-accumulates are counted analytically (``count_macs``),
matching what the code computes.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from annseg.bench.machine import PeakMemory, describe
from annseg.bench.runner import BenchResult, machine_line, run_worker, timed
from annseg.layers import AFNB, APNB, NonLocal2d
from annseg.layers.baselines import CrissCrossAttention, DenseASPP, PointwiseSpatialAttention

BLOCKS: dict[str, str] = {  # name -> what it is, as the tables say
    "nb-plain": "NonLocal2d as the paper measures it: separate query and key, plain bmm + softmax "
                "(the N x N similarity map is materialised)",
    "nb": "our NonLocal2d: shared query/key, key and value in one matmul, fused attention kernel",
    "apnb": "APNB: pyramid anchors, values projected after pooling",
    "afnb": "AFNB: queries from the (C)-channel map, keys and values from a (C/2)-channel one",
    "denseaspp": "DenseASPP: BN-ReLU-1x1 (C/4) - BN-ReLU-3x3 (C/16) at rates 3, 6, 12, 18, 24, densely "
                 "concatenated: C + 5 C/16 channels out",
    "psa": "PSANet's point-wise spatial attention: collect and distribute, C/4 wide, each position's "
           "(2H-1) x (2W-1) mask gathered to N weights, 1x1 conv back to C",
    "cc": "CCNet's criss-cross attention: 3x3 conv to C/4, then R = 2 passes over each position's row "
          "and column (H + W - 1 positions); C/4 channels out",
}
BASELINES = ("denseaspp", "psa", "cc")  # other papers' context modules, not ANN's
CC_RECURRENCE = 2  # CCNet's default number of criss-cross passes
DEFAULT_BLOCKS = tuple(b for b in BLOCKS if b not in BASELINES)  # PSA at 128x256 needs ~20 GiB: opt in
PAPER_ANCHORS = (1, 3, 6, 8)
PAPER_SIZES = ((96, 96), (128, 128), (128, 256))
QUICK_SIZES = ((24, 24), (32, 32), (32, 64))
README_START = "<!-- annseg bench blocks: start -->"
README_END = "<!-- annseg bench blocks: end -->"


@dataclass(frozen=True)
class BlockCase:
    """One measurement: a block on a (1, channels, height, width) input.

    AFNB also reads a (1, channels // 2, height, width) low-level map (ResNet layer3 beside
    layer4) and writes ``channels`` channels.
    """

    block: str
    height: int
    width: int
    channels: int = 2048
    key_channels: int = 256
    value_channels: int = 256
    sizes: tuple[int, ...] = PAPER_ANCHORS
    share_query_key: bool = True

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise ValueError(f"unknown block {self.block!r}; choose from {list(BLOCKS)}")

    def build(self, fused_attention: bool = True) -> nn.Module:
        """The block's attention part (no fusion), in eval mode."""
        if self.block in BASELINES:
            return self._build_baseline().eval()
        options = dict(key_channels=self.key_channels, value_channels=self.value_channels,
                       fusion=False, fused_attention=fused_attention and not self.plain)
        if self.block == "afnb":
            return AFNB(self.channels // 2, self.channels, sizes=self.sizes, **options).eval()
        options["share_query_key"] = self.shares_query_key
        if self.block == "apnb":
            return APNB(self.channels, sizes=self.sizes, **options).eval()
        return NonLocal2d(self.channels, **options).eval()

    def _build_baseline(self) -> nn.Module:
        if self.block == "denseaspp":
            return DenseASPP(self.channels, reduce_channels=self.baseline_width, growth=self.baseline_growth)
        if self.block == "psa":
            return PointwiseSpatialAttention(self.channels, (self.height, self.width), channels=self.baseline_width)
        return CrissCrossAttention(self.channels, channels=self.baseline_width, recurrence=CC_RECURRENCE)

    @property
    def baseline_width(self) -> int:
        """The baselines' inner width: C/4, their papers' 512 at C = 2048 (scaled for small tests)."""
        return max(self.channels // 4, 1)

    @property
    def baseline_growth(self) -> int:
        """DenseASPP's channels per layer: C/16, the published model's 128 at C = 2048."""
        return max(self.channels // 16, 1)

    def inputs(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        """Random inputs of the case's shapes: ``(x,)``, or ``(low, high)`` for AFNB."""
        shape = (1, self.channels, self.height, self.width)
        if self.block == "afnb":
            return torch.randn(1, self.channels // 2, *shape[2:], device=device), torch.randn(shape, device=device)
        return (torch.randn(shape, device=device),)

    @property
    def plain(self) -> bool:
        """The paper's baseline: materialised attention, separate query and key."""
        return self.block == "nb-plain"

    @property
    def shares_query_key(self) -> bool:
        return self.share_query_key and not self.plain and self.block != "afnb"

    @property
    def anchors(self) -> int | None:
        """S: positions each position attends to (N for the non-local block and PSA, H + W - 1
        per pass for CC); None for DenseASPP, which has no attention."""
        if self.block == "denseaspp":
            return None
        if self.block == "cc":
            return self.height + self.width - 1
        return self.height * self.width if self.block.startswith("nb") or self.block == "psa" \
            else sum(s * s for s in self.sizes)


def count_macs(case: BlockCase) -> dict[str, int]:
    """Multiply-accumulates of the attention part, by stage, as our code computes them.

    The query shares the key projection where the block does; APNB and AFNB project values
    after pooling (S positions); pyramid pooling is two matmuls per map (see
    ``PyramidSampling``); BN, ReLU, softmax and bias additions are not counted. The
    baselines have their own stages (``baseline_macs``).
    """
    if case.block in BASELINES:
        return baseline_macs(case)
    C, Ck, Cv, H, W = case.channels, case.key_channels, case.value_channels, case.height, case.width
    N, S = H * W, case.anchors
    C_kv = C // 2 if case.block == "afnb" else C  # the map keys and values are read from
    macs = {
        "key_projection": N * C_kv * Ck,
        "query_projection": 0 if case.shares_query_key else N * C * Ck,
        "value_projection": S * C_kv * Cv,
        "pooling": 0,
        "attention": N * S * (Ck + Cv),
        "output_projection": N * Cv * C,
    }
    if not case.block.startswith("nb"):
        T = sum(case.sizes)
        macs["pooling"] = (Ck + C_kv) * T * (H * W + H * T)  # the key map and the input
    macs["total"] = sum(macs.values())
    return macs


def baseline_macs(case: BlockCase) -> dict[str, int]:
    """Multiply-accumulates of DenseASPP, PSA and CC as ``BlockCase`` builds them, by stage."""
    C, H, W, width = case.channels, case.height, case.width, case.baseline_width
    N = H * W
    if case.block == "denseaspp":
        growth, rates = case.baseline_growth, 5
        macs = {"reduce_1x1": sum(N * (C + k * growth) * width for k in range(rates)),
                "atrous_3x3": rates * N * width * 9 * growth}
    elif case.block == "psa":
        mask = (2 * H - 1) * (2 * W - 1)
        branch = N * C * width + N * width * width + N * width * mask  # reduce, hidden, mask convs
        macs = {"reduce_and_masks": 2 * branch, "aggregation": 2 * N * N * width,
                "output_projection": N * 2 * width * C}
    else:
        recurrence, query = CC_RECURRENCE, max(width // 8, 1)
        macs = {"reduce_3x3": N * C * width * 9,
                "projections": recurrence * N * width * (2 * query + width),
                "attention": recurrence * N * (H + W) * (query + width)}  # own position computed twice, masked once
    macs["total"] = sum(macs.values())
    return macs


def measure(case: BlockCase, device: torch.device, repeats: int, warmup: int, threads: int,
            train: bool = False) -> dict[str, object]:
    """Time and peak memory of one case in this process (run it in a fresh one).

    Forward: eval mode under ``inference_mode``. Training (``train``): train mode (batch
    statistics), forward + backward of ``out.sum()`` with gradients for the parameters and
    the input, as inside a network; its peak includes those gradients. One mode per process:
    on the CPU, memory freed by earlier runs and kept by the allocator would hide a peak.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    block = case.build().to(device).train(train)
    with torch.inference_mode():
        warm = BlockCase(case.block, min(8, case.height), min(8, case.width), case.channels)
        block.eval()(*warm.inputs(device))  # initialise kernels, pools
    block.train(train)
    inputs = case.inputs(device)
    if train:
        inputs = tuple(x.requires_grad_() for x in inputs)

        def run() -> None:
            block.zero_grad(set_to_none=True)
            for x in inputs:
                x.grad = None
            block(*inputs).sum().backward()
    else:
        def run() -> None:
            with torch.inference_mode():
                block(*inputs)

    with PeakMemory(device, tensors=True) as memory:
        run()
    times = timed(run, device, repeats, warmup)
    prefix = "train_" if train else ""
    return {
        f"{prefix}time_ms": statistics.median(times),
        f"{prefix}times_ms": [round(t, 3) for t in times],
        f"{prefix}peak_mib": memory.peak / 2**20,
        f"{prefix}rss_peak_mib": memory.rss_peak / 2**20,
        "memory_method": memory.method,
    }


def plan_cases(
    sizes: Sequence[tuple[int, int]],
    blocks: Sequence[str] = DEFAULT_BLOCKS,
    anchor_sets: Sequence[tuple[int, ...]] = (PAPER_ANCHORS,),
    **shape: int,
) -> list[BlockCase]:
    """Every block at every size; APNB once per anchor set (the sweep), AFNB at the main set."""
    main = primary_anchors(anchor_sets)
    cases = []
    for h, w in sizes:
        for block in blocks:
            sets = anchor_sets if block == "apnb" else (main,)
            cases += [BlockCase(block, h, w, sizes=tuple(a), **shape) for a in sets]
    return cases


def primary_anchors(anchor_sets: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """The anchor set of the main table: the paper's (1, 3, 6, 8) where swept, else the first."""
    sets = [tuple(a) for a in anchor_sets]
    return PAPER_ANCHORS if PAPER_ANCHORS in sets else sets[0]


def run_blocks(
    sizes: Sequence[tuple[int, int]],
    *,
    blocks: Sequence[str] = DEFAULT_BLOCKS,
    channels: int = 2048,
    key_channels: int = 256,
    value_channels: int = 256,
    anchor_sets: Sequence[tuple[int, ...]] = (PAPER_ANCHORS,),
    device: str = "auto",
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    train: bool = True,
    command: str = "",
    on_case: Callable[[int, int, dict[str, object]], None] | None = None,
) -> BenchResult:
    """Measure every planned case, each in a fresh subprocess."""
    dev = resolve_device(device)
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)  # the matmul yardstick in describe() runs on these threads
    result = BenchResult("blocks", command, describe(dev, threads), repeats, warmup)
    cases = plan_cases(sizes, blocks, anchor_sets, channels=channels, key_channels=key_channels,
                       value_channels=value_channels)
    for index, case in enumerate(cases, 1):
        record = {**asdict(case), "anchors": case.anchors, "macs": count_macs(case)}
        for mode in (False, True) if train else (False,):
            record.update(_measure_in_subprocess(case, dev, repeats, warmup, threads, mode))
        result.cases.append(record)
        if on_case is not None:
            on_case(index, len(cases), record)
    return result


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _measure_in_subprocess(case: BlockCase, device: torch.device, repeats: int, warmup: int, threads: int,
                           train: bool) -> dict[str, object]:
    request = json.dumps({"case": asdict(case), "device": str(device), "repeats": repeats,
                          "warmup": warmup, "threads": threads, "train": train})
    return run_worker("annseg.bench.blocks", request)


def write_results(result: BenchResult, out_dir: Path) -> tuple[Path, Path]:
    """Write results.json and results.md (the tables) into ``out_dir``; return their paths."""
    return result.write(out_dir, render_markdown)


def render_markdown(result: dict) -> str:
    """The paper's table completed: every block at every size, forward and training, against
    the plain non-local block; then the anchors sweep when there is one."""
    cases = result["cases"]
    anchor_sets = list(dict.fromkeys(tuple(c["sizes"]) for c in cases if c["block"] == "apnb"))
    main = primary_anchors(anchor_sets) if anchor_sets else PAPER_ANCHORS
    table = [c for c in cases if c["block"] != "apnb" or tuple(c["sizes"]) == main]
    trained = any("train_time_ms" in c for c in cases)
    keys = ("time_ms", "peak_mib", "train_time_ms", "train_peak_mib")[: 4 if trained else 2]
    lines = [
        f"Attention part (projections, attention, W), fp32, batch 1, Ck = Cv = {cases[0]['key_channels']}, "
        f"anchors {_sizes(main)}; median of {result['repeats']} runs after {result['warmup']} warm-up. "
        f"Forward in eval mode{'; training = forward + backward (input and parameter gradients)' if trained else ''}. "
        f"x: how many times faster / lighter than nb-plain. {_baselines_line(cases)}{machine_line(result)}",
        "",
        "| input | block | S | GMACs | forward (ms) | x | forward peak (MiB) | x "
        + ("| training (ms) | x | training peak (MiB) | x |" if trained else "|"),
        "|---|---|---:|---:" + "|---:|---:" * len(keys) + "|",
    ]
    plain = {(c["channels"], c["height"], c["width"]): c for c in cases if c["block"] == "nb-plain"}
    for c in table:
        base = plain.get((c["channels"], c["height"], c["width"]), {})
        lines.append(
            f"| {_shape(c)} | {c['block']} | {'-' if c['anchors'] is None else c['anchors']} | {_gmacs(c)} "
            + " ".join(f"| {_num(c, key)} | {_ratio(base, c, key)}" for key in keys)
            + " |"
        )
    if len(anchor_sets) > 1:
        lines += [
            "",
            "APNB's anchors trade-off (pooling sizes -> S anchors): cost at each input size.",
            "",
            "| anchors | S | input | GMACs | forward (ms) | forward peak (MiB) | training (ms) | training peak (MiB) |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for c in sorted((c for c in cases if c["block"] == "apnb"), key=lambda c: (c["anchors"], c["height"] * c["width"])):
            lines.append(f"| {_sizes(c['sizes'])} | {c['anchors']} | {_shape(c)} | {_gmacs(c)} | "
                         + " | ".join(_num(c, k) for k in ("time_ms", "peak_mib", "train_time_ms", "train_peak_mib"))
                         + " |")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def _baselines_line(cases: list[dict]) -> str:
    """What the other papers' modules in the table measure (their widths are not Ck and Cv)."""
    present = [b for b in BASELINES if any(c["block"] == b for c in cases)]
    if not present:
        return ""
    return (f"{', '.join(present)}: the whole context module without its fusion, widths C/4 (C/16 for "
            f"DenseASPP's growth); S = positions each position attends to. ")


def _shape(case: dict) -> str:
    return f"[1,{case['channels']},{case['height']},{case['width']}]"


def _sizes(sizes: Sequence[int]) -> str:
    return "(" + ",".join(str(s) for s in sizes) + ")"


def _num(case: dict, key: str) -> str:
    if not case:
        return "-"
    if "error" in case:
        return case["error"]
    return f"{case[key]:,.0f}" if key in case else "-"


def _ratio(slow: dict, fast: dict, key: str) -> str:
    if not slow or slow is fast or "error" in slow or "error" in fast or not fast.get(key) or key not in slow:
        return "-"
    return f"{slow[key] / fast[key]:.1f}x"


def _gmacs(case: dict) -> str:
    return f"{case['macs']['total'] / 1e9:.1f}" if case else "-"


def update_readme(readme: Path, markdown: str, start: str = README_START, end: str = README_END) -> None:
    """Replace the text between the README's ``start`` and ``end`` markers (the benchmark
    section's by default) with ``markdown``."""
    text = readme.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no '{start}' ... '{end}' markers to replace")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{markdown}{end}{tail}")


def _worker(request_json: str) -> None:
    request = json.loads(request_json)
    case = BlockCase(**{**request["case"], "sizes": tuple(request["case"]["sizes"])})
    record = measure(case, torch.device(request["device"]), request["repeats"], request["warmup"],
                     request["threads"], request["train"])
    print(json.dumps(record))


if __name__ == "__main__":
    _worker(sys.argv[1])
