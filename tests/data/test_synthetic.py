import numpy as np
import pytest
import torch

from annseg.data import Synthetic


def test_items_are_deterministic_and_need_no_files() -> None:
    a, b = Synthetic("val", length=4), Synthetic("val", length=4)
    for i in range(4):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["mask"], b[i]["mask"])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(Synthetic("train")[0]["image"], a[0]["image"])  # splits differ
    item = a[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 64, 96)
    assert item["mask"].dtype == torch.int64 and item["mask"].shape == (64, 96) and item["name"] == "val_00000"


def test_object_class_follows_the_distant_beacon() -> None:
    dataset = Synthetic("train", length=60)
    gaps, colours = [], {2: [], 3: []}
    for i in range(len(dataset)):
        image, mask = dataset.generate(i)
        beacon = image[mask == 1].mean(0)
        red = beacon[0] > beacon[2]
        object_classes = set(np.unique(mask)) - {0, 1}
        assert object_classes == ({2} if red else {3})
        cls = object_classes.pop()
        colours[cls].append(image[mask == cls].mean(0))
        gaps.append(np.nonzero(mask >= 2)[1].min() - np.nonzero(mask == 1)[1].max())
    assert min(gaps) >= 15  # objects and beacon never share a neighbourhood
    # Locally the two object classes look the same: the cue is only the beacon.
    assert np.abs(np.mean(colours[2], 0) - np.mean(colours[3], 0)).max() < 5


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown split 'training'"):
        Synthetic("training")
    with pytest.raises(ValueError, match="too small"):
        Synthetic(size=(64, 64))
    with pytest.raises(IndexError):
        Synthetic(length=2)[2]
