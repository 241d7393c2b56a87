import json
import shutil
from pathlib import Path

import pytest

from annseg.bench.blocks import README_END, README_START
from annseg.bench.report import check_targets, load_results, render_section, update_readme_section

ROOT = Path(__file__).resolve().parents[2]


def test_readme_section_is_generated_from_committed_results():
    """The README's efficiency section is `annseg bench readme`'s output, not typed numbers."""
    results = [(folder.resolve(), result) for folder, result in load_results(ROOT / "benchmarks")]
    assert {r["machine"]["device"] for _, r in results} >= {"cpu"}
    plots = sorted((ROOT / "benchmarks" / "plots").glob("*.png"))
    readme = (ROOT / "README.md").read_text()
    section = readme.split(README_START, 1)[1].split(README_END, 1)[0]
    assert section.strip() == render_section(results, plots, ROOT).strip()
    assert all(r["command"].startswith("annseg bench") for _, r in results)


def test_update_writes_plots_and_targets(tmp_path):
    pytest.importorskip("matplotlib")
    shutil.copytree(ROOT / "benchmarks", tmp_path / "benchmarks", ignore=shutil.ignore_patterns("plots"))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold\n{README_END}\noutro\n")
    plots = update_readme_section(readme, tmp_path / "benchmarks")
    assert {p.name for p in plots} == {"blocks-scaling.png", "anchors.png"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in plots)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "| target |" in text


def test_targets_scale_cpu_time_by_matmul_speed():
    case = dict(channels=2048, height=128, width=256, sizes=[1, 3, 6, 8])
    result = dict(kind="blocks", machine=dict(device="cpu", device_name="cpu", matmul_4096_fp32_gflops=90.0),
                  cases=[dict(case, block="apnb", time_ms=1400.0, peak_mib=300.0)])
    time, memory = check_targets([(Path("blocks-cpu"), result)])
    assert time.limit == pytest.approx(1.5) and time.met  # half the reference speed: twice the time
    assert memory.met and "missed" not in memory.line()
    slow = dict(result, cases=[dict(case, block="apnb", time_ms=1800.0, peak_mib=300.0)])
    assert "missed** by 20%" in check_targets([(Path("x"), slow)])[0].line()


def test_commands_name_the_folder_their_results_are_committed_in() -> None:
    from annseg.bench.report import committed_command

    ran = "annseg bench model --tf32 --out /scratch/out/model-h100 --repeats 20"
    assert committed_command(ran, "benchmarks", "model-h100") == \
        "annseg bench model --tf32 --out benchmarks/model-h100 --repeats 20"
    assert committed_command("annseg bench model", "benchmarks", "x") == "annseg bench model"


def _fake_train_results() -> dict:
    parts = {f"{p}_{d}": 10.0 for p in ("backbone", "afnb", "apnb", "heads", "loss") for d in ("fwd", "bwd")}
    return {"kind": "train", "command": "annseg bench train --out /scratch/train-cpu", "repeats": 3, "warmup": 1,
            "machine": {"device": "cpu", "device_name": "Some CPU", "threads": 2, "torch": "2.x",
                        "matmul_4096_fp32_gflops": 100.0},
            "cases": [{"model": "ann_resnet50", "height": 384, "width": 384, "batch": 2, "time_ms": 9000.0,
                       "peak_mib": 4000.0, "parts_ms": {**parts, "optimizer": 50.0}, "parts_total_ms": 150.0,
                       "options": {"dropout": 0.1}, "precision": "fp32", "compile": False}]}


def test_section_renders_train_results_beside_the_others(tmp_path):
    """A train results folder joins the section after the blocks and models; the README test above
    covers the committed folders, with or without one."""
    shutil.copytree(ROOT / "benchmarks", tmp_path / "benchmarks", ignore=shutil.ignore_patterns("plots"))
    (tmp_path / "benchmarks" / "train-cpu").mkdir(exist_ok=True)  # replaces a committed one
    (tmp_path / "benchmarks" / "train-cpu" / "results.json").write_text(json.dumps(_fake_train_results()))
    results = load_results(tmp_path / "benchmarks")
    assert [r["kind"] for _, r in results][-1] == "train"
    section = render_section(results, [], tmp_path)
    assert "#### Training step: Some CPU (`benchmarks/train-cpu/`)" in section
    assert "| ann_resnet50 | 2x384x384 | dropout=0.1 | 9,000 | 4,000 | 10 / 10 |" in section
    assert "`annseg bench train --out benchmarks/train-cpu`" in section
    assert len(check_targets(results)) == len(check_targets(results[:-1]))  # no target is set on training
