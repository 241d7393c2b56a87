import pytest
import timm
import torch

from annseg.models import create_model


def _timm_state(name: str) -> dict:
    return timm.create_model(name, pretrained=False).state_dict()  # includes the fc classifier


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict_round_trips(tmp_path, suffix):
    state = _timm_state("resnet18")
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = create_model("ann_resnet18", num_classes=3, backbone_weights=path)
    loaded = model.backbone.body.state_dict()
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert set(state) - set(loaded) == {"fc.weight", "fc.bias"}


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=f"{path}.*never downloads"):
        create_model("ann_resnet18", backbone_weights=path)


def test_wrong_backbone_lists_the_mismatch(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(_timm_state("resnet50c"), path)
    with pytest.raises(ValueError, match=r"resnet50.pth does not match timm 'resnet18'.*(missing|unexpected|shape)"):
        create_model("ann_resnet18", backbone_weights=path)


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read backbone weights .*broken.pth"):
        create_model("ann_resnet18", backbone_weights=path)


def test_stems():
    authors = create_model("fcn_resnet50s", num_classes=2).backbone.body
    mmseg = create_model("fcn_resnet50", num_classes=2).backbone.body
    assert authors.conv1[0].out_channels == 64 and authors.maxpool.ceil_mode
    assert mmseg.conv1[0].out_channels == 32 and not mmseg.maxpool.ceil_mode


def test_backbone_reports_channels_and_strides():
    model = create_model("fcn_resnet50", num_classes=2)
    assert model.backbone.channels == (1024, 2048)
    assert model.backbone.strides == (8, 8)
    layer3 = model.backbone.body.layer3
    assert layer3[0].conv2.dilation == (1, 1) and layer3[1].conv2.dilation == (2, 2)
    layer4 = model.backbone.body.layer4
    assert layer4[0].conv2.dilation == (2, 2) and layer4[1].conv2.dilation == (4, 4)
