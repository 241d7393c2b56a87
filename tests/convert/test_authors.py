"""The authors' checkpoints: their module names and forward, re-stated here, against the conversion.

``TheirANN`` re-states MendelXu/ANN's ``annn`` network (deep-base dilated ResNet, AFNB, context
+ APNB, ``cls``, ``dsn``) in plain torch with their attribute names, so its ``state_dict()`` has
their key names and shapes, and their forward (BGR 0-255 minus a mean, their attention code,
align_corners=True). Nothing here comes from annseg.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import tv_tensors

from annseg.cli import main
from annseg.convert import CONVERTERS, load_authors_checkpoint
from annseg.data.meta import CITYSCAPES_CLASSES
from annseg.data.transforms import Normalization
from annseg.engine.checkpoint import load_model, save_model
from annseg.engine.config import config_from_dict, load_config

BGR_MEAN = (102.9801, 115.9465, 122.7717)  # their hypes/seg/*/fs_annn_*_seg.json
HEAD, KEY, VALUE, AUX = 48, 16, 24, 32  # small head widths: read back from the shapes
SIZE = (67, 99)  # odd; the stem's 34x50 map makes the ceil-mode max-pool differ from floor mode


def bn_relu(channels: int) -> nn.Sequential:  # their ModuleHelper.BNReLU
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def nostride_dilate(module: nn.Module, dilate: int) -> None:  # their DilatedResnetBackbone._nostride_dilate
    if isinstance(module, nn.Conv2d):
        if module.stride == (2, 2):
            module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = module.padding = (dilate // 2, dilate // 2)
        elif module.kernel_size == (3, 3):
            module.dilation = module.padding = (dilate, dilate)


class DeepBaseDilatedResNet(nn.Module):
    """deepbase_resnet50_dilated8: returns [layer3, layer4] (their x[-2], x[-1])."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.prefix = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)), ("bn1", nn.BatchNorm2d(64)),
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(64, 64, 3, padding=1, bias=False)), ("bn2", nn.BatchNorm2d(64)), ("relu2", nn.ReLU()),
            ("conv3", nn.Conv2d(64, 128, 3, padding=1, bias=False)), ("bn3", nn.BatchNorm2d(128)),
            ("relu3", nn.ReLU()),
        ]))
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.inplanes = 128
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.layer3.apply(partial(nostride_dilate, dilate=2))
        for block in self.layer4:  # multi_grid [1, 1, 1]
            block.apply(partial(nostride_dilate, dilate=4))

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.layer2(self.layer1(self.maxpool(self.prefix(x))))
        low = self.layer3(x)
        return [low, self.layer4(low)]


class PSPModule(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (1, 3, 6, 8)) -> None:
        super().__init__()
        self.stages = nn.ModuleList([nn.AdaptiveAvgPool2d((s, s)) for s in sizes])

    def forward(self, feats: Tensor) -> Tensor:
        n, c = feats.shape[:2]
        return torch.cat([stage(feats).view(n, c, -1) for stage in self.stages], -1)


class SelfAttentionBlock(nn.Module):
    """One ``stages.0`` of their AFNB (``low`` given) or APNB (``f_query`` is ``f_key``)."""

    def __init__(self, low: int, high: int, key: int, value: int, out: int, shared: bool) -> None:
        super().__init__()
        self.key_channels, self.value_channels = key, value
        self.f_key = nn.Sequential(nn.Conv2d(low, key, 1), bn_relu(key))
        self.f_query = self.f_key if shared else nn.Sequential(nn.Conv2d(high, key, 1), bn_relu(key))
        self.f_value = nn.Conv2d(low, value, 1)
        self.W = nn.Conv2d(value, out, 1)
        self.psp = PSPModule()

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        b = high.shape[0]
        value = self.psp(self.f_value(low)).permute(0, 2, 1)
        query = self.f_query(high).view(b, self.key_channels, -1).permute(0, 2, 1)
        key = self.psp(self.f_key(low))
        sim_map = F.softmax((self.key_channels ** -0.5) * torch.matmul(query, key), dim=-1)
        context = torch.matmul(sim_map, value).permute(0, 2, 1).contiguous()
        return self.W(context.view(b, self.value_channels, *high.shape[2:]))


