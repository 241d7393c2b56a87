import io
import json
import re
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

import annseg
from annseg.cli import main
from annseg.engine.export import DEFAULT_OPSET, check_onnx, describe_onnx, export_onnx
from annseg.engine.segmenter import Segmenter
from tests.engine.tiny import tiny_checkpoint

OPTIONS = "model.options={head_channels: 16, key_channels: 8, value_channels: 8, aux_channels: 8, align_corners: %s}"


def tolerance(max_abs_logit: float) -> float:
    """Float32 rounding, relative to the logits' scale (the exported graph is fused, PyTorch's not)."""
    return 1e-4 * max(1.0, max_abs_logit)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    tiny_checkpoint(folder / "corners.ckpt", OPTIONS % "true")
    tiny_checkpoint(folder / "centres.ckpt", OPTIONS % "false")
    return folder


def test_static_export_agrees_with_pytorch_and_carries_metadata(folder: Path) -> None:
    model = annseg.load(folder / "centres.ckpt", fuse=False)  # unfolded: export folds a copy
    assert model.network.align_corners is False
    info = export_onnx(model, folder / "static.onnx", 32, 48)
    assert info.opset == DEFAULT_OPSET
    assert info.inputs == [("image", [1, 3, 32, 48])] and info.outputs == [("logits", [1, 3, 32, 48])]
    check = check_onnx(folder / "static.onnx", model, [torch.randn(1, 3, 32, 48) for _ in range(2)])
    assert check.max_abs_logit > 0.5 and check.max_abs_diff <= tolerance(check.max_abs_logit)
    assert model.network.apnb.folded is None  # exported a fused copy; the model is unchanged

    session = onnxruntime.InferenceSession(str(folder / "static.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == model.classes
    assert json.loads(meta["palette"]) == [list(c) for c in model.palette]
    assert json.loads(meta["normalization"]) == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert "minus normalization.mean" in meta["input"]
    with pytest.raises(Exception, match="invalid dimensions"):  # a static file takes its size only
        session.run(None, {"image": np.zeros((1, 3, 40, 48), np.float32)})


@pytest.fixture(scope="module")
def dynamic(folder: Path) -> tuple[Path, str, str]:
    """``annseg export onnx --dynamic`` run once (tracing takes seconds): the file, stdout, stderr."""
    out = folder / "dynamic.onnx"
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        main(["export", "onnx", "--checkpoint", str(folder / "corners.ckpt"), "--out", str(out), "--dynamic",
              "--height", "40", "--width", "56"])
    return out, stdout.getvalue(), stderr.getvalue()


def test_cli_dynamic_export_agrees_at_other_sizes(folder: Path, dynamic: tuple[Path, str, str]) -> None:
    out, printed, progress = dynamic
    assert "exporting" in progress
    assert f"wrote {out} (opset 18)" in printed
    assert "image   [batch, 3, height, width]" in printed and "logits  [batch, 3, height, width]" in printed
    assert "1x3x40x56, 2x3x21x31" in printed  # the export size and another one
    diff, scale = map(float, re.search(r"max abs diff (\S+) \(logits up to (\S+)\)", printed).groups())
    assert diff <= tolerance(scale)

    model = annseg.load(folder / "corners.ckpt")
    assert model.network.align_corners is True
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(size, generator=generator) for size in ((1, 3, 45, 21), (3, 3, 37, 61), (1, 3, 96, 64))]
    check = check_onnx(out, model, inputs)
    assert check.max_abs_logit > 0.5 and check.max_abs_diff <= tolerance(check.max_abs_logit)
    labels = onnxruntime.InferenceSession(str(out)).run(None, {"image": inputs[2].numpy()})[0].argmax(1)
    with torch.no_grad():
        expected = model(inputs[2]).argmax(1).numpy()
    assert len(np.unique(expected)) > 1 and (labels == expected).mean() > 0.99


@pytest.mark.parametrize("args, message", [
    (["--opset", "12"], "opset 12 is not supported; choose 17 to 23"),
    (["--checkpoint", "missing.ckpt"], "checkpoint missing.ckpt does not exist"),
])
def test_cli_errors_are_one_line(folder: Path, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=re.escape(f"annseg: error: {message}")):
        main(["export", "onnx", "--checkpoint", str(folder / "corners.ckpt"), "--out", str(folder / "x.onnx"), *args])
    assert not (folder / "x.onnx").exists()


def test_missing_onnx_install_names_the_extra(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` raise ImportError
    with pytest.raises(SystemExit, match=re.escape('needs onnxscript, which is not installed: pip install "annseg[onnx]"')):
        main(["export", "onnx", "--checkpoint", str(folder / "corners.ckpt")])
    with pytest.raises(ImportError, match="annseg\\[onnx\\]"):
        export_onnx(annseg.load(folder / "corners.ckpt"), folder / "y.onnx", 32, 32)


@pytest.mark.slow
@pytest.mark.parametrize("opset", [17, 20, 23])
def test_other_opsets_export_and_agree(folder: Path, opset: int) -> None:
    model = annseg.load(folder / "corners.ckpt")
    path = folder / f"opset{opset}.onnx"
    assert export_onnx(model, path, 32, 48, dynamic=True, opset=opset).opset == opset
    check = check_onnx(path, model, [torch.randn(2, 3, 32, 48), torch.randn(1, 3, 29, 53)])
    assert check.max_abs_diff <= tolerance(check.max_abs_logit)
    assert describe_onnx(path).metadata["classes"] == json.dumps(model.classes)


@pytest.mark.slow
def test_unfused_export_of_a_bare_network(folder: Path) -> None:
    """A plain nn.Module (no Segmenter) exports too, with only the metadata given."""
    model: Segmenter = annseg.load(folder / "centres.ckpt")
    info = export_onnx(model.network, folder / "bare.onnx", 24, 40, fuse=False, metadata={"note": "bare"})
    assert info.metadata["note"] == "bare" and "classes" not in info.metadata
    check = check_onnx(folder / "bare.onnx", model.network, [torch.randn(1, 3, 24, 40)])
    assert check.max_abs_diff <= tolerance(check.max_abs_logit)


def test_readme_onnxruntime_example_runs(dynamic: tuple[Path, str, str], tmp_path: Path) -> None:
    from PIL import Image

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "onnxruntime" in block)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 45, 3), np.uint8)).save(tmp_path / "photo.png")
    code = code.replace("runs/default/model.onnx", str(dynamic[0])).replace("photo.jpg", str(tmp_path / "photo.png"))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["labels"].shape == (37, 45) and namespace["classes"] == ["class0", "class1", "class2"]
