import ctypes
import gc
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from annseg.bench.blocks import (BASELINES, BLOCKS, DEFAULT_BLOCKS, README_END, README_START, BlockCase, count_macs,
                                 measure, plan_cases, render_markdown, update_readme)
from annseg.bench.machine import PeakMemory

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("case", [
    BlockCase("nb", 13, 21, channels=32, key_channels=8, value_channels=12),
    BlockCase("nb-plain", 13, 21, channels=32, key_channels=8, value_channels=12),
    BlockCase("afnb", 13, 21, channels=32, key_channels=8, value_channels=12),
    BlockCase("afnb", 6, 5, channels=16, key_channels=8, value_channels=8, sizes=(1, 2)),
    BlockCase("apnb", 13, 21, channels=32, key_channels=8, value_channels=12),
    BlockCase("apnb", 5, 3, channels=16, key_channels=8, value_channels=8, sizes=(1, 2, 4)),
    BlockCase("apnb", 24, 40, channels=64),
    BlockCase("apnb", 9, 10, channels=16, share_query_key=False),
    BlockCase("denseaspp", 13, 21, channels=32),
    BlockCase("psa", 13, 21, channels=32),
    BlockCase("psa", 6, 5, channels=16),
    BlockCase("cc", 13, 21, channels=64),
    BlockCase("cc", 1, 7, channels=16),
])
def test_analytic_macs_match_flop_counter(case):
    block = case.build(fused_attention=False)  # the reference path: plain bmm + softmax
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        block(*case.inputs())
    assert counter.get_total_flops() == 2 * count_macs(case)["total"]


def test_paper_scale_macs():
    """docs/method.md / the paper: at [1,2048,128,256] NB ~ 618 G (attention ~ 550 G), APNB ~ 71 G."""
    paper_nb = count_macs(BlockCase("nb-plain", 128, 256))  # separate query, as counted there
    assert paper_nb["attention"] / 1e9 == pytest.approx(550, rel=0.01)
    assert paper_nb["total"] / 1e9 == pytest.approx(618, rel=0.01)
    # The paper also projects values at all N positions (~71 G in all); projecting after
    # pooling saves ~17 G, and sharing the query with the key another ~17 G.
    assert count_macs(BlockCase("apnb", 128, 256, share_query_key=False))["total"] / 1e9 == pytest.approx(55, rel=0.02)
    assert count_macs(BlockCase("apnb", 128, 256))["total"] / 1e9 == pytest.approx(37.7, rel=0.01)