class AFNB(nn.Module):
    def __init__(self, low: int, high: int, out: int, key: int, value: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList([SelfAttentionBlock(low, high, key, value, out, shared=False)])
        self.conv_bn_dropout = nn.Sequential(nn.Conv2d(out + high, out, 1), nn.BatchNorm2d(out), nn.Dropout2d(0.05))

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        return self.conv_bn_dropout(torch.cat([self.stages[0](low, high), high], 1))


class APNB(nn.Module):
    def __init__(self, channels: int, key: int, value: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList([SelfAttentionBlock(channels, channels, key, value, channels, shared=True)])
        self.conv_bn_dropout = nn.Sequential(nn.Conv2d(2 * channels, channels, 1), bn_relu(channels), nn.Dropout2d(0.05))

    def forward(self, feats: Tensor) -> Tensor:
        return self.conv_bn_dropout(torch.cat([self.stages[0](feats, feats), feats], 1))


class TheirANN(nn.Module):
    """Their asymmetric_non_local_network; forward(BGR - mean) -> (aux, main)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.backbone = DeepBaseDilatedResNet()
        self.fusion = AFNB(1024, 2048, 2048, KEY, VALUE)
        self.context = nn.Sequential(nn.Conv2d(2048, HEAD, 3, padding=1), bn_relu(HEAD), APNB(HEAD, KEY, VALUE))
        self.cls = nn.Conv2d(HEAD, num_classes, 1)
        self.dsn = nn.Sequential(nn.Conv2d(1024, AUX, 3, padding=1), bn_relu(AUX), nn.Dropout2d(0.05),
                                 nn.Conv2d(AUX, num_classes, 1))

    def forward(self, x_: Tensor) -> tuple[Tensor, Tensor]:
        low, high = self.backbone(x_)
        aux = self.dsn(low)
        x = self.cls(self.context(self.fusion(low, high)))
        up = partial(F.interpolate, size=x_.shape[2:], mode="bilinear", align_corners=True)
        return up(aux), up(x)


@pytest.fixture(scope="module")
def theirs() -> TheirANN:
    """Random weights (W too, which they zero), BN statistics gathered on random images."""
    torch.manual_seed(0)
    net = TheirANN(num_classes=19)
    for module in net.modules():
        if isinstance(module, nn.Conv2d) and module.weight.abs().sum() == 0:
            nn.init.normal_(module.weight, std=module.in_channels ** -0.5)
            nn.init.uniform_(module.bias, -0.1, 0.1)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
            module.momentum = None  # running statistics = the average over the batch below
    with torch.no_grad():
        net.train()(torch.randn(2, 3, *SIZE) * 60)
    return net.eval()


def their_checkpoint(net: nn.Module, path: Path, **extra: object) -> Path:
    """Saved like their RunnerHelper.save_net: DataParallel's ``module.`` keys under state_dict."""
    state = OrderedDict((f"module.{k}", v) for k, v in net.state_dict().items())
    torch.save({"state_dict": state, **extra}, path)
    return path


@pytest.fixture(scope="module")
def converted(theirs: TheirANN, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, dict, Path]:
    path = their_checkpoint(theirs, tmp_path_factory.mktemp("authors") / "fs_annn_cityscapes_seg_max_performance.pth",
                            runner_state={"iters": 60000, "max_performance": np.float64(0.79)})
    model, meta = load_authors_checkpoint(path)
    return model, meta, path


def image_pair(meta: dict, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """One RGB uint8 image as annseg feeds it and as the authors' code does (BGR, 0-255, minus mean)."""
    generator = torch.Generator().manual_seed(1)
    rgb = torch.randint(0, 256, (3, *SIZE), dtype=torch.uint8, generator=generator)
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    if dtype == torch.float32:  # the transform annseg's predict and eval apply
        ours = Normalization(tuple(mean), tuple(std)).transform()(tv_tensors.Image(rgb)).as_subclass(Tensor)
    else:
        ours = (rgb.to(dtype) / 255 - torch.tensor(mean, dtype=dtype)[:, None, None]) / torch.tensor(std, dtype=dtype)[:, None, None]
    theirs = rgb.flip(0).to(dtype) - torch.tensor(BGR_MEAN, dtype=dtype)[:, None, None]
    return ours.unsqueeze(0), theirs.unsqueeze(0)


def test_their_state_dict_has_their_names(theirs: TheirANN) -> None:
    keys = theirs.state_dict()
    for key in ("backbone.prefix.conv3.weight", "backbone.layer3.0.downsample.1.running_var",
                "fusion.stages.0.f_query.1.0.weight",
                "context.2.stages.0.f_query.0.weight", "context.2.conv_bn_dropout.1.0.running_mean",
                "dsn.3.bias", "cls.weight"):
        assert key in keys


# float64: the conversion is exact (differences ~1e-12 of the output's scale). float32: both
# sides round differently through 50 layers; the float32 reference itself is ~5e-5 of the
# scale away from the float64 one, so the tolerance is a few times that.
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-9), (torch.float32, 3e-4)])
def test_converted_model_computes_their_function(theirs: TheirANN, converted: tuple, dtype: torch.dtype,
                                                 tolerance: float) -> None:
    model, meta, _ = converted
    theirs, model = copy.deepcopy(theirs).to(dtype), copy.deepcopy(model).to(dtype)
    ours_input, their_input = image_pair(meta, dtype)
    with torch.no_grad():
        their_aux, their_main = theirs(their_input)
        main = model(ours_input)
        low, _ = model.backbone(ours_input)
        aux = model._upsample(model.aux_head(low), ours_input)
    assert main.shape == (1, 19, *SIZE) and main.dtype == dtype
    scale = their_main.abs().max().item()
    assert scale > 1.0 and their_main.std() > 0.1  # not a degenerate (constant) output
    torch.testing.assert_close(main, their_main, rtol=tolerance, atol=tolerance * scale)
    torch.testing.assert_close(aux, their_aux, rtol=tolerance, atol=tolerance * their_aux.abs().max().item())


