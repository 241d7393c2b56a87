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
    (["bench", "blocks", "--warmup", "-1"], "argument --warmup: '-1' is not an int >= 0"),
    (["bench", "blocks", "--repeats", "0"], "argument --repeats: '0' is not a positive int"),
    (["bench", "blocks", "--out", ""], "argument --out: the output path is empty"),
    (["train", "--devices", "0"], "argument --devices: '0' is not auto, a number of devices >= 1"),
    (["train", "--devices", "-1"], "argument --devices: '-1' is not auto"),
    (["train", "--devices", "two"], "argument --devices: 'two' is not auto"),
    (["train", "--devices", "0,0"], "argument --devices: '0,0' is not auto"),
    (["train", "--accelerator", "gpus"], "argument --accelerator: invalid choice: 'gpus'"),
    (["train", "--num-nodes", "0"], "argument --num-nodes: '0' is not a positive int"),
    (["train", "--out", " "], "argument --out: the output path is empty"),
    (["eval", "--scales", "1", "nan"], "argument --scales: 'nan' is not a finite number > 0"),
    (["eval", "--scales", "-0.5"], "argument --scales: '-0.5' is not a finite number > 0"),
    (["predict", "x.png", "--scales", "inf"], "argument --scales: 'inf' is not a finite number > 0"),
    (["predict", "x.png", "--out", ""], "argument --out: the output path is empty"),
    (["export", "onnx", "--opset", "x"], "argument --opset: invalid int value: 'x'"),
    (["demo", "--overlays", "-1"], "argument --overlays: '-1' is not an int >= 0"),
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


def test_devices_are_parsed_as_lightning_takes_them():
    from annseg.cli import build_parser

    def devices(*flag):
        return build_parser().parse_args(["train", *flag]).devices

    assert devices() == "auto" and devices("--devices", "2") == 2 and devices("--devices", "0,1") == [0, 1]


@pytest.mark.parametrize("args, message", [
    (["--accelerator", "cuda"], "--accelerator cuda: torch sees no cuda device on this machine; use --accelerator cpu"),
    (["--accelerator", "gpu", "--devices", "1"], "--accelerator gpu: torch sees no gpu device"),
    (["--devices", "0,1"], "--devices 0,1: device indices need a GPU and this run uses the CPU"),
])
def test_hardware_this_machine_lacks_is_refused_before_lightning(args, message, tmp_path, monkeypatch):
    """Lightning raises a MisconfigurationException traceback for these; annseg names the flag."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # a machine without a GPU, wherever this runs
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *args, "--out", str(tmp_path / "run"), "--set", "train.max_iters=1"])
    assert str(exit_info.value).startswith("annseg: error: ") and message in str(exit_info.value)
    assert "\n" not in str(exit_info.value) and not (tmp_path / "run").exists()


def test_more_gpus_than_the_machine_has_is_refused(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for devices, message in (("4", "--devices 4: this machine has 2 cuda device(s)"),
                             ("0,2", "--devices 0,2: device index 2 does not exist; this machine has 2 cuda device(s), 0 to 1")):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--accelerator", "cuda", "--devices", devices, "--out", str(tmp_path / "run")])
        assert str(exit_info.value) == f"annseg: error: {message}"


class _Stop(Exception):
    """Raised in place of the long work, once the command has said what it says first."""


def _stop(*args, **kwargs):
    raise _Stop


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(native, tmp_path, monkeypatch, capsys):
    import annseg.engine
    from annseg.bench import machine
    from annseg.engine import evaluate as evaluate_module
    from tests.engine.tiny import tiny_checkpoint, tiny_cli_args

    monkeypatch.setattr(machine, "native_bf16", lambda device: native)
    monkeypatch.setattr(annseg.engine, "fit", _stop)
    with pytest.raises(_Stop):
        main(["train", *tiny_cli_args("train.precision=bf16-mixed"), "--accelerator", "cpu", "--out", str(tmp_path / "t")])
    train_err = capsys.readouterr().err
    tiny_checkpoint(tmp_path / "m.ckpt")
    monkeypatch.setattr(evaluate_module, "evaluate", _stop)
    with pytest.raises(_Stop):
        main(["eval", "--checkpoint", str(tmp_path / "m.ckpt"), "--device", "cpu", "--set", "eval.precision=bf16",
              "--out", str(tmp_path / "e.json")])
    eval_err = capsys.readouterr().err
    for err, precision in ((train_err, "bf16-mixed"), (eval_err, "bf16")):
        warned = f"warning: precision {precision} on a CPU without native bf16" in err
        assert warned == (not native), err
    main_fp32 = ["train", *tiny_cli_args(), "--accelerator", "cpu", "--out", str(tmp_path / "f")]
    monkeypatch.setattr(machine, "native_bf16", lambda device: False)
    with pytest.raises(_Stop):
        main(main_fp32)
    assert "warning" not in capsys.readouterr().err  # fp32 says nothing
