"""The benchmark plots of ``annseg bench readme``: block cost against input size, APNB's cost
against its number of anchors. Every panel has its own legend."""

from __future__ import annotations

from pathlib import Path

from annseg.bench import blocks
from annseg.viz.figures import DPI, pyplot


def plot(results: list[tuple[Path, dict]], out_dir: Path) -> list[Path]:
    """Time and memory against input size for each block (forward and training, per device),
    and APNB's cost against its number of anchors. PNG files in ``out_dir``."""
    plt = pyplot(extra="bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    block_results = [(f, r) for f, r in results if r["kind"] == "blocks"]
    scaling = [(f, r) for f, r in block_results if len({c["block"] for c in r["cases"]}) > 1]
    written = []
    if scaling:
        fig, axes = plt.subplots(2, len(scaling), figsize=(6.5 * len(scaling), 10), squeeze=False)
        for col, (folder, result) in enumerate(scaling):
            for block in blocks.BLOCKS:
                cases = [c for c in result["cases"] if c["block"] == block and "error" not in c
                         and (block != "apnb" or tuple(c["sizes"]) == blocks.PAPER_ANCHORS)]
                if not cases:
                    continue
                n = [c["height"] * c["width"] for c in cases]
                for row, (key, unit) in enumerate((("time_ms", "time (ms)"), ("peak_mib", "peak memory (MiB)"))):
                    ax = axes[row][col]
                    line, = ax.plot(n, [c[key] for c in cases], "o-", label=f"{block} forward")
                    if all(f"train_{key}" in c for c in cases):
                        ax.plot(n, [c[f"train_{key}"] for c in cases], "s--", color=line.get_color(),
                                label=f"{block} training")
                    ax.set(xscale="log", yscale="log", xlabel="positions N = H x W (C = 2048)", ylabel=unit)
            name = f"{result['machine']['device_name']} ({folder.name})"
            axes[0][col].set_title(f"time: {name}")
            axes[1][col].set_title(f"peak memory: {name}")
            for row in range(2):
                axes[row][col].grid(alpha=0.3, which="both")
                axes[row][col].legend(ncol=2)
        fig.tight_layout()
        written.append(out_dir / "blocks-scaling.png")
        fig.savefig(written[-1], dpi=DPI)
        plt.close(fig)
    sweeps = [(f, r) for f, r in block_results
              if len({tuple(c["sizes"]) for c in r["cases"] if c["block"] == "apnb"}) > 1]
    if sweeps:
        fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
        for folder, result in sweeps:
            largest = max((c["height"] * c["width"], c["height"], c["width"]) for c in result["cases"])[1:]
            cases = sorted((c for c in result["cases"] if c["block"] == "apnb" and "error" not in c
                            and (c["height"], c["width"]) == largest), key=lambda c: c["anchors"])
            paper = next((c for c in cases if tuple(c["sizes"]) == blocks.PAPER_ANCHORS), cases[-1])
            s = [c["anchors"] for c in cases]
            for key, mode, style in (("time_ms", "forward", "o-"), ("train_time_ms", "training", "s--")):
                if all(key in c for c in cases):
                    axes[0].plot(s, [c[key] / paper[key] for c in cases], style,
                                 label=f"{result['machine']['device_name']}, {mode}")
            if folder == sweeps[0][0]:  # counted, not measured: the same on every device
                axes[1].plot(s, [c["macs"]["total"] / 1e9 for c in cases], "o-", color="gray",
                             label="attention MACs (any device)")
                for c in cases:
                    axes[1].annotate(blocks._sizes(c["sizes"]), (c["anchors"], c["macs"]["total"] / 1e9), fontsize=10)
        axes[0].set(title="time relative to the paper's (1,3,6,8)", xlabel="anchors S",
                    ylabel="time / time at (1,3,6,8)", ylim=(0, None))
        axes[1].set(title="attention cost", xlabel="anchors S", ylabel="GMACs (attention part)")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"APNB at [1,2048,{largest[0]},{largest[1]}]: cost against the number of anchors")
        fig.tight_layout()
        written.append(out_dir / "anchors.png")
        fig.savefig(written[-1], dpi=DPI)
        plt.close(fig)
    return written
