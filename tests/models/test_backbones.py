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


def test_a_plain_stem_file_given_to_the_deep_stem_suggests_resnet50v1b(tmp_path):
    path = _save(tmp_path / "timm_resnet50.pth", _timm_state("resnet50"))
    with pytest.raises(ValueError, match=r"timm_resnet50.pth does not match timm 'resnet50c'.*missing keys: conv1\.0\.weight"
                                         r".*holds a ResNet-50 with the plain 7x7 stem.*use backbone 'resnet50v1b'"):
        create_model("fcn_resnet50", backbone_weights=path)


@pytest.mark.parametrize("timm_name, expected", [
    ("resnet18", "resnet18"), ("resnet34", "timm:resnet34"), ("resnet50", "resnet50v1b"),
    ("resnet101", "resnet101v1b"), ("resnet50c", "resnet50"), ("resnet101c", "resnet101"),
    ("resnet50s", "resnet50s"), ("resnet101s", "resnet101s"), ("resnet152c", "timm:resnet152c"),
])
def test_the_backbone_a_resnet_file_fits_is_read_from_its_stem_and_depth(timm_name, expected):
    from annseg.models.backbones import resnet_in_state_dict

    with torch.device("meta"):
        state = timm.create_model(timm_name, pretrained=False).state_dict()
    name, words = resnet_in_state_dict(state)
    assert name == expected and f"ResNet-{timm_name[6:9].rstrip('cs')}" in words
    if not name.startswith("timm:"):  # the suggested backbone's own keys are exactly the file's
        from annseg.models.backbones import RESNETS

        assert RESNETS[name] == timm_name
    assert resnet_in_state_dict({"weight": torch.zeros(1)}) is None


def test_the_authors_deep_base_stem_names_load_into_resnet50s(tmp_path):
    """conv1 bn1 conv2 bn2 conv3 bn3 at the top level (the authors' ImageNet file) -> timm's conv1.N / bn1."""
    from annseg.models.backbones import _DEEP_BASE_TO_TIMM

    state = {k: v.uniform_(-1, 1) if v.is_floating_point() else v for k, v in _timm_state("resnet50s").items()}
    theirs = {ours: mine for mine, ours in _DEEP_BASE_TO_TIMM.items()}
    authors = {next((theirs[p] + k[len(p):] for p in theirs if k.startswith(p)), k): v for k, v in state.items()}
    assert "conv3.weight" in authors and "conv1.0.weight" not in authors
    model = create_model("fcn_resnet50s", num_classes=3, backbone_weights=_save(tmp_path / "deep.pth", authors))
    for key, value in model.backbone.body.state_dict().items():
        assert torch.equal(value, state[key]), key


# ---- any timm CNN as the backbone -------------------------------------------------------
from annseg.losses import ANNLoss  # noqa: E402
from annseg.models import ANN, Backbone, resolve_backbone  # noqa: E402
from annseg.models.zoo import TIMM_MODELS  # noqa: E402

TINY = dict(head_channels=16, key_channels=8, value_channels=8, aux_channels=16)


# Forward and backward of each named model: tests/models/test_ann.py::test_every_model_trains_and_evaluates.
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_named_timm_model_is_built_on_the_backbones_channels(name):
    with torch.device("meta"):  # shapes only
        model = create_model(f"ann_{name}", num_classes=3)
    assert model.backbone.name == f"timm:{name}" and model.backbone.strides == (8, 8)
    low, high = model.backbone.channels  # AFNB and the auxiliary head take what the backbone gives
    assert (model.afnb.key.conv.in_channels, model.afnb.query.conv.in_channels) == (low, high)
    assert model.aux_head[0][0].in_channels == low and model.context[0].in_channels == high


@pytest.mark.parametrize("name", ["resnet50", *(f"timm:{n}" for n in TIMM_MODELS)])
def test_output_stride_8_and_16_feature_sizes(name):
    image = torch.empty(1, 3, 128, 192, device="meta")  # shapes only: a meta-device pass costs nothing
    for stride in (8, 16):
        with torch.device("meta"):
            backbone = Backbone(name, output_stride=stride)
        assert backbone.strides == (stride, stride)
        sizes = [tuple(f.shape[1:]) for f in backbone(image)]
        assert sizes == [(c, 128 // stride, 192 // stride) for c in backbone.channels], (name, stride)


def test_output_stride_is_an_ann_option():
    model = create_model("ann_resnet18", num_classes=2, output_stride=16, **TINY).eval()
    assert model.backbone.strides == (16, 16)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 45, 61)).shape == (1, 2, 45, 61)
    with pytest.raises(ValueError, match="output_stride must be one of \\(8, 16\\).*got 32"):
        ANN(2, backbone="resnet18", output_stride=32)


