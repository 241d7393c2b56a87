import json
import os
import shutil
import subprocess
import sys

from pathlib import Path

import pytest

from annseg.cli import main


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The installed ``annseg`` console script, as a user runs it."""
    script = shutil.which("annseg", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert script, "the annseg console script is not installed: pip install -e ."
    return subprocess.run([script, *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_commands():
    proc = run("--help")
    assert proc.returncode == 0
    assert "bench" in proc.stdout and "models" in proc.stdout


def test_bench_blocks_writes_results(tmp_path):
    out = tmp_path / "bench"
    proc = run("bench", "blocks", "--sizes", "24x24", "32x16", "--channels", "64", "--blocks", "nb-plain", "apnb",
               "--forward-only", "--repeats", "2", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "results.json").read_text())
    assert [(c["block"], c["height"], c["width"]) for c in result["cases"]] == [
        (b, h, w) for h, w in ((24, 24), (32, 16)) for b in ("nb-plain", "apnb")
    ]
    assert all(c["time_ms"] > 0 and len(c["times_ms"]) == 2 for c in result["cases"])
    assert result["kind"] == "blocks" and result["machine"]["torch"] and result["machine"]["threads"] >= 1
    assert "| [1,64,32,16] | apnb |" in (out / "results.md").read_text()
    assert "[4/4] apnb" in proc.stderr  # progress per case


def test_bench_model_writes_results_with_parts(tmp_path):
    out = tmp_path / "model"
    proc = run("bench", "model", "--models", "ann_resnet18", "--sizes", "64x96", "--repeats", "1",
               "--threads", "1", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (case,) = json.loads((out / "results.json").read_text())["cases"]
    assert case["model"] == "ann_resnet18" and case["fused"] and case["time_ms"] > 0
    assert set(case["parts_ms"]) == {"backbone", "afnb", "apnb", "head"} and case["parts_ms"]["afnb"] > 0
    assert "| 64x96 | ann_resnet18 |" in (out / "results.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["bench", "blocks", "--sizes", "12"], "not HEIGHTxWIDTH"),
    (["bench", "blocks", "--anchors", "1,0"], "anchor sizes"),
    (["bench", "blocks", "--device", "cuda:x"], "--device"),
    (["bench", "readme", "--readme", "/nonexistent/README.md"], "does not exist"),
    (["bench", "model", "--models", "ann_resnet7"], "unknown model"),
])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    text = str(exit_info.value.code) + capsys.readouterr().err
    assert message in text


def test_models_lists_every_named_model_with_its_parameter_count():
    """Counted on the meta device (cheap); the counts are those of the built models."""
    from annseg.models import create_model, list_models

    proc = run("models", "--num-classes", "5")
    assert proc.returncode == 0, proc.stderr
    counts = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in proc.stdout.splitlines()[1:]}
    assert sorted(counts) == list_models()
    for name in ("ann_resnet18", "ann_mobilenetv3_large_100"):
        assert counts[name] == sum(p.numel() for p in create_model(name, num_classes=5).parameters()), name
