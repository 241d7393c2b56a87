import torch
from torchvision import tv_tensors

from annseg.data.transforms import Normalization, RandomScale, eval_transforms, train_transforms


def _pair(height: int = 20, width: int = 30) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    image = tv_tensors.Image(torch.randint(0, 256, (3, height, width), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.randint(0, 4, (height, width)))
    return image, mask


def test_train_transforms_crop_pad_and_normalise() -> None:
    transform = train_transforms((48, 40), scale=(0.5, 2.0))
    for _ in range(5):
        image, mask = transform(*_pair())
        assert image.dtype == torch.float32 and image.shape == (3, 48, 40)
        assert mask.dtype == torch.int64 and mask.shape == (48, 40)
        assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 255}  # nearest resize, ignore padding
    image, mask = train_transforms((64, 64), scale=(1.0, 1.0), aspect=(1.0, 1.0))(*_pair())
    assert (mask == 255).sum() == 64 * 64 - 20 * 30  # padded to the crop with the ignore label


def test_random_scale_keeps_image_and_mask_aligned() -> None:
    image, _ = _pair(40, 40)
    mask = tv_tensors.Mask((image[0] > 127).long())
    out_image, out_mask = RandomScale((2.0, 2.0), (1.0, 1.0))(image, mask)
    assert out_image.shape[-2:] == out_mask.shape[-2:] == (80, 80)
    torch.testing.assert_close(out_mask[::2, ::2], mask)


def test_eval_transform_is_normalisation_only() -> None:
    image, mask = _pair()
    out, out_mask = eval_transforms(Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))(image, mask)
    torch.testing.assert_close(out, image.float() / 127.5 - 1)
    assert torch.equal(out_mask, mask)
