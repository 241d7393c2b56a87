import json

import pytest
import torch

from annseg.bench.train import PARTS, measure_train, random_batch, render_markdown, step_parts, training_step
from annseg.cli import main
from annseg.losses import ANNLoss
from annseg.models import create_model
from tests.test_cli import run

CPU = torch.device("cpu")
# Narrow heads and blocks on the smallest ResNet: a step in a fraction of a second.
SMALL = {"head_channels": 32, "key_channels": 16, "value_channels": 16, "aux_channels": 32}


def test_cli_writes_every_part(tmp_path):
    out = tmp_path / "train"
    proc = run("bench", "train", "--models", "ann_resnet18", "--sizes", "64x64", "--batch", "2", "--repeats", "1",
               "--warmup", "1", "--threads", "1", "--option", "head_channels=32", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "results.json").read_text())
    (case,) = result["cases"]
    assert result["kind"] == "train" and result["warmup"] == 1
    assert case["model"] == "ann_resnet18" and case["batch"] == 2 and case["options"] == {"head_channels": 32}
    assert case["time_ms"] > 0 and case["peak_mib"] > 0 and case["precision"] == "fp32"
    assert set(case["parts_ms"]) == {f"{p}_{d}" for p in PARTS for d in ("fwd", "bwd")} | {"optimizer"}
    assert all(v > 0 for v in case["parts_ms"].values()), case["parts_ms"]
    text = (out / "results.md").read_text()
    assert "| ann_resnet18 | 2x64x64 | head_channels=32 |" in text and "momentum buffers" in text
    assert "[1/1] ann_resnet18" in proc.stderr


@pytest.mark.parametrize("name", ["ann_resnet18", "fcn_resnet18", "nb_resnet18", "afnb_resnet18"])
def test_parts_add_up_to_the_pass_total(name):
    """The split covers the whole step, for every variant; absent blocks take no time."""
    torch.manual_seed(0)
    model = create_model(name, 19, **SMALL)
    images, masks = random_batch(2, 32, 32, CPU)
    step, optimizer = training_step(model, images, masks, CPU)
    step()  # SGD's momentum exists from the first step on
    parts, total = step_parts(model, ANNLoss(ohem=False), optimizer, images, masks, CPU)
    assert sum(parts.values()) == pytest.approx(total, rel=0.01)
    assert all(v >= 0 for v in parts.values()), parts
    present = {"afnb": name.split("_")[0] in ("afnb", "ann"), "apnb": name.split("_")[0] in ("nb", "ann")}
    for block, there in present.items():
        assert (parts[f"{block}_fwd"] > 0 and parts[f"{block}_bwd"] > 0) == there, parts
    assert parts["backbone_bwd"] > 0 and parts["heads_bwd"] > 0 and parts["loss_bwd"] > 0


def test_a_step_trains_the_network():
    """The measured step is a real SGD step: gradients reach every parameter, momentum exists."""
    torch.manual_seed(0)
    model = create_model("ann_resnet18", 19, **SMALL)
    before = model.classifier.weight.detach().clone()
    step, optimizer = training_step(model, *random_batch(2, 32, 32, CPU), CPU)
    step()
    assert model.training and not torch.equal(before, model.classifier.weight)
    assert all(p.grad is not None and "momentum_buffer" in optimizer.state[p] for p in model.parameters())


def test_bf16_case_runs_and_renders():
    record = measure_train("ann_resnet18", 32, 32, 2, CPU, repeats=1, warmup=1, threads=1, options=SMALL,
                           precision="bf16")
    assert record["precision"] == "bf16" and record["time_ms"] > 0
    assert sum(record["parts_ms"].values()) == pytest.approx(record["parts_total_ms"], rel=0.01)
    result = {"repeats": 1, "warmup": 1, "command": "annseg bench train --precision bf16",
              "machine": {"device_name": "cpu", "device": "cpu", "threads": 1, "torch": torch.__version__,
                          "matmul_4096_fp32_gflops": 1.0},
              "cases": [{"model": "ann_resnet18", "height": 32, "width": 32, **record},
                        {"model": "ann_resnet50", "height": 32, "width": 32, "batch": 2, "error": "out of memory"}]}
    text = render_markdown(result)
    assert "| ann_resnet18 | 2x32x32 | bf16, aux_channels=32, " in text
    assert "| ann_resnet50 | 2x32x32 | | out of memory |" in text


def test_bf16_autocast_reaches_the_network():
    """Under bf16 the backbone computes in bf16 (autocast is around the forward, not only the loss)."""
    model = create_model("fcn_resnet18", 19, **SMALL)
    seen = []
    model.backbone.register_forward_hook(lambda _m, _i, out: seen.append(out[-1].dtype))
    step, _ = training_step(model, *random_batch(1, 32, 32, CPU), CPU, precision="bf16")
    step()
    assert seen == [torch.bfloat16]


def test_cli_refuses_an_unknown_option_in_one_line(tmp_path):
    proc = run("bench", "train", "--models", "ann_resnet18", "--option", "no_such_knob=1", "--out", str(tmp_path / "o"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("annseg: error: unknown option(s) ['no_such_knob'] for 'ann_resnet18'")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--option", "dropout"], "is not KEY=VALUE"),
    (["--option", "a.b=1"], "without dots"),
    (["--precision", "fp16"], "invalid choice: 'fp16'"),
])
def test_cli_refuses_malformed_levers(args, message, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "train", *args])
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_bench_model_takes_the_same_levers(tmp_path, monkeypatch, capsys):
    """`bench model --precision bf16 --option ...` records them per case and names them above its table."""
    from annseg.bench import machine as bench_machine

    machine = {"device": "cpu", "device_name": "cpu", "threads": 1, "torch": torch.__version__,
               "matmul_4096_fp32_gflops": 1.0}
    monkeypatch.setattr(bench_machine, "describe", lambda device, threads: machine)  # the yardstick takes seconds
    monkeypatch.setattr(bench_machine, "native_bf16", lambda device: True)  # the plumbing, on any CPU
    out = tmp_path / "model"
    main(["bench", "model", "--models", "apnb_resnet18", "--sizes", "32x32", "--repeats", "1", "--threads", "1",
          "--precision", "bf16", "--option", "head_channels=32", "--out", str(out)])
    (case,) = json.loads((out / "results.json").read_text())["cases"]
    assert case["precision"] == "bf16" and case["options"] == {"head_channels": 32} and not case["compile"]
    assert "bf16 autocast, create_model options head_channels=32" in (out / "results.md").read_text()


def test_bf16_is_refused_where_torch_would_time_its_fallback(monkeypatch):
    from annseg.bench import machine as bench_machine

    monkeypatch.setattr(bench_machine, "native_bf16", lambda device: False)
    with pytest.raises(SystemExit, match="--precision bf16: cpu .* has no native bf16 kernels"):
        main(["bench", "train", "--models", "ann_resnet18", "--sizes", "32x32", "--precision", "bf16"])