def test_one_spelling_one_network():
    assert resolve_backbone("resnet50") == "resnet50c"  # annseg's name: mmseg's deep stem, everywhere
    assert resolve_backbone("resnet50v1b") == "resnet50"
    assert resolve_backbone("timm:resnet50") == "resnet50"  # timm's own name, written as such
    assert ANN(2, backbone="resnet50", variant="fcn").backbone.body.conv1[0].out_channels == 32
    with torch.device("meta"):  # annseg's resnet50s has the authors' ceil-mode max-pool; timm's own has not
        assert Backbone("resnet50s").body.maxpool.ceil_mode and not Backbone("timm:resnet50s").body.maxpool.ceil_mode
    assert create_model("fcn_resnet50", num_classes=2).backbone.timm_name == "resnet50c"
    # any variant on any timm backbone, as a config's {variant}_{backbone} spells it
    assert create_model("fcn_timm:convnext_atto", num_classes=2).backbone.timm_name == "convnext_atto"


@pytest.mark.parametrize("name, message", [
    ("timm:not_a_model", r"unknown backbone 'timm:not_a_model': timm .* has no model 'not_a_model'"),
    ("timm:convnext_tiniest", r"did you mean timm:convnext_tiny"),
    ("convnext_tiny", r"unknown backbone 'convnext_tiny'; annseg's backbones are .*write 'timm:convnext_tiny'"),
    ("resnet50c", r"write 'timm:resnet50c' \(annseg's 'resnet50' is that network\)"),
    ("resnet999", r"unknown backbone 'resnet999'; annseg's backbones are \['resnet101', "),
])
def test_unknown_backbone_says_how_to_spell_it(name, message):
    with pytest.raises(ValueError, match=message):
        ANN(3, backbone=name)


def test_unknown_model_names_the_timm_form():
    with pytest.raises(ValueError, match=r"unknown model 'fcn_convnext_tiny'; for timm's 'convnext_tiny' write "
                                         r"'fcn_timm:convnext_tiny'; choose from .*\{variant\}_timm:NAME"):
        create_model("fcn_convnext_tiny")
    with pytest.raises(ValueError, match="unknown backbone 'timm:not_a_model'"):
        create_model("ann_timm:not_a_model")


def test_a_backbone_timm_cannot_dilate_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"backbone 'timm:swin_tiny_patch4_window7_224' cannot be dilated to output "
                                         r"stride 8: timm's 'swin_tiny_patch4_window7_224' has no output_stride option"):
        ANN(3, backbone="timm:swin_tiny_patch4_window7_224")


def test_the_network_checks_the_backbones_channels(monkeypatch):
    class OneLevel(Backbone):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.channels, self.strides = self.channels[1:], self.strides[1:]

    monkeypatch.setattr("annseg.models.ann.Backbone", OneLevel)
    with pytest.raises(ValueError, match=r"ANN needs two feature levels \(low, high\) at output stride 8; backbone "
                                         r"'resnet18' gives channels \(512,\) at strides \(8,\)"):
        ANN(3, backbone="resnet18")


def _randomised(state: dict) -> dict:
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}


# convnext's feature extractor renames its keys (stages.0 -> stages_0); mobilenetv3's drops a head conv
@pytest.mark.parametrize("name", ["convnext_atto", "mobilenetv3_small_050"])
def test_timm_state_dict_loads_strictly_into_a_timm_backbone(tmp_path, name):
    state = _randomised(timm.create_model(name, pretrained=False).state_dict())
    path = _save(tmp_path / f"{name}.pth", state)
    model = ANN(3, backbone=f"timm:{name}", backbone_weights=path, **TINY)
    body = model.backbone.body.state_dict()
    loaded = {k.replace(".", "_"): v for k, v in body.items()}
    used = {k: v for k, v in state.items() if k.replace(".", "_") in loaded}
    assert len(used) == len(body)  # every weight of the extractor came from the file
    for key, value in used.items():
        assert torch.equal(loaded[key.replace(".", "_")], value), key
    headless = {k: v for k, v in state.items() if not k.startswith(("head.fc.", "classifier."))}
    ANN(3, backbone=f"timm:{name}", backbone_weights=_save(tmp_path / "headless.pth", headless), **TINY)


def test_timm_backbone_weights_of_another_model_are_refused(tmp_path):
    femto = _save(tmp_path / "femto.pth", timm.create_model("convnext_femto", pretrained=False).state_dict())
    with pytest.raises(ValueError, match=r"femto.pth does not match timm 'convnext_atto': .*shape mismatches: "
                                         r"stem.0.weight: file \(48, 3, 4, 4\) vs model \(40, 3, 4, 4\)"):
        ANN(3, backbone="timm:convnext_atto", backbone_weights=femto)
    state = timm.create_model("convnext_atto", pretrained=False).state_dict()
    extra = _save(tmp_path / "extra.pth", state | {"stages.3.blocks.9.gamma": torch.zeros(320)})
    with pytest.raises(ValueError, match=r"1 unexpected keys: stages.3.blocks.9.gamma"):
        ANN(3, backbone="timm:convnext_atto", backbone_weights=extra)
    del state["stages.1.blocks.0.conv_dw.weight"]
    with pytest.raises(ValueError, match=r"1 missing keys: stages.1.blocks.0.conv_dw.weight"):
        ANN(3, backbone="timm:convnext_atto", backbone_weights=_save(tmp_path / "missing.pth", state))
