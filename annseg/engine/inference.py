"""Test-time inference: whole image, sliding windows, multi-scale and flip (docs/method.md, "Test protocols").

Every path returns raw logits (B, K, H, W) at the input's size. Multi-scale and flip sum the
logits of each view after resizing them back to the original size, as the authors' code does
(the argmax equals that of their mean).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from annseg.engine.config import EvalConfig

log = logging.getLogger(__name__)


def _forward(model: nn.Module, images: Tensor) -> Tensor:
    logits = model(images)
    return logits[0] if isinstance(logits, (tuple, list)) else logits


def whole_image_bytes(model: nn.Module, height: int, width: int, num_classes: int, element_size: int = 4) -> int | None:
    """Estimated peak activation bytes of one whole-image forward (batch 1) of an ANN network.

    Computed from the backbone's channel widths (None for a network without ``backbone.channels``).
    Inference keeps few maps alive at once; the largest set is one of
    - the stride-2 stem: two maps of its widest convolution (128 channels at most), over 4;
    - layer1 at stride 4: its 256-channel input and output and two 64-channel inner maps, over 16;
    - layer4's last bottleneck at stride 8: its input and output (C4 each), two inner maps (C4/4
      each), the dilated 3x3 convolution's unfolded input (9 C4/4, the CPU's im2col) and
      layer3's output (C3), kept for AFNB, over 64;
    plus, at full resolution, the input (3 values) and the logits three times (upsampled, their
    float32 copy, ``infer``'s sum): 3 + 3K. For ResNet-50/101 (C3 = 1024, C4 = 2048) and 19
    classes that is 228 values, 912 bytes in float32, per input pixel (measured: about 970 on the
    CPU, the growth of peak memory from 256x512 to 512x1024 of ann_resnet101): 58 GB for an
    8000x8000 image, 1.9 GB for 1024x2048.
    """
    channels = getattr(getattr(model, "backbone", None), "channels", None)
    if not channels or len(channels) != 2:
        return None
    low, high = channels
    per_pixel = max(2 * 128 / 4, (2 * 256 + 2 * 64) / 16, (low + 2 * high + 11 * high / 4) / 64) + 3 + 3 * num_classes
    return int(per_pixel * height * width * element_size)


def available_memory(device: torch.device) -> int | None:
    """Free bytes where ``device``'s tensors live: CUDA's free memory, else the system's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        import psutil  # optional: more portable than /proc

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_WARNED: set[tuple[int, int, int, str]] = set()  # the (batch, height, width, device) warned about


def warn_if_too_large(model: nn.Module, images: Tensor, num_classes: int, size: tuple[int, int] | None = None) -> bool:
    """Log a WARNING when a whole-image forward of ``images`` likely needs more memory than is free.

    ``size``: the (H, W) the network sees when it is not the images' own (a test scale). The
    estimate is ``whole_image_bytes`` per image of the batch against ``available_memory``, so a
    run that would be killed for memory (or fail with CUDA out of memory) is told to use sliding
    windows before it starts. Each size warns once per process (a dataset of large images would
    repeat it for every image). Returns whether it warned.
    """
    height, width = size or tuple(images.shape[-2:])
    key = (images.shape[0], height, width, str(images.device))
    if key in _WARNED:
        return False
    needed = whole_image_bytes(model, height, width, num_classes, images.element_size())
    free = available_memory(images.device)
    if needed is None or free is None or needed * images.shape[0] <= free:
        return False
    _WARNED.add(key)
    log.warning("whole-image inference on a %dx%d image needs about %.1f GB of activation memory but %.1f GB is "
                "free on %s; use --mode slide (eval.mode=slide: windows of eval.crop_size) or a smaller image",
                height, width, needed * images.shape[0] / 1e9, free / 1e9, images.device)
    return True


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of size ``min(crop, length)`` that cover ``0..length``.

    Windows step by ``stride``; the last one is aligned to the end, so every pixel is covered
    and no window leaves the image.
    """
    if crop < 1 or stride < 1:
        raise ValueError(f"crop and stride must be positive, got crop={crop}, stride={stride}")
    if stride > crop:
        raise ValueError(f"stride {stride} is larger than the crop {crop}: windows would leave gaps")
    crop = min(crop, length)
    count = max(length - crop + stride - 1, 0) // stride + 1
    return [min(i * stride, length - crop) for i in range(count)]


def slide_logits(
    model: nn.Module, images: Tensor, num_classes: int, crop_size: Sequence[int], stride: Sequence[int], batch_size: int = 1
) -> Tensor:
    """Logits from overlapping ``crop_size`` windows, averaged where they overlap.

    Windows run ``batch_size`` at a time. Memory: one batch of windows through the network,
    plus the float32 (B, K, H, W) sums and (H, W) counts, averaged in place; with ``infer``'s
    own sum over views that is 4 * (2K + 1) * H * W bytes per image beyond the network's
    share, whatever the image size (tests/engine/test_inference.py checks the bound).
    """
    batch, _, height, width = images.shape
    crop_h, crop_w = min(crop_size[0], height), min(crop_size[1], width)
    boxes = [(top, left) for top in window_starts(height, crop_size[0], stride[0])
             for left in window_starts(width, crop_size[1], stride[1])]
    logits = images.new_zeros(batch, num_classes, height, width, dtype=torch.float32)
    count = images.new_zeros(1, 1, height, width, dtype=torch.float32)
    for index in range(0, len(boxes), batch_size):
        chunk = boxes[index: index + batch_size]
        crops = torch.cat([images[:, :, t: t + crop_h, l: l + crop_w] for t, l in chunk])
        out = _forward(model, crops).float().split(batch)
        for (top, left), window in zip(chunk, out):
            logits[:, :, top: top + crop_h, left: left + crop_w] += window
            count[:, :, top: top + crop_h, left: left + crop_w] += 1
    return logits.div_(count)


@torch.inference_mode()
def infer(
    model: nn.Module,
    images: Tensor,
    num_classes: int,
    *,
    mode: Literal["whole", "slide"] = "whole",
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    short_side: int | None = None,
    batch_size: int = 1,
    precision: Literal["32", "bf16"] = "32",
) -> Tensor:
    """Logits (B, K, H, W) for normalised ``images`` (B, 3, H, W), summed over scales and flips.

    ``short_side``: scale 1 means the image resized so that its short side is this long (the
    ADE20K protocol); None means its own size. ``model`` must be in eval mode and return
    logits at its input's size. ``precision="bf16"`` runs the network under bfloat16 autocast;
    the logits are summed in float32 either way.
    """
    if precision not in ("32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; choose '32' or 'bf16'")
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        return _infer(model, images, num_classes, mode, crop_size, stride, scales, flip, short_side, batch_size)


def _infer(model: nn.Module, images: Tensor, num_classes: int, mode: str, crop_size: Sequence[int] | None,
           stride: Sequence[int] | None, scales: Sequence[float], flip: bool, short_side: int | None,
           batch_size: int) -> Tensor:
    if mode not in ("whole", "slide"):
        raise ValueError(f"unknown inference mode {mode!r}; choose 'whole' or 'slide'")
    if mode == "slide" and (crop_size is None or stride is None):
        raise ValueError("sliding-window inference needs crop_size and stride")
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive numbers, got {list(scales)}")
    height, width = images.shape[-2:]
    if mode == "whole":
        base = 1.0 if short_side is None else short_side / min(height, width)
        largest = max(1, round(height * base * max(scales))), max(1, round(width * base * max(scales)))
        warn_if_too_large(model, images, num_classes, largest)
    align_corners = getattr(model, "align_corners", False)
    total = images.new_zeros(images.shape[0], num_classes, height, width, dtype=torch.float32)
    base = 1.0 if short_side is None else short_side / min(height, width)
    for scale in (base * s for s in scales):
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = images if size == (height, width) else F.interpolate(
            images, size=size, mode="bilinear", align_corners=align_corners)
        for flipped in (False, True) if flip else (False,):
            view = scaled.flip(-1) if flipped else scaled
            if mode == "slide":
                logits = slide_logits(model, view, num_classes, crop_size, stride, batch_size)  # type: ignore[arg-type]
            else:
                logits = _forward(model, view).float()
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (height, width):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=align_corners)
            total += logits
    return total


def infer_with(model: nn.Module, images: Tensor, num_classes: int, settings: EvalConfig) -> Tensor:
    """``infer`` with the test-time settings of a run's ``eval`` config."""
    return infer(model, images, num_classes, mode=settings.mode, crop_size=settings.crop_size, stride=settings.stride,
                 scales=settings.scales, flip=settings.flip, short_side=settings.short_side,
                 batch_size=settings.batch_size, precision=settings.precision)
