"""benchmarks/peers/mmseg_ann.py, without mmseg: its table, its README block."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "peers" / "mmseg_ann.py"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("mmseg_ann", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "mmseg" not in sys.modules  # the script imports mmseg only when it measures
    return module


def _case(side, work, lever, time_ms, peak_mib):
    return {"side": side, "work": work, "lever": lever, "time_ms": time_ms, "peak_mib": peak_mib}


def _result():
    return {
        "kind": "mmseg-side-by-side", "command": "python benchmarks/peers/mmseg_ann.py --threads 2",
        "machine": {"device": "cpu", "device_name": "Some CPU", "threads": 2, "torch": "2.x",
                    "matmul_4096_fp32_gflops": 100.0},
        "versions": {"mmsegmentation": "1.2.2", "mmengine": "0.10.7", "mmcv-lite": "2.1.0", "torch": "2.x"},
        "repeats": 3, "warmup": 1, "batch": 2, "train_size": [384, 384], "eval_size": [512, 1024],
        "agreement": {"argmax_agreement": 1.0, "max_abs_logit_diff": 2.5e-5, "logit_scale": 3.0},
        "cases": [_case("annseg", "train", "fp32", 7500.0, 4000.0), _case("mmseg", "train", "fp32", 10000.0, 5000.0),
                  _case("annseg", "eval", "fp32", 1400.0, 700.0), _case("mmseg", "eval", "fp32", 2000.0, 1000.0),
                  _case("annseg", "train", "bf16", 5000.0, 3000.0),
                  {"side": "annseg", "work": "eval", "lever": "compile", "error": "out of memory"}],
    }


def test_render_gives_the_rows_and_ratios(peers):
    text = peers.render_markdown(_result())
    assert "| training step, 2x3x384x384 (CE + 0.4 aux, SGD) | 7,500 ms, 4,000 MiB | 10,000 ms, 5,000 MiB " \
           "| 0.75x | 0.80x |" in text
    assert "| eval forward, 1x3x512x1024 (converted checkpoint, `annseg.load`) | 1,400 ms, 700 MiB " \
           "| 2,000 ms, 1,000 MiB | 0.70x | 0.70x |" in text
    assert "| training step, 2x3x384x384 (CE + 0.4 aux, SGD) | bf16 | 5,000 ms, 3,000 MiB | 0.50x | 0.60x |" in text
    assert "| compile | out of memory | - | - |" in text
    assert "mmsegmentation 1.2.2" in text and "Some CPU" in text and "100.000% of pixels" in text
    assert "Command: `python benchmarks/peers/mmseg_ann.py --threads 2`" in text
    assert "Arithmetic" not in text  # results without FLOP counts render as before


def test_render_gives_both_sides_flop_counts(peers):
    result = _result()
    result["agreement"]["gflop"] = {"eval": {"annseg": 600.0, "mmseg": 750.0},
                                    "train": {"annseg": 1200.0, "mmseg": 1500.0}}
    text = peers.render_markdown(result)
    assert "eval forward: annseg 600 GFLOP, mmseg 750 (0.80x)" in text
    assert "training step: annseg 1,200 GFLOP, mmseg 1,500 (0.80x)" in text


def test_readme_replaces_only_the_marked_block(peers, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_result()))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{peers.README_START}\nold\n{peers.README_END}\noutro\n")
    peers.main(["--readme", str(readme), "--out", str(tmp_path)])
    text = readme.read_text()
    assert text == f"intro\n{peers.README_START}\n{peers.render_markdown(_result())}{peers.README_END}\noutro\n"
    with pytest.raises(FileNotFoundError, match="run this script without --readme first"):
        peers.main(["--readme", str(readme), "--out", str(tmp_path / "none")])


def test_readme_block_is_the_committed_results(peers):
    results = ROOT / "benchmarks" / "peers" / "mmseg-cpu" / "results.json"
    readme = (ROOT / "README.md").read_text()
    block = readme.split(peers.README_START, 1)[1].split(peers.README_END, 1)[0]
    if not results.is_file():
        assert "generated here by `python benchmarks/peers/mmseg_ann.py --readme README.md`" in block
        pytest.skip("no committed mmseg side-by-side results yet")
    assert block.strip() == peers.render_markdown(json.loads(results.read_text())).strip()


def test_mmcv_ops_stand_in_raises_only_when_used(peers, monkeypatch):
    monkeypatch.delitem(sys.modules, "mmcv.ops", raising=False)
    peers._stand_in_mmcv_ops()
    ops = sys.modules["mmcv.ops"]
    monkeypatch.delitem(sys.modules, "mmcv.ops")
    from_import = ops.point_sample  # what `from mmcv.ops import point_sample` reads at mmseg's import
    with pytest.raises(RuntimeError, match="mmcv-lite"):
        from_import()
    with pytest.raises(AttributeError):
        ops.__path__
