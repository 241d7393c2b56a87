import copy

import pytest
import torch
import torch.nn.functional as F

from annseg.cli import main
from annseg.convert import CONVERTERS, load_mmseg_checkpoint
from annseg.convert.common import resolve_classes
from annseg.convert.mmseg import infer_model
from annseg.data.meta import CITYSCAPES_CLASSES, generated_palette
from annseg.engine.checkpoint import load_model, save_model
from annseg.engine.config import load_config
from tests.convert.mmseg_reference import MmsegANN, config_text, randomise

NUM_CLASSES = 7
CLASSES = tuple(f"thing {i}" for i in range(NUM_CLASSES))
PALETTE = [[10 * i, 20 * i, 30 * i] for i in range(NUM_CLASSES)]


@pytest.fixture(scope="module")
def reference() -> MmsegANN:
    """mmseg's ANN (ResNetV1c-50) with tiny head widths, random weights and BN statistics."""
    return randomise(MmsegANN(NUM_CLASSES, channels=32, project=16, aux=24)).eval()


def _assert_close(actual, expected):
    """Equal up to float32 rounding, relative to the output's scale."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def _save(path, state, meta=None):
    torch.save({"meta": {"CLASSES": CLASSES, "PALETTE": PALETTE} if meta is None else meta, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    return _save(tmp_path_factory.mktemp("mmseg") / "ann_r50-d8.pth", reference.state_dict())


def test_converted_model_computes_mmsegs_function(reference, checkpoint):
    model, meta = load_mmseg_checkpoint(checkpoint)
    assert not model.training
    config = meta["config"]["model"]
    assert (config["backbone"], config["variant"]) == ("resnet50", "ann")
    assert config["options"] == {"conv_bias": False, "dropout": 0.1, "align_corners": False, "head_channels": 32,
                                 "key_channels": 16, "value_channels": 16, "aux_channels": 24}
    assert meta["classes"] == list(CLASSES) and meta["palette"] == PALETTE
    assert meta["normalization"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    # Every tensor of the file has a place: its count is the model's plus APNB's shared query (6 tensors).
    assert meta["converted_from"]["tensors"] == len(model.state_dict()) + 6
    image = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        expected, expected_aux = reference(image)
        logits = model(image)
        aux = F.interpolate(model.aux_head(model.backbone(image)[0]), (65, 97), mode="bilinear", align_corners=False)
    assert logits.shape == (1, NUM_CLASSES, 65, 97)
    _assert_close(logits, expected)
    _assert_close(aux, expected_aux)


def test_training_mode_matches_too_dropout_in_the_same_places(reference, checkpoint):
    """Same seed, same Dropout2d masks: only if both networks drop at the same points in the same order.

    In float64: training-mode BatchNorms amplify float32's re-association differences (annseg
    groups W and the fusion conv as one product) past a float32 tolerance.
    """
    model, _ = load_mmseg_checkpoint(checkpoint)
    ours, theirs = model.train().double(), copy.deepcopy(reference).train().double()
    image = torch.randn(2, 3, 49, 57, dtype=torch.float64)
    torch.manual_seed(1)
    main_out, aux_out = ours(image)
    torch.manual_seed(1)
    expected, expected_aux = theirs(image)
    for actual, wanted in ((main_out, expected), (aux_out, expected_aux)):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=1e-10 * wanted.abs().max().item())


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update({"decode_head.extra.weight": torch.zeros(1)}), r"1 unexpected keys: decode_head\.extra\.weight"),
    (lambda s: s.pop("decode_head.fusion.stages.0.out_project.bias"), r"1 missing keys: afnb\.out\.conv\.bias"),
    (lambda s: s.pop("backbone.stem.7.running_var"), r"1 missing keys: backbone\.body\.bn1\.running_var"),
    (lambda s: s["decode_head.context.stages.0.query_project.conv.weight"].add_(1),
     r"query_project\.conv\.weight differs from .*key_project\.conv\.weight"),
    (lambda s: s.pop("auxiliary_head.conv_seg.weight").size(), "missing keys: aux_head.1.weight"),
])
def test_unmatched_keys_are_errors_that_name_them(reference, tmp_path, change, message):
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    change(state)
    with pytest.raises(ValueError, match=message):
        load_mmseg_checkpoint(_save(tmp_path / "bad.pth", state))


def test_not_an_ann_checkpoint(tmp_path):
    path = _save(tmp_path / "other.pth", {"backbone.layer3.0.conv1.weight": torch.zeros(1),
                                          "decode_head.conv_seg.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="layer3 has 1 blocks"):
        load_mmseg_checkpoint(path)


def _head_shapes(layer3_blocks: int, stem: bool = True) -> dict:
    state = {f"backbone.layer3.{i}.conv1.weight": torch.zeros(1) for i in range(layer3_blocks)}
    state |= {"decode_head.bottleneck.conv.weight": torch.zeros(512, 2048, 3, 3),
              "decode_head.fusion.stages.0.key_project.conv.weight": torch.zeros(256, 1024, 1, 1),
              "decode_head.fusion.stages.0.value_project.weight": torch.zeros(256, 1024, 1, 1),
              "auxiliary_head.convs.0.conv.weight": torch.zeros(256, 1024, 3, 3),
              "decode_head.conv_seg.weight": torch.zeros(150, 512, 1, 1)}
    if stem:
        state["backbone.stem.0.weight"] = torch.zeros(32, 3, 3, 3)
    return state


def test_depth_stem_widths_and_pool_scales_are_inferred():
    model, classes = infer_model(_head_shapes(23), {}, "x")
    assert (model.backbone, classes) == ("resnet101", 150)
    assert model.options["head_channels"] == 512 and model.options["aux_channels"] == 256
    assert "sizes" not in model.options  # the ANN default (1, 3, 6, 8)
    head = {"type": "ANNHead", "in_index": [2, 3], "norm_cfg": {"type": "BN"}}
    config = {"model": {"backbone": {"type": "ResNet", "strides": (1, 2, 1, 1), "dilations": (1, 1, 2, 4),
                                     "contract_dilation": True},
                        "decode_head": {**head, "key_pool_scales": (1, 2, 4), "query_scales": (1,)}}}
    model, _ = infer_model(_head_shapes(6, stem=False), config, "x")
    assert model.backbone == "resnet50v1b" and model.options["sizes"] == [1, 2, 4]
    config["model"]["decode_head"]["query_scales"] = (2,)
    with pytest.raises(ValueError, match="query_scales"):
        infer_model(_head_shapes(6), config, "x")


def test_class_names_from_checkpoint_dataset_or_class_count():
    palette = [list(c) for c in generated_palette(3)]
    assert resolve_classes(3, None, ("a", "b", "c"), None, "x") == (None, ["a", "b", "c"], palette)
    dataset, classes, _ = resolve_classes(19, None, None, None, "x")
    assert dataset == "cityscapes" and classes == list(CITYSCAPES_CLASSES)
    assert resolve_classes(2, None, None, None, "x")[1] == ["class_0", "class_1"]
    with pytest.raises(ValueError, match="dataset 'ade20k' has 150"):
        resolve_classes(19, "ade20k", None, None, "x")
    with pytest.raises(ValueError, match="unknown dataset 'voc'"):
        resolve_classes(21, "voc", None, None, "x")
    with pytest.raises(ValueError, match="names 2 classes in its metadata but its classifier has 3"):
        resolve_classes(3, None, ("a", "b"), None, "x")


def test_mmseg_1x_dataset_meta(reference, tmp_path):
    path = _save(tmp_path / "v1.pth", reference.state_dict(), {"dataset_meta": {"classes": CLASSES, "palette": PALETTE}})
    _, meta = load_mmseg_checkpoint(path)
    assert meta["classes"] == list(CLASSES) and meta["palette"] == PALETTE


def test_cli_converts_and_eval_reads_the_result(reference, checkpoint, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "converted.ckpt"
    main(["convert", "mmseg", str(checkpoint), str(out)])
    printed = capsys.readouterr().out
    assert "ann_resnet50" in printed and f"{NUM_CLASSES} classes" in printed and f"annseg eval --checkpoint {out}" in printed
    model, meta = load_model(out)
    image = torch.randn(1, 3, 33, 41)
    with torch.no_grad():
        _assert_close(model(image), reference(image)[0])
    # A folder dataset of one image: `annseg eval` runs the converted checkpoint unchanged.
    root = tmp_path / "data"
    (root / "images" / "val").mkdir(parents=True)
    (root / "masks" / "val").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    Image.new("RGB", (41, 33), (90, 120, 30)).save(root / "images" / "val" / "a.png")
    Image.new("L", (41, 33), 2).save(root / "masks" / "val" / "a.png")
    main(["eval", "--checkpoint", str(out), "--set", f"data.root={root}", "--set", "data.dataset=folder",
          "--device", "cpu", "--out", str(tmp_path / "scores.json")])
    assert "mIoU" in capsys.readouterr().out and (tmp_path / "scores.json").is_file()


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"annseg: error: mmseg checkpoint file .*nope\.pth does not exist"):
        main(["convert", "mmseg", str(tmp_path / "nope.pth"), str(tmp_path / "out.ckpt")])
    with pytest.raises(SystemExit):
        main(["convert", "caffe", "a", "b"])
    assert "invalid choice: 'caffe'" in capsys.readouterr().err
    assert "mmseg" in CONVERTERS


# --- mmseg 1.x checkpoints: the config in meta["cfg"], read and checked ---------------------------

def _convert(tmp_path, state, meta, *extra):
    """`annseg convert mmseg` on a file holding ``state`` and ``meta``; the converted model and meta."""
    path = _save(tmp_path / "in.pth", state, meta)
    main(["convert", "mmseg", str(path), str(tmp_path / "out.ckpt"), *extra])
    return load_model(tmp_path / "out.ckpt")


def _one_line_error(argv, message):
    """`annseg ARGV` stops with one line holding ``message``; the line."""
    with pytest.raises(SystemExit) as error:
        main(argv)
    text = str(error.value)
    assert text.startswith("annseg: error: ") and "\n" not in text, text
    assert message in text, text
    return text


def test_1x_config_key_pool_scales_give_mmsegs_logits(tmp_path, capsys):
    """A 1.x file (meta["cfg"]) of an ANN pooling (1, 2, 4): converted with those sizes, equal logits."""
    reference = randomise(MmsegANN(NUM_CLASSES, channels=32, project=16, aux=24, scales=(1, 2, 4)), seed=3).eval()
    cfg = config_text(NUM_CLASSES, 32, 16, 24, key_pool_scales="(1, 2, 4)", dataset="MyDataset")
    model, meta = _convert(tmp_path, reference.state_dict(), {"cfg": cfg, "dataset_meta": {"classes": CLASSES}})
    assert tuple(meta["config"].model.options["sizes"]) == (1, 2, 4)
    assert model.apnb.sample.sizes == (1, 2, 4) and model.afnb.sample.sizes == (1, 2, 4)
    image = torch.randn(1, 3, 57, 71)
    with torch.no_grad():
        _assert_close(model(image), reference(image)[0])
    printed = capsys.readouterr().out
    assert "meta['cfg']" in printed
    # MyDataset is not one annseg knows: no dataset is guessed, and the output says which eval settings it has.
    assert meta["config"].data.dataset == "folder" and "eval settings (built-in defaults)" in printed


def test_0x_config_is_read_too(reference, tmp_path):
    cfg = config_text(NUM_CLASSES, 32, 16, 24, key_pool_scales="(1, 2)", dataset="MyDataset")
    _, meta = _convert(tmp_path, reference.state_dict(), {"config": cfg, "CLASSES": CLASSES})
    assert tuple(meta["config"].model.options["sizes"]) == (1, 2)
    assert meta["converted_from"]["config"] == "meta['config']"


@pytest.mark.parametrize("meta, message", [
    ({"cfg": config_text(NUM_CLASSES, 32, 16, 24, query_scales="(1, 2)")}, "model.decode_head.query_scales=(1, 2)"),
    ({"cfg": config_text(NUM_CLASSES, 32, 16, 24, norm_cfg="dict(type='GN', num_groups=8)")},
     "model.decode_head.norm_cfg.type='GN'"),
    ({"cfg": config_text(NUM_CLASSES, 32, 16, 24, act_cfg="dict(type='LeakyReLU')")},
     "model.decode_head.act_cfg.type='LeakyReLU'"),
    ({"cfg": config_text(NUM_CLASSES, 32, 16, 24, in_index="[1, 3]")}, "model.decode_head.in_index=(1, 3)"),
    ({"cfg": config_text(NUM_CLASSES, 32, 16, 24, dropout_ratio="0.2")},
     "decode_head.dropout_ratio=0.2 but auxiliary_head.dropout_ratio=0.1"),
    ({"cfg": config_text(NUM_CLASSES, 64, 16, 24)}, "model.decode_head.channels=64 but its decode_head.bottleneck"),
    ({"cfg": config_text(NUM_CLASSES, 32, 16, 24).replace("num_convs=1", "num_convs=2")},
     "model.auxiliary_head.num_convs=2"),
    ({"cfg": config_text(NUM_CLASSES, 32, 16, 24).replace("concat_input=False", "concat_input=True")},
     "model.auxiliary_head.concat_input=True"),
    ({"cfg": config_text(NUM_CLASSES, 32, 16, 24).replace(",\n        contract_dilation=True)", ")")},
     "does not set model.backbone.contract_dilation (mmseg's default: False)"),
    ({"cfg": config_text(NUM_CLASSES, 32, 16, 24).replace("bgr_to_rgb=True", "bgr_to_rgb=False")},
     "bgr_to_rgb=False"),
    # unreadable: not Python, an expression where a value is needed, not text at all
    ({"cfg": "model = dict(\n    type='EncoderDecoder',\n"}, "its config text is not a Python config"),
    ({"cfg": config_text(NUM_CLASSES, 32, 16, 24, key_pool_scales="scales")},
     "model.decode_head.key_pool_scales is scales, not a literal value"),
    ({"cfg": config_text(NUM_CLASSES, 32, 16, 24, key_pool_scales="__import__('os').getcwd()")}, "not a literal value"),
    ({"cfg": {"model": {"decode_head": {"key_pool_scales": (1, 2, 4)}}}}, "meta['cfg'] is a dict, not the config text"),
])
def test_settings_annseg_cannot_represent_or_read_are_refused(reference, tmp_path, meta, message):
    path = _save(tmp_path / "in.pth", reference.state_dict(), meta)
    _one_line_error(["convert", "mmseg", str(path), str(tmp_path / "out.ckpt")], message)
    assert not (tmp_path / "out.ckpt").exists()


def test_align_corners_and_dropout_from_the_config(reference, tmp_path):
    cfg = config_text(NUM_CLASSES, 32, 16, 24, dataset="MyDataset", dropout_ratio="0.0").replace(
        "dropout_ratio=0.1", "dropout_ratio=0.0").replace("align_corners=False", "align_corners=True")
    _, meta = _convert(tmp_path, reference.state_dict(), {"cfg": cfg})
    options = meta["config"].model.options
    assert options["align_corners"] is True and options["dropout"] == 0.0


def _cityscapes_state(reference):
    """The reference's weights with a 19-class classifier on both heads."""
    state = dict(reference.state_dict())
    for head, width in (("decode_head", 32), ("auxiliary_head", 24)):
        state[f"{head}.conv_seg.weight"] = torch.randn(19, width, 1, 1)
        state[f"{head}.conv_seg.bias"] = torch.randn(19)
    return state


