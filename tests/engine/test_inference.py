import pytest
import torch
from torch import nn

from annseg.engine.inference import infer, slide_logits, window_starts
from annseg.models import create_model


class PixelModel(nn.Module):
    """A per-pixel model (1x1 conv): sliding windows must reproduce whole-image logits exactly."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Counter(nn.Module):
    """Logit 1 everywhere it is run: the sums show how often each pixel was covered."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(x.shape[0], 1, *x.shape[-2:])


@pytest.fixture
def ann() -> nn.Module:
    return create_model("ann_resnet18", num_classes=3, head_channels=16, key_channels=8, value_channels=8,
                        aux_channels=8).eval()


def test_one_window_covering_the_image_equals_whole(ann: nn.Module) -> None:
    image = torch.randn(1, 3, 45, 61)
    whole = infer(ann, image, 3)
    slide = infer(ann, image, 3, mode="slide", crop_size=(64, 64), stride=(32, 32))
    torch.testing.assert_close(slide, whole)


@pytest.mark.parametrize(("length", "crop", "stride"), [(45, 16, 11), (100, 32, 32), (7, 16, 8), (33, 32, 1)])
def test_windows_cover_every_pixel(length: int, crop: int, stride: int) -> None:
    starts = window_starts(length, crop, stride)
    size = min(crop, length)
    covered = set()
    for start in starts:
        assert 0 <= start and start + size <= length
        covered.update(range(start, start + size))
    assert covered == set(range(length))


def test_sliding_counts_and_per_pixel_equivalence() -> None:
    image = torch.randn(2, 3, 45, 37)  # not divisible by the crop or the stride
    counts = slide_logits(Counter(), image, 1, (16, 16), (11, 11), batch_size=3)
    torch.testing.assert_close(counts, torch.ones(2, 1, 45, 37))  # averaged: every pixel seen, each once in total
    model = PixelModel().eval()
    torch.testing.assert_close(infer(model, image, 3, mode="slide", crop_size=(16, 16), stride=(11, 11), batch_size=4),
                               infer(model, image, 3), rtol=1e-5, atol=1e-5)


def test_flip_inference_is_flip_equivariant(ann: nn.Module) -> None:
    image = torch.randn(1, 3, 40, 56)
    logits = infer(ann, image, 3, flip=True, scales=(0.75, 1.0))
    flipped = infer(ann, image.flip(-1), 3, flip=True, scales=(0.75, 1.0))
    torch.testing.assert_close(flipped, logits.flip(-1), rtol=1e-4, atol=1e-4)


def test_multiscale_sums_views_at_full_size(ann: nn.Module) -> None:
    image = torch.randn(1, 3, 40, 56)
    both = infer(ann, image, 3, scales=(0.5, 1.0))
    assert both.shape == (1, 3, 40, 56)
    half = infer(ann, image, 3, scales=(0.5,))
    torch.testing.assert_close(both, half + infer(ann, image, 3))


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="stride 20 is larger than the crop 16"):
        window_starts(40, 16, 20)
    with pytest.raises(ValueError, match="needs crop_size and stride"):
        infer(PixelModel(), torch.randn(1, 3, 8, 8), 3, mode="slide")
    with pytest.raises(ValueError, match="unknown inference mode"):
        infer(PixelModel(), torch.randn(1, 3, 8, 8), 3, mode="tiles")  # type: ignore[arg-type]


@pytest.mark.parametrize(("height", "width"), [(1, 1), (5, 7), (9, 13), (30, 20)])
def test_images_smaller_than_the_crop_and_the_pooling_grid(ann: nn.Module, height: int, width: int) -> None:
    """A 5x7 image is a 1x1 feature map, smaller than the 8x8 anchor grid and the 32x32 crop."""
    image = torch.randn(1, 3, height, width)
    whole = infer(ann, image, 3)
    slide = infer(ann, image, 3, mode="slide", crop_size=(32, 32), stride=(16, 16))
    assert whole.shape == (1, 3, height, width) and bool(torch.isfinite(whole).all())
    torch.testing.assert_close(slide, whole)  # one window, clipped to the image
    both = infer(ann, image, 3, mode="slide", crop_size=(32, 32), stride=(16, 16), scales=(0.5, 1.25), flip=True)
    assert both.shape == (1, 3, height, width) and bool(torch.isfinite(both).all())


MEMORY = """
import json, sys, torch
from annseg.bench.machine import PeakMemory
from annseg.engine.inference import infer
from annseg.models import create_model
torch.set_num_threads(1)
model = create_model("ann_resnet18", num_classes=4, head_channels=16, key_channels=8, value_channels=8,
                     aux_channels=8).eval()
image = torch.randn(1, 3, 512, 1024)
cpu = torch.device("cpu")
infer(model, torch.randn(1, 3, 128, 128), 4)  # allocator and kernels warmed up on one window
with PeakMemory(cpu) as window:
    infer(model, torch.randn(1, 3, 128, 128), 4)
with PeakMemory(cpu) as slide:
    infer(model, image, 4, mode="slide", crop_size=(128, 128), stride=(96, 96))
with PeakMemory(cpu) as whole:
    infer(model, image, 4)
print(json.dumps({"method": slide.method, "window": window.peak, "slide": slide.peak, "whole": whole.peak}))
"""


def test_sliding_windows_keep_a_large_image_within_the_stated_memory_bound() -> None:
    """README: beyond one batch of windows, sliding inference holds 4 * (2K + 1) * H * W bytes."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", MEMORY], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    if peaks["method"] != "VmHWM":
        pytest.skip("this system cannot reset the resident-set high-water mark")
    bound = 4 * (2 * 4 + 1) * 512 * 1024  # 18 MiB
    assert peaks["slide"] <= bound + peaks["window"] + 8 * 2**20, peaks
    assert peaks["whole"] > 3 * bound, peaks  # the whole image at once would not fit the bound


def test_bf16_precision_runs_under_autocast_and_returns_float32_logits(ann: nn.Module) -> None:
    """eval.precision=bf16: the network under bfloat16 autocast, logits summed in float32, close to fp32's."""
    images = torch.randn(1, 3, 40, 56)
    seen = []
    hook = ann.classifier.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        plain = infer(ann, images, 3)
        half = infer(ann, images, 3, precision="bf16", flip=True)
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.bfloat16, torch.bfloat16]
    assert half.dtype == torch.float32
    flipped_plain = infer(ann, images, 3, flip=True)
    torch.testing.assert_close(half, flipped_plain, rtol=0, atol=0.1 * flipped_plain.abs().max().item())
    assert plain.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        infer(ann, images, 3, precision="fp8")
