import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import annseg
from annseg.data.transforms import Normalization
from annseg.engine.config import EvalConfig
from annseg.engine.predict import predict_labels, view_sum
from annseg.engine.segmenter import Segmenter
from tests.conftest import CUDA
from tests.engine.tiny import tiny_checkpoint

RGB = np.random.default_rng(0).integers(0, 256, (37, 45, 3), dtype=np.uint8)  # odd size: 5x6 features
GRAY = RGB[:, :, 0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("segmenter") / "model.ckpt"
    tiny_checkpoint(path, "eval.flip=true", "data.mean=[0.5, 0.4, 0.3]")
    return path


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> Segmenter:
    return annseg.load(checkpoint)


def reference(model: Segmenter, rgb: np.ndarray) -> np.ndarray:
    """predict_labels on the uint8 RGB version, with the normalisation and settings the checkpoint holds."""
    image = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    normalization = Normalization((0.5, 0.4, 0.3), (0.229, 0.224, 0.225))
    settings = EvalConfig(flip=True, crop_size=(32, 32), stride=(16, 16))
    return predict_labels(model.network, image, 3, normalization, settings).numpy()


def test_load_gives_a_ready_model_with_its_metadata(checkpoint: Path, model: Segmenter) -> None:
    assert isinstance(model, Segmenter) and not model.training and not model.network.training
    assert model.classes == ["class0", "class1", "class2"] and model.num_classes == 3
    assert len(model.palette) == 3 and all(len(c) == 3 for c in model.palette)
    assert model.normalization.mean == (0.5, 0.4, 0.3)
    assert model.settings.flip and model.settings.crop_size == (32, 32)  # the checkpoint's config.eval
    images = torch.randn(2, 3, 33, 41)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model.network(images), rtol=0, atol=0)


@pytest.mark.parametrize("make, rgb", [
    (lambda: Image.fromarray(RGB), RGB),
    (lambda: Image.fromarray(GRAY), np.stack([GRAY] * 3, axis=2)),
    (lambda: Image.fromarray(np.dstack([RGB, np.full_like(GRAY, 7)])), RGB),  # RGBA: alpha dropped
    (lambda: Image.fromarray(GRAY.astype(np.uint16) * 257), np.stack([GRAY] * 3, axis=2)),  # mode I;16
    (lambda: RGB, RGB),
    (lambda: GRAY, np.stack([GRAY] * 3, axis=2)),
    (lambda: GRAY[:, :, None], np.stack([GRAY] * 3, axis=2)),
    (lambda: np.dstack([RGB, np.zeros_like(GRAY)]), RGB),
    (lambda: RGB.astype(np.uint16) * 257, RGB),
    (lambda: RGB.astype(np.float32) / 255, RGB),
    (lambda: RGB.astype(np.float64) / 255, RGB),
    (lambda: torch.from_numpy(RGB).permute(2, 0, 1), RGB),
    (lambda: torch.from_numpy(RGB).permute(2, 0, 1).float() / 255, RGB),
], ids=["pil-rgb", "pil-l", "pil-rgba", "pil-i16", "np-rgb", "np-gray", "np-gray1", "np-rgba", "np-uint16",
        "np-float32", "np-float64", "tensor", "tensor-float"])
def test_predict_equals_predict_labels_on_the_rgb_version(model: Segmenter, make, rgb: np.ndarray) -> None:
    image = make()
    assert not isinstance(image, Image.Image) or image.mode in ("RGB", "L", "RGBA", "I;16")
    labels = model.predict(image)
    expected = reference(model, rgb)
    assert labels.shape == (37, 45) and labels.dtype == np.int64
    assert len(np.unique(expected)) > 1  # a constant map would hide a wrong conversion
    np.testing.assert_array_equal(labels, expected)


def test_settings_are_used_and_replaceable(model: Segmenter, monkeypatch: pytest.MonkeyPatch) -> None:
    """predict follows replaced ``settings`` (here sliding windows without flip), not the checkpoint's."""
    import dataclasses

    from annseg.engine import segmenter as module

    seen = []
    monkeypatch.setattr(module, "view_sum", lambda *args: seen.append(args[4]) or view_sum(*args))
    settings = dataclasses.replace(model.settings, flip=False, mode="slide")
    plain = Segmenter(model.network, model.classes, model.palette, model.normalization, settings)
    image = torch.from_numpy(RGB).permute(2, 0, 1)
    expected = predict_labels(model.network, image, 3, model.normalization, settings).numpy()
    np.testing.assert_array_equal(plain.predict(RGB), expected)
    assert seen == [settings]