@pytest.mark.parametrize("how", ["config", "--dataset"])
def test_converted_cityscapes_carries_the_cityscapes_protocol(reference, tmp_path, capsys, how):
    meta = {"cfg": config_text(19, 32, 16, 24)} if how == "config" else {}
    extra = ["--dataset", "cityscapes"] if how == "--dataset" else []
    _, converted = _convert(tmp_path, _cityscapes_state(reference), meta, *extra)
    packaged = load_config("cityscapes")
    assert converted["config"].eval == packaged.eval
    assert converted["config"].data.dataset == "cityscapes"
    assert converted["config"].data.crop_size == packaged.data.crop_size == (769, 769)
    assert "eval settings (packaged config cityscapes): mode whole" in capsys.readouterr().out


def test_dataset_argument_must_agree_with_the_config(reference, tmp_path):
    path = _save(tmp_path / "in.pth", _cityscapes_state(reference), {"cfg": config_text(19, 32, 16, 24)})
    _one_line_error(["convert", "mmseg", str(path), str(tmp_path / "o.ckpt"), "--dataset", "ade20k"],
                    "was trained on CityscapesDataset (its config's dataset) but --dataset is 'ade20k'")


@pytest.fixture
def other_files(reference, tmp_path):
    """Files that are not mmseg checkpoints, by what they are."""
    annseg_file = tmp_path / "annseg.ckpt"
    model, meta = load_mmseg_checkpoint(_save(tmp_path / "m.pth", reference.state_dict()))
    save_model(annseg_file, model, meta)
    timm_file = tmp_path / "resnet50.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
                "fc.weight": torch.zeros(1000, 2048)}, timm_file)
    authors_file = tmp_path / "authors.pth"
    torch.save({"config_dict": {"network": {"model_name": "annn"}},
                "state_dict": {"module.cls.weight": torch.zeros(19, 512, 1, 1),
                               "module.context.2.stages.0.f_key.0.weight": torch.zeros(256, 512, 1, 1)}}, authors_file)
    no_state = tmp_path / "meta_only.pth"
    torch.save({"meta": {"cfg": "model = dict(type='EncoderDecoder')"}}, no_state)
    return {"annseg": (annseg_file, "an annseg checkpoint"),
            "timm": (timm_file, "ImageNet backbone weights"),
            "authors": (authors_file, "`annseg convert authors`"),
            "no state dict": (no_state, "state dict")}


@pytest.mark.parametrize("kind", ["annseg", "timm", "authors", "no state dict"])
def test_a_file_that_is_not_an_mmseg_checkpoint_is_refused_in_one_line(other_files, tmp_path, kind):
    path, message = other_files[kind]
    text = _one_line_error(["convert", "mmseg", str(path), str(tmp_path / "out.ckpt")], message)
    assert str(path) in text and "blocks" not in text

