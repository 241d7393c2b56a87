"""The shared build of a converted model: strict, on the meta device, in the model's dtype."""

import pytest
import torch

from annseg.convert.common import build_converted
from annseg.engine.builders import build_model
from annseg.engine.config import ModelConfig

CONFIG = ModelConfig(options={"head_channels": 16, "key_channels": 8, "value_channels": 8, "aux_channels": 8})


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """A half-precision file without num_batches_tracked (as torch < 0.4.1 wrote BatchNorm)."""
    torch.manual_seed(0)
    reference = build_model(CONFIG, 3, load_backbone_weights=False)
    return {k: v.half() if v.is_floating_point() else v for k, v in reference.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def test_the_files_tensors_become_the_weights_in_the_models_dtype(state):
    model = build_converted(CONFIG, 3, state, "file x")
    assert not model.training
    for name, tensor in model.state_dict().items():
        assert not tensor.is_meta, name
        if name.endswith("num_batches_tracked"):
            assert tensor.item() == 0
        else:
            assert tensor.dtype == torch.float32 and torch.equal(tensor, state[name].float()), name
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 45, 21))).all()


def test_unmatched_keys_are_listed_in_the_files_names(state):
    edited = dict(state, extra=torch.zeros(1))
    del edited["classifier.bias"]
    edited["classifier.weight"] = edited["classifier.weight"][:2]
    with pytest.raises(ValueError, match=r"^file x does not match annseg ann_resnet18 .*\(3 classes\): "
                       r"1 missing keys: theirs\.classifier\.bias; 1 unexpected keys: theirs\.extra; "
                       r"1 shape mismatches: theirs\.classifier\.weight: file \(2, 16, 1, 1\) vs model \(3, 16, 1, 1\)"):
        build_converted(CONFIG, 3, edited, "file x", file_key=lambda key: f"theirs.{key}")
