from pathlib import Path

import pytest
import torch

import annseg
from annseg.layers import AFNB, APNB, NonLocal2d
from annseg.models import ANN, create_model, list_models
from annseg.losses import ANNLoss
from tests.conftest import CUDA

README = Path(__file__).resolve().parents[2] / "README.md"


def test_zoo_names():
    names = list_models()
    for required in ("ann_resnet101", "ann_resnet50", "ann_resnet18", "ann_resnet101s",
                     "fcn_resnet101", "nb_resnet101", "apnb_resnet101", "afnb_resnet101",
                     "ann_convnext_tiny", "ann_efficientnet_b0", "ann_mobilenetv3_large_100", "ann_regnety_008"):
        assert required in names
    assert annseg.list_models() == names


# The v1b backbones differ from the others by their stem only (tests/models/test_backbones.py):
# one variant each keeps this, the slowest test file, from growing by ten ResNet-50/101 runs.
@pytest.mark.parametrize("name", [n for n in list_models() if not n.endswith("v1b") or n.startswith("ann_")])
def test_every_model_trains_and_evaluates(name):
    model = create_model(name, num_classes=5).train()
    image = torch.randn(2, 3, 65, 49)
    main, aux = model(image)
    assert main.shape == aux.shape == (2, 5, 65, 49)
    target = torch.randint(0, 5, (2, 65, 49))
    ANNLoss(min_kept=1000)((main, aux), target).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 97, 129))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 97, 129)


@pytest.mark.parametrize("variant, afnb, apnb", [
    ("fcn", None, None), ("nb", None, NonLocal2d), ("apnb", None, APNB), ("afnb", AFNB, None), ("ann", AFNB, APNB),
])
def test_variant_structure(variant, afnb, apnb):
    model = create_model(f"{variant}_resnet18", num_classes=3)
    assert model.variant == variant
    assert (model.afnb is None) == (afnb is None) and (afnb is None or type(model.afnb) is afnb)
    assert (model.apnb is None) == (apnb is None) and (apnb is None or type(model.apnb) is apnb)


def _bottleneck_resnet(stem: tuple[int, ...], blocks: tuple[int, ...]) -> int:
    """Parameters of a timm ResNet with a 3-conv deep stem and Bottleneck blocks, no fc."""
    total, c_in = 0, 3
    for c in stem:  # 3x3 convs without bias, each with BatchNorm
        total += 9 * c_in * c + 2 * c
        c_in = c
    for i, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512))):
        for b in range(n):
            total += c_in * planes + 2 * planes + 9 * planes * planes + 2 * planes + planes * 4 * planes + 8 * planes
            if b == 0:  # projection shortcut
                total += c_in * 4 * planes + 8 * planes
            c_in = 4 * planes
    return total


def _ann_head(k: int, low: int = 1024, high: int = 2048, head: int = 512, ck: int = 256, cv: int = 256) -> int:
    conv = lambda i, o, ks=1, bias=True: ks * ks * i * o + (o if bias else 0)  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    afnb = (conv(high, ck) + bn(ck) + conv(low, ck) + bn(ck) + conv(low, cv) + conv(cv, high)
            + conv(2 * high, high) + bn(high))
    context = conv(high, head, 3) + bn(head)
    apnb = conv(head, ck) + bn(ck) + conv(head, cv) + conv(cv, head) + conv(2 * head, head) + bn(head)
    classifier = conv(head, k)
    aux = conv(low, 512, 3) + bn(512) + conv(512, k)
    return afnb + context + apnb + classifier + aux


def test_ann_resnet101_parameter_count_from_layer_shapes_and_readme():
    model = create_model("ann_resnet101", num_classes=19)
    expected = _bottleneck_resnet((32, 32, 64), (3, 4, 23, 3)) + _ann_head(19)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert f"{expected:,}" in README.read_text(), "README must state ann_resnet101's parameter count"


def test_ann_resnet101s_uses_authors_stem():
    model = create_model("ann_resnet101s", num_classes=19)
    expected = _bottleneck_resnet((64, 64, 128), (3, 4, 23, 3)) + _ann_head(19)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_unknown_name_option_and_variant_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'ann_resnet7'; choose from"):
        create_model("ann_resnet7")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['key_chanels'\]"):
        create_model("ann_resnet18", key_chanels=64)
    with pytest.raises(ValueError, match="unknown variant 'psp'"):
        ANN(3, backbone="resnet18", variant="psp")
    with pytest.raises(ValueError, match="num_classes"):
        create_model("ann_resnet18", num_classes=0)
    with pytest.raises(ValueError, match="unknown backbone 'resnet999'"):
        ANN(3, backbone="resnet999")


def test_options_reach_the_blocks():
    model = create_model("ann_resnet18", num_classes=4, sizes=(1, 2), key_channels=32, head_channels=64)
    assert model.apnb.sample.num_anchors == 5
    assert model.afnb.key.conv.out_channels == 32
    assert model.classifier.in_channels == 64


def test_align_corners_option():
    model = create_model("fcn_resnet18", num_classes=2, align_corners=False).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 33, 35)).shape == (1, 2, 33, 35)


@CUDA
def test_cuda_forward_backward_bf16():
    model = create_model("ann_resnet18", num_classes=3).cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        main, aux = model(torch.randn(2, 3, 64, 64, device="cuda"))
    ANNLoss(min_kept=100)((main, aux), torch.randint(0, 3, (2, 64, 64), device="cuda")).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("variant", ["fcn", "nb", "ann"])
def test_fuse_for_inference_keeps_the_output(variant):
    model = create_model(f"{variant}_resnet18", num_classes=3, head_channels=32, key_channels=8, value_channels=8)
    for module in model.modules():  # non-trivial statistics and a non-zero W, so folding matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    model.eval()
    image = torch.randn(1, 3, 41, 37)
    with torch.no_grad():
        expected = model(image)
        assert model.fuse_for_inference() is model
        assert variant == "fcn" or model.apnb.folded is not None
        torch.testing.assert_close(model(image), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="eval"):
        create_model("ann_resnet18", num_classes=3).train().fuse_for_inference()


def test_readme_states_the_timm_named_models_parameter_counts():
    from annseg.models.zoo import TIMM_MODELS

    for name in TIMM_MODELS:
        with torch.device("meta"):  # shapes only
            model = create_model(f"ann_{name}", num_classes=19)
        row = f"| `ann_{name}` | `timm:{name}` | {sum(p.numel() for p in model.parameters()):,} |"
        assert row in README.read_text(), row
