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


def _save(path, state):
    torch.save(state, path)
    return path


def test_torchvision_resnet18_loads_into_the_plain_stem(tmp_path):
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    for value in state.values():
        if value.is_floating_point():
            value.uniform_(-1, 1)
    model = create_model("ann_resnet18", num_classes=3, backbone_weights=_save(tmp_path / "tv18.pth", state))
    for key, value in model.backbone.body.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_torchvision_resnet50_is_resnet50v1b_dilated(tmp_path):
    """Same layer3/layer4 as torchvision's own dilated ResNet-50 (replace_stride_with_dilation)."""
    import torchvision

    from tests.convert.mmseg_reference import randomise

    net = randomise(torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])).eval()
    model = create_model("fcn_resnet50v1b", num_classes=3, backbone_weights=_save(tmp_path / "tv50.pth", net.state_dict()))
    image = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        x = net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(image))))))
        expected = [net.layer3(x)]
        expected.append(net.layer4(expected[0]))
        got = model.eval().backbone(image)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("layout", ["mmcv", "mmpretrain", "mmseg"])
def test_openmmlab_resnetv1c_loads_into_resnet50(tmp_path, layout):
    """ResNetV1c from mmcv's model zoo (``stem.*`` + ``fc``), mmpretrain (``backbone.`` + ``head.fc``)
    or a whole mmseg model (``backbone.`` + heads): renamed to timm's keys, same features."""
    from tests.convert.mmseg_reference import ResNetV1c, randomise

    net = randomise(ResNetV1c(50)).eval()
    state = net.state_dict()
    if layout == "mmcv":
        state |= {"fc.weight": torch.zeros(10, 2048), "fc.bias": torch.zeros(10)}
    else:
        head = "head.fc" if layout == "mmpretrain" else "decode_head.conv_seg"
        state = {"state_dict": {f"backbone.{k}": v for k, v in state.items()} | {f"{head}.weight": torch.zeros(10, 2048)}}
    model = create_model("fcn_resnet50", num_classes=3, backbone_weights=_save(tmp_path / "v1c.pth", state))
    image = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        expected, got = net(image), model.eval().backbone(image)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * b.abs().max().item())


def test_stem_mismatch_lists_the_keys(tmp_path):
    import torchvision

    path = _save(tmp_path / "tv50.pth", torchvision.models.resnet50(weights=None).state_dict())
    with pytest.raises(ValueError, match=r"tv50.pth does not match timm 'resnet50c'.*missing keys: conv1\.0\.weight"):
        create_model("fcn_resnet50", backbone_weights=path)
