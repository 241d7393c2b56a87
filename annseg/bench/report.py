"""``annseg bench readme``: the README's efficiency section and plots, from committed results.

Every number in that section comes from a results.json under ``benchmarks/``: the tables
are rendered by the module that wrote the results, the plots are drawn from them, and the
project's efficiency targets are checked against them here (time targets scaled by the
machine's measured matmul speed), so that nothing is typed by hand.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from annseg.bench import blocks, model, train
from annseg.viz.bench import plot

KINDS = {"blocks": blocks.render_markdown, "model": model.render_markdown, "train": train.render_markdown}
TITLES = {"blocks": "Blocks", "model": "Whole network", "train": "Training step"}
REFERENCE_GFLOPS = 180.0  # the 2-core machine the time targets were set on: 4096x4096 fp32 matmul
LARGEST = (2048, 128, 256)  # the paper's largest input, where the targets are set


def load_results(folder: Path) -> list[tuple[Path, dict]]:
    """Every results.json below ``folder``: blocks, models, training steps; the CPU before GPUs."""
    found = [(p.parent, json.loads(p.read_text())) for p in sorted(folder.glob("*/results.json"))]
    found = [(p, {**r, "command": committed_command(r["command"], folder.name, p.name)})
             for p, r in found if r.get("kind") in KINDS]
    return sorted(found, key=lambda pr: (list(KINDS).index(pr[1]["kind"]), pr[1]["machine"]["device"] != "cpu",
                                         pr[0].name))


def committed_command(command: str, results: str, name: str) -> str:
    """``command`` as it ran, with its ``--out`` naming the folder its results are committed in
    (``results/name``): a run on another machine wrote to a scratch folder first."""
    words = shlex.split(command)
    if "--out" in words[:-1]:
        words[words.index("--out") + 1] = f"{results}/{name}"
    return shlex.join(words)


@dataclass
class Target:
    """One of the efficiency targets, checked against a measurement."""

    what: str
    measured: float
    limit: float
    unit: str
    at_most: bool = True

    @property
    def met(self) -> bool:
        return self.measured <= self.limit if self.at_most else self.measured >= self.limit

    def line(self) -> str:
        sign = "<=" if self.at_most else ">="
        verdict = "met" if self.met else f"**missed** by {abs(self.measured / self.limit - 1) * 100:.0f}%"
        return f"| {self.what} | {self.measured:,.2f} {self.unit} | {sign} {self.limit:,.2f} {self.unit} | {verdict} |"


def check_targets(results: list[tuple[Path, dict]]) -> list[Target]:
    """The efficiency targets, for every results file that measures them."""
    targets: list[Target] = []
    for folder, result in results:
        machine = result["machine"]
        where = f"{machine['device_name']} ({folder.name})"
        if result["kind"] == "blocks":
            cases = {c["block"]: c for c in result["cases"] if (c["channels"], c["height"], c["width"]) == LARGEST
                     and (c["block"] != "apnb" or tuple(c["sizes"]) == blocks.PAPER_ANCHORS) and "error" not in c}
            plain, nb, apnb = cases.get("nb-plain"), cases.get("nb"), cases.get("apnb")
            if machine["device"] == "cpu":
                scale = REFERENCE_GFLOPS / machine["matmul_4096_fp32_gflops"]
                if apnb:
                    targets += [Target(f"{where}: APNB forward time, [1,2048,128,256] (0.75 s scaled by "
                                       f"{REFERENCE_GFLOPS:.0f} / {machine['matmul_4096_fp32_gflops']:.0f} GFLOP/s)",
                                       apnb["time_ms"] / 1000, 0.75 * scale, "s"),
                                Target(f"{where}: APNB forward peak memory", apnb["peak_mib"], 350, "MiB")]
                if nb:
                    targets.append(Target(f"{where}: NonLocal2d forward peak memory", nb["peak_mib"], 450, "MiB"))
                if nb and plain:
                    targets.append(Target(f"{where}: NonLocal2d forward speed-up over the plain block",
                                          plain["time_ms"] / nb["time_ms"], 2, "x", at_most=False))
            elif apnb and plain:
                targets += [Target(f"{where}: APNB forward speed-up over the plain NB",
                                   plain["time_ms"] / apnb["time_ms"], 6, "x", at_most=False),
                            Target(f"{where}: APNB forward memory saving over the plain NB",
                                   plain["peak_mib"] / apnb["peak_mib"], 28, "x", at_most=False)]
        elif result["kind"] == "model":
            for c in result["cases"]:
                if c["model"] == "ann_resnet101" and "error" not in c and c.get("parts_ms"):
                    parts = c["parts_ms"]
                    targets.append(Target(f"{where}: ann_resnet101 at {c['height']}x{c['width']}, AFNB + APNB "
                                          f"time over the backbone's", 100 * (parts["afnb"] + parts["apnb"])
                                          / parts["backbone"], 15, "%"))
    return targets


def render_section(results: list[tuple[Path, dict]], plots: list[Path], root: Path) -> str:
    """The text between the README's markers: each result's table, the plots, the targets."""
    parts = []
    for folder, result in results:
        title = TITLES[result["kind"]]
        parts.append(f"#### {title}: {result['machine']['device_name']} (`{folder.relative_to(root).as_posix()}/`)\n")
        parts.append(KINDS[result["kind"]](result))
    for path in plots:
        parts.append(f"![{path.stem}]({path.relative_to(root).as_posix()})\n")
    targets = check_targets(results)
    if targets:
        parts += ["#### Efficiency targets, checked against the results above\n",
                  "| target | measured | limit | verdict |", "|---|---:|---:|---|",
                  *(t.line() for t in targets), ""]
    return "\n".join(parts)


def update_readme_section(readme: Path, results_dir: Path) -> list[Path]:
    """Draw the plots into ``results_dir/plots``, re-render each results.md and rewrite the
    README's marked section."""
    results = load_results(results_dir)
    if not results:
        raise FileNotFoundError(f"no results.json of `annseg bench` below {results_dir}")
    for folder, result in results:  # each results.md in the current table format
        (folder / "results.md").write_text(KINDS[result["kind"]](result))
    plots = plot(results, results_dir / "plots")
    root = readme.resolve().parent
    results = [(folder.resolve(), result) for folder, result in results]
    blocks.update_readme(readme, render_section(results, sorted(p.resolve() for p in plots), root))
    return plots