def test_meta_describes_their_network(converted: tuple) -> None:
    model, meta, path = converted
    config = config_from_dict(meta["config"])
    assert config.model.name == "ann_resnet50s" and not model.training
    assert config.model.options == {"head_channels": HEAD, "key_channels": KEY, "value_channels": VALUE,
                                    "aux_channels": AUX}
    assert config.data.dataset == "cityscapes" and meta["classes"] == list(CITYSCAPES_CLASSES)
    # RGB in [0, 1]: their BGR mean reversed over 255, std 1/255.
    assert meta["normalization"]["mean"] == pytest.approx([m / 255 for m in BGR_MEAN[::-1]])
    assert meta["normalization"]["std"] == pytest.approx([1 / 255] * 3)
    assert (config.data.mean, config.data.std) == (tuple(meta["normalization"]["mean"]), tuple(meta["normalization"]["std"]))
    # Every tensor of the file has a place: the model's plus APNB's f_query copy of f_key (conv + BN: 7).
    assert meta["converted_from"] == {"format": "authors", "path": str(path), "tensors": len(model.state_dict()) + 7,
                                      "eval_from": "packaged config cityscapes"}
    assert config.eval == load_config("cityscapes").eval  # Cityscapes' test protocol, not the built-in 64x96 windows
    assert CONVERTERS["authors"] is load_authors_checkpoint


def test_round_trip_through_an_annseg_checkpoint(converted: tuple, tmp_path: Path) -> None:
    model, meta, _ = converted
    save_model(tmp_path / "ann.ckpt", model, meta)
    loaded, loaded_meta = load_model(tmp_path / "ann.ckpt")
    ours_input, _ = image_pair(meta)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ours_input), model(ours_input), rtol=0, atol=0)
    assert loaded_meta["config"] == config_from_dict(meta["config"])
    assert loaded_meta["normalization"] == meta["normalization"]


def test_config_dict_sets_dataset_and_normalization(theirs: TheirANN, tmp_path: Path) -> None:
    """Their runner stores the training JSON; its dataset and normalize entries are used."""
    config_dict = {"dataset": "cityscapes", "network": {"model_name": "annn", "multi_grid": [1, 1, 1],
                                                        "backbone": "deepbase_resnet50_dilated8"},
                   "data": {"input_mode": "RGB", "normalize": {"div_value": 255.0, "mean": [0.5, 0.4, 0.3],
                                                               "std": [0.2, 0.25, 0.3]}}}
    path = tmp_path / "rgb.pth"
    # openseg's name for the stem, and no num_batches_tracked (torch < 0.4.1): both accepted.
    state = {k.replace("backbone.prefix.", "backbone.resinit."): v for k, v in theirs.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state, "config_dict": config_dict}, path)
    model, meta = load_authors_checkpoint(path)
    assert meta["normalization"] == {"mean": pytest.approx([0.5, 0.4, 0.3]), "std": pytest.approx([0.2, 0.25, 0.3])}
    # RGB input: the stem conv is not flipped.
    torch.testing.assert_close(model.backbone.body.conv1[0].weight, theirs.backbone.prefix.conv1.weight)
    config_dict["network"]["multi_grid"] = [1, 2, 4]
    torch.save({"state_dict": state, "config_dict": config_dict}, path)
    with pytest.raises(ValueError, match=r"multi_grid \[1, 2, 4\]"):
        load_authors_checkpoint(path)