def _return_free_memory() -> None:
    """Hand the C allocator's retained free memory back to the system (glibc's malloc_trim): a
    large allocation can otherwise reuse pages that earlier tests left resident, and the
    resident set would not grow."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing kept that way to return
        pass


def test_peak_memory_sees_an_allocation():
    gc.collect()  # garbage of earlier tests freed inside the block would lower RSS below the baseline
    _return_free_memory()
    with PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert memory.peak >= 60 * 2**20
    with PeakMemory(torch.device("cpu")) as idle:
        pass
    assert idle.peak < 16 * 2**20


@pytest.mark.parametrize("block", ["apnb", "afnb", "nb-plain", *BASELINES])
@pytest.mark.parametrize("train", [False, True])
def test_measure_reports_time_and_memory(block, train):
    case = BlockCase(block, 16, 16, channels=64)
    record = measure(case, torch.device("cpu"), repeats=2, warmup=0, threads=1, train=train)
    prefix = "train_" if train else ""
    assert record[f"{prefix}time_ms"] > 0 and len(record[f"{prefix}times_ms"]) == 2
    assert record[f"{prefix}peak_mib"] >= 0


def test_plan_sweeps_anchors_for_apnb_only():
    cases = plan_cases([(8, 8)], anchor_sets=[(1,), (1, 3, 6, 8), (1, 2)])
    assert [(c.block, c.sizes) for c in cases] == [
        ("nb-plain", (1, 3, 6, 8)), ("nb", (1, 3, 6, 8)), ("apnb", (1,)), ("apnb", (1, 3, 6, 8)),
        ("apnb", (1, 2)), ("afnb", (1, 3, 6, 8))]
    assert [c.anchors for c in cases] == [64, 64, 1, 110, 5, 110]
    with pytest.raises(ValueError, match="unknown block"):
        BlockCase("nl", 8, 8)


def test_render_marks_ratios_against_the_plain_block():
    case = dict(channels=8, height=4, width=4, key_channels=2, sizes=[1, 3, 6, 8], macs={"total": 10**9})
    rows = [dict(case, block="nb-plain", anchors=16, time_ms=40.0, peak_mib=300.0),
            dict(case, block="apnb", anchors=110, time_ms=10.0, peak_mib=10.0),
            dict(case, block="apnb", anchors=1, sizes=[1], time_ms=5.0, peak_mib=10.0)]
    machine = dict(device_name="cpu", device="cpu", threads=1, torch="x", matmul_4096_fp32_gflops=1.0)
    text = render_markdown(dict(command="annseg bench blocks", machine=machine, repeats=1, warmup=0, cases=rows))
    assert "| [1,8,4,4] | apnb | 110 | 1.0 | 10 | 4.0x | 10 | 30.0x |\n" in text  # no training columns
    assert "| (1) | 1 | [1,8,4,4] |" in text  # the anchors sweep


def test_update_readme_replaces_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold\n{README_END}\noutro\n")
    update_readme(readme, "new table\n")
    assert readme.read_text() == f"intro\n{README_START}\nnew table\n{README_END}\noutro\n"
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        update_readme(readme, "x")


def test_baselines_at_paper_scale():
    """On (1, 2048, H, W): the papers' widths, output channels, and what each attends to."""
    shapes = {}
    for block in BASELINES:
        case = BlockCase(block, 5, 7)
        with torch.no_grad():
            shapes[block] = tuple(case.build()(*case.inputs()).shape)
    assert shapes == {"denseaspp": (1, 2048 + 5 * 128, 5, 7), "psa": (1, 2048, 5, 7), "cc": (1, 512, 5, 7)}
    assert [BlockCase(b, 96, 96).anchors for b in BASELINES] == [None, 96 * 96, 96 + 96 - 1]


def test_baselines_are_opt_in():
    assert set(DEFAULT_BLOCKS) | set(BASELINES) == set(BLOCKS) and not set(DEFAULT_BLOCKS) & set(BASELINES)
    assert {c.block for c in plan_cases([(8, 8)])} == set(DEFAULT_BLOCKS)


def test_render_names_the_baselines_without_anchors():
    machine = dict(device_name="cpu", device="cpu", threads=1, torch="x", matmul_4096_fp32_gflops=1.0)
    rows = [dict(channels=8, height=4, width=4, key_channels=2, sizes=[1, 3, 6, 8], macs={"total": 10**9},
                 block=block, anchors=anchors, time_ms=t, peak_mib=10.0)
            for block, anchors, t in (("nb-plain", 16, 40.0), ("denseaspp", None, 20.0), ("cc", 7, 10.0))]
    text = render_markdown(dict(command="annseg bench blocks", machine=machine, repeats=1, warmup=0, cases=rows))
    assert "| [1,8,4,4] | denseaspp | - | 1.0 | 20 | 2.0x |" in text
    assert "| [1,8,4,4] | cc | 7 | 1.0 | 10 | 4.0x |" in text
    assert "denseaspp, cc: the whole context module" in text


def test_cli_runs_the_comparison(tmp_path):
    from tests.test_cli import run

    out = tmp_path / "bench"
    proc = run("bench", "blocks", "--blocks", "nb", "denseaspp", "psa", "cc", "--sizes", "9x13",
               "--channels", "32", "--forward-only", "--repeats", "1", "--warmup", "0", "--threads", "1",
               "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cases = json.loads((out / "results.json").read_text())["cases"]
    assert [c["block"] for c in cases] == ["nb", "denseaspp", "psa", "cc"]
    assert all(c["time_ms"] > 0 and c["macs"]["total"] == count_macs(BlockCase(c["block"], 9, 13, 32))["total"]
               for c in cases)
    assert "| [1,32,9,13] | psa | 117 |" in (out / "results.md").read_text()