@pytest.mark.parametrize("image, error, message", [
    (np.zeros((3, 20, 30), np.uint8), ValueError, r"shape \(3, 20, 30\).*channels first"),
    (np.zeros((20, 30, 2), np.uint8), ValueError, r"shape \(20, 30, 2\); expected \(H, W\) gray"),
    (np.zeros((2, 20, 30, 3), np.uint8), ValueError, "expected"),
    (np.zeros((0, 30, 3), np.uint8), ValueError, "shape"),
    (np.zeros((20, 30, 3), np.int32), TypeError, "dtype int32; expected uint8"),
    (np.zeros((20, 30), bool), TypeError, "dtype bool"),
    (np.full((20, 30, 3), 2.0), ValueError, r"values in \[2.0, 2.0\]; expected values in \[0, 1\]"),
    (np.full((20, 30, 3), np.nan, np.float32), ValueError, "expected values in"),
    (torch.zeros(3, 20, 30, dtype=torch.int32), TypeError, "dtype torch.int32; expected uint8"),
    (torch.full((3, 20, 30), 1.5), ValueError, r"values in \[1.5, 1.5\]; expected values in \[0, 1\]"),
    (torch.zeros(3, 0, 30), ValueError, r"shape \(3, 0, 30\)"),
    ([RGB, np.zeros((20, 30, 2), np.uint8)], ValueError, r"image 1: image array has shape \(20, 30, 2\)"),
    (torch.zeros(1, 3, 20, 30, dtype=torch.uint8), ValueError, r"shape \(1, 3, 20, 30\); expected \(3, H, W\)"),
    ([[0, 1], [1, 0]], TypeError, "cannot predict on a list"),
])
def test_wrong_inputs_are_clear_errors(model: Segmenter, image, error, message) -> None:
    with pytest.raises(error, match=message):
        model.predict(image)


def test_a_list_is_batched_by_size_and_equals_one_by_one(model: Segmenter, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three images of one size and one of another: two forward batches (2 + 1 at batch_size 2, then 1),
    results in input order and equal to predicting each alone."""
    from annseg.engine import segmenter as module

    rng = np.random.default_rng(1)
    images = [RGB, rng.integers(0, 256, (29, 51, 3), dtype=np.uint8), RGB[::-1].copy(), RGB[:, ::-1].copy()]
    batches = []
    monkeypatch.setattr(module, "view_sum", lambda *args: batches.append(tuple(args[1].shape)) or view_sum(*args))
    for output in ("labels", "logits", "probabilities"):
        batches.clear()
        together = model.predict(images, output=output, batch_size=2)
        assert batches == [(2, 3, 37, 45), (1, 3, 37, 45), (1, 3, 29, 51)]
        alone = [model.predict(image, output=output) for image in images]
        assert isinstance(together, list) and len(together) == 4
        for one, other in zip(together, alone):
            assert one.shape == other.shape and one.dtype == other.dtype
            if output == "labels":
                np.testing.assert_array_equal(one, other)
            else:  # batched convolutions may re-associate sums
                np.testing.assert_allclose(one, other, rtol=1e-5, atol=1e-5)
    assert model.predict((RGB,))[0].shape == (37, 45)


def test_probabilities_and_logits_agree_with_the_labels(model: Segmenter) -> None:
    """The checkpoint flips, so two views: logits are their mean, probabilities its softmax."""
    logits = model.predict(RGB, output="logits")
    probabilities = model.predict(RGB, output="probabilities")
    assert logits.shape == probabilities.shape == (3, 37, 45) and logits.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(0), 1, rtol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(0), model.predict(RGB))
    image = torch.from_numpy(RGB).permute(2, 0, 1)
    total = view_sum(model.network, image[None], 3, model.normalization, model.settings)
    torch.testing.assert_close(torch.from_numpy(logits), total[0] / 2)
    with pytest.raises(ValueError, match="output='scores'; choose one of"):
        model.predict(RGB, output="scores")
    with pytest.raises(ValueError, match="batch_size=0"):
        model.predict([RGB], batch_size=0)


def test_dir_lists_the_public_api_and_no_helpers() -> None:
    names = dir(annseg)
    assert {"create_model", "load", "list_models", "ANN", "APNB", "AFNB", "__version__"} <= set(names)
    assert not {"Any", "PackageNotFoundError", "version"} & set(names)


def test_colorize_gives_a_palette_image(model: Segmenter) -> None:
    labels = model.predict(RGB)
    image = model.colorize(labels)
    assert image.mode == "P" and image.size == (45, 37)
    np.testing.assert_array_equal(np.asarray(image), labels)
    assert np.asarray(image.convert("RGB"))[0, 0].tolist() == list(model.palette[labels[0, 0]])


def test_missing_checkpoint_and_palette_errors(tmp_path: Path, model: Segmenter) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        annseg.load(tmp_path / "nothing.ckpt")
    with pytest.raises(ValueError, match="2 colours for 3 classes"):
        Segmenter(model.network, model.classes, model.palette[:2], model.normalization)


def test_import_annseg_stays_light() -> None:
    """``annseg.load`` is lazy: importing annseg must not import timm or the engine."""
    code = "import sys, annseg; print('timm' in sys.modules, 'annseg.engine' in sys.modules, callable(annseg.load))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "True"]


@CUDA
def test_predict_on_cuda_matches_cpu(checkpoint: Path) -> None:
    model = annseg.load(checkpoint)
    expected = model.predict(RGB)
    model.to("cuda")
    assert model.device.type == "cuda"
    np.testing.assert_array_equal(model.predict(RGB), expected)


def test_readme_load_and_predict_example_runs(checkpoint: Path, tmp_path: Path) -> None:
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "annseg.load(" in block)
    Image.fromarray(RGB).save(tmp_path / "photo.png")
    for old, new in (("runs/default/checkpoints/last.ckpt", checkpoint), ("photo.jpg", tmp_path / "photo.png"),
                     ("labels.png", tmp_path / "labels.png")):
        assert old in code
        code = code.replace(old, str(new))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert set(namespace["names"]) <= {"class0", "class1", "class2"} and (tmp_path / "labels.png").is_file()
    assert namespace["labels"].shape == (480, 640)