def test_unmatched_keys_are_named(theirs: TheirANN, tmp_path: Path) -> None:
    state = theirs.state_dict()
    extra = dict(state, **{"fusion.stages.1.W.weight": torch.zeros(2048, VALUE, 1, 1)})
    del extra["dsn.3.bias"]
    path = tmp_path / "edited.pth"
    torch.save(extra, path)
    with pytest.raises(ValueError, match=r"1 missing keys: dsn\.3\.bias; 1 unexpected keys: fusion\.stages\.1\.W\.weight"):
        load_authors_checkpoint(path)
    state = dict(state, **{"cls.weight": state["cls.weight"][:, :5]})
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"cls\.weight: file \(19, 5, 1, 1\) vs model \(19, 48, 1, 1\)"):
        load_authors_checkpoint(path)


def test_apnb_query_must_be_its_key(theirs: TheirANN, tmp_path: Path) -> None:
    state = dict(theirs.state_dict())
    state["context.2.stages.0.f_query.0.bias"] = state["context.2.stages.0.f_query.0.bias"] + 1
    torch.save(state, tmp_path / "unshared.pth")
    with pytest.raises(ValueError, match=r"f_query\.0\.bias differs from .*f_key\.0\.bias"):
        load_authors_checkpoint(tmp_path / "unshared.pth")


def test_dataset_argument_and_class_count(theirs: TheirANN, tmp_path: Path) -> None:
    path = tmp_path / "legacy.pth"  # torch < 1.6's format, as their torch 0.4 runs wrote it
    torch.save({"state_dict": theirs.state_dict(), "config_dict": {"dataset": "cityscapes"}}, path,
               _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="19 classes but dataset 'ade20k' has 150"):
        load_authors_checkpoint(path, dataset="ade20k")
    with pytest.raises(ValueError, match="unknown dataset 'voc'"):
        load_authors_checkpoint(path, dataset="voc")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_authors_checkpoint(tmp_path / "missing.pth")


def test_stem_under_both_of_its_names_is_an_error(theirs: TheirANN, tmp_path: Path) -> None:
    state = dict(theirs.state_dict())
    state["backbone.resinit.conv1.weight"] = state["backbone.prefix.conv1.weight"] * 2
    torch.save(state, tmp_path / "two_stems.pth")
    with pytest.raises(ValueError, match=r"keys backbone\.prefix\.conv1\.weight and backbone\.resinit\.conv1\.weight "
                                         r"both mean annseg's backbone\.body\.conv1\.0\.weight"):
        load_authors_checkpoint(tmp_path / "two_stems.pth")


def test_cli_converts_and_load_model_computes_their_function(theirs: TheirANN, converted: tuple, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    _, meta, path = converted
    out = tmp_path / "ann.ckpt"
    main(["convert", "authors", str(path), str(out)])
    summary, settings, wrote = capsys.readouterr().out.splitlines()
    assert settings.startswith("eval settings (packaged config cityscapes): mode whole, scales [1.0], flip off; "
                               "--mode slide uses 864x864 windows, stride 576x576")
    assert summary == (f"converted authors checkpoint {path}: {meta['converted_from']['tensors']} tensors -> "
                       f"ann_resnet50s with options {{'head_channels': {HEAD}, 'key_channels': {KEY}, "
                       f"'value_channels': {VALUE}, 'aux_channels': {AUX}}}, 19 classes "
                       "(cityscapes: road, sidewalk, building, wall, ...)")
    assert wrote.startswith(f"wrote {out}; evaluate with: annseg eval --checkpoint {out} "
                            "--set data.root=/path/to/cityscapes; predict with")
    model, loaded_meta = load_model(out)
    assert loaded_meta["normalization"] == meta["normalization"] and loaded_meta["classes"] == list(CITYSCAPES_CLASSES)
    ours_input, their_input = image_pair(loaded_meta)
    with torch.no_grad():
        main_out, their_main = model(ours_input), theirs(their_input)[1]
    torch.testing.assert_close(main_out, their_main, rtol=3e-4, atol=3e-4 * their_main.abs().max().item())


def test_an_mmseg_file_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "ann_r50-d8.pth"
    torch.save({"meta": {}, "state_dict": {"backbone.stem.0.weight": torch.zeros(32, 3, 3, 3),
                                           "decode_head.conv_seg.weight": torch.zeros(19, 512, 1, 1)}}, path)
    with pytest.raises(SystemExit) as error:
        main(["convert", "authors", str(path), str(tmp_path / "out.ckpt")])
    assert str(error.value) == (f"annseg: error: authors' checkpoint {path} is not an authors' ANN checkpoint (no cls / "
                                "dsn / context / fusion weights); it looks like an mmsegmentation checkpoint: convert "
                                "it with `annseg convert mmseg`")
