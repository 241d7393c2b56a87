from pathlib import Path

import pytest

from annseg.configs import CONFIG_DIR
from annseg.engine.builders import build_model
from annseg.engine.config import Config, ConfigError, config_from_dict, dump_config, load_config

CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def test_defaults_are_the_builtin_dataset() -> None:
    config = load_config()
    assert config.data.dataset == "synthetic" and config.model.name == "ann_resnet18"
    assert config_from_dict(config.to_dict()) == config


def test_yaml_and_overrides_apply_in_order(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_iters: 50\n  lr: 1\ndata:\n  crop_size: [32, 48]\n")
    config = load_config(path, ["train.max_iters=7", "model.options={head_channels: 32}"])
    assert config.train.max_iters == 7 and config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.data.crop_size == (32, 48)
    assert config.model.options == {"head_channels": 32}  # options replace, they are not merged


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  max_iter: 5\n", "unknown config key train.'max_iter'; did you mean train.'max_iters'"),
        ("trian:\n  max_iters: 5\n", "unknown config key 'trian'"),
        ("train:\n  max_iters: five\n", "train.max_iters: expected int, got 'five'"),
        ("train:\n  max_iters: 2.5\n", "train.max_iters: expected int"),
        ("train:\n  deterministic: 1\n", "train.deterministic: expected bool"),
        ("data:\n  crop_size: [1, 2, 3]\n", "data.crop_size: expected tuple[int, int]"),
        ("data:\n  dataset: kitti\n", "data.dataset: 'kitti' is not one of"),
        ("train:\n  precision: 16\n", "train.precision: 16 is not one of"),
        ("train: [1, 2]\n", "train: expected a mapping"),
        ("train:\n  max_iters: [\n", "is not valid YAML"),
    ],
)
def test_bad_config_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_bad_override_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        load_config(None, ["train.max_iters"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_model_options_are_type_checked() -> None:
    config = load_config(None, ["model.options={sizes: [1, 2], head_channels: 16}"])
    model = build_model(config.model, num_classes=3)
    assert model.apnb.sample.sizes == (1, 2)
    for override, message in (("model.options={head_chanels: 8}", "unknown model option model.options.head_chanels"),
                              ("model.options={sizes: one}", "model.options.sizes: expected")):
        with pytest.raises(ConfigError, match=message):
            build_model(load_config(None, [override]).model, num_classes=3)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, Config)


def test_default_yaml_is_the_builtin_default() -> None:
    """annseg/configs/default.yaml documents the built-in default; it must not drift from the code."""
    text = (CONFIG_DIR / "default.yaml").read_text()
    shipped = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    assert shipped == dump_config(Config()), "regenerate: annseg train --print-config (see annseg/configs/default.yaml)"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_iters=0", "train.max_iters: 0 is out of range; expected an int in [1, 1000000000]"),
        ("train.lr=.nan", "train.lr: nan is out of range; expected a finite number > 0"),
        ("train.lr=-.inf", "train.lr: -inf is out of range; expected a finite number > 0"),
        ("train.momentum=1", "train.momentum: 1.0 is out of range; expected a finite number in [0, 1)"),
        ("train.ohem_threshold=0", "train.ohem_threshold: 0.0 is out of range; expected a finite number in (0, 1]"),
        ("train.val_every=0", "train.val_every: 0 is out of range; expected an int in [1, 1000000000]"),
        ("train.checkpoint_every=0", "train.checkpoint_every: 0 is out of range"),
        ("train.log_every=0", "train.log_every: 0 is out of range"),
        ("train.accumulate=0", "train.accumulate: 0 is out of range; expected an int in [1, 1024]"),
        ("train.skip_nonfinite=-1", "train.skip_nonfinite: -1 is out of range; expected an int in [0, 1000000000]"),
        ("train.seed=-1", "train.seed: -1 is out of range; expected an int in [0, 4294967295]"),
        ("train.precision=64", "train.precision: 64 is not one of"),
        ("train.class_weights=[1, 2]", "train.class_weights: 2 values, but dataset 'synthetic' has 4 classes"),
        ("train.class_weights=[0, 0, 0, 0]", "train.class_weights: all 4 weights are 0"),
        ("train.class_weights=[1, 1, .inf, 1]", "train.class_weights[2]: inf is out of range; expected a finite number >= 0"),
        ("train.class_weights=[]", "train.class_weights: [] has 0 values; expected at least 1"),
        ("data.batch_size=0", "data.batch_size: 0 is out of range; expected an int in [1, 65536]"),
        ("data.crop_size=[0, 96]", "data.crop_size[0]: 0 is out of range; expected an int in [1, 32768]"),
        ("data.std=[0.2, 0, 0.2]", "data.std[1]: 0.0 is out of range; expected a finite number in (0, 1]"),
        ("data.mean=[123.675, 116.28, 103.53]", "data.mean[0]: 123.675 is out of range; expected a finite number in [0, 1]"),
        ("data.scale=[2, 0.5]", "data.scale: [2.0, 0.5] is not a range; expected [low, high] with low <= high"),
        ("data.brightness=-0.1", "data.brightness: -0.1 is out of range"),
        ("data.train_length=0", "data.train_length: 0 is out of range"),
        ("data.num_workers=-1", "data.num_workers: -1 is out of range"),
        ("data.val_split=''", "data.val_split: '' is empty; expected a non-empty string"),
        ("data.size=[32, 32]", "data.size: size [32, 32] is too small: need height >= 32 and width >= 1.5 x height"),
        ("data.crop_size=[8, 8]", None),  # 8 images of one cell each: BatchNorm has 8 values
        ("eval.stride=[100, 10]", "eval.stride[0]: 100 is larger than eval.crop_size[0] 64"),
        ("eval.scales=[]", "eval.scales: [] has 0 values; expected at least 1"),
        ("eval.scales=[1, 0]", "eval.scales[1]: 0.0 is out of range; expected a finite number in (0, 16]"),
        ("eval.short_side=0", "eval.short_side: 0 is out of range"),
        ("eval.batch_size=0", "eval.batch_size: 0 is out of range"),
        ("model.backbone=vgg16", "model.backbone: unknown backbone 'vgg16'; annseg's backbones are ["),
        ("model.options={head_channels: 0}", "model.options.head_channels: 0 is out of range; expected an int in [1, 65536]"),
        ("model.options={sizes: []}", "model.options.sizes: [] has 0 values; expected at least 1"),
        ("model.options={sizes: [1, 0]}", "model.options.sizes[1]: 0 is out of range"),
        ("model.options={dropout: 1}", "model.options.dropout: 1.0 is out of range; expected a finite number in [0, 1)"),
        ("model.options={dropout: .nan}", "model.options.dropout: nan is out of range"),
    ],
)
def test_values_out_of_range_name_key_value_and_range(override: str, message: str | None) -> None:
    if message is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_batchnorm_needs_two_values_per_channel() -> None:
    """A crop that is one cell at 1/8 with one image per batch fails in BatchNorm: refused at load."""
    with pytest.raises(ConfigError, match=r"data.crop_size: \[8, 8\] with data.batch_size 1 leaves BatchNorm one value"):
        load_config(None, ["data.crop_size=[8, 8]", "data.batch_size=1"])
    assert load_config(None, ["data.crop_size=[9, 8]", "data.batch_size=1"]).data.crop_size == (9, 8)


def test_class_weights_of_a_folder_dataset_are_counted_when_it_is_read() -> None:
    """The folder dataset's classes come from classes.txt: its weights load (the run checks the count)."""
    config = load_config(None, ["data.dataset=folder", "train.class_weights=[1, 2]"])
    assert config.train.class_weights == (1.0, 2.0)
    with pytest.raises(ConfigError, match="has 19 classes"):
        load_config(None, ["data.dataset=cityscapes", "train.class_weights=[1, 2]"])


@pytest.mark.parametrize(
    ("written", "value"),
    [("1e-4", 1e-4), ("1E5", 1e5), (".5", 0.5), ("2.5e+3", 2500.0), ("1.5E-3", 1.5e-3), ("3", 3.0), ("1_000.5", 1000.5)],
)
def test_numbers_parse_as_python_writes_them(written: str, value: float, tmp_path: Path) -> None:
    """PyYAML's YAML 1.1 makes 1e-4 a string; config files and --set read it as Python does."""
    path = tmp_path / "run.yaml"
    path.write_text(f"train:\n  lr: {written}\n  weight_decay: {written if value < 1 else 0}\n", encoding="utf-8")
    config = load_config(path)
    assert config.train.lr == value and isinstance(config.train.lr, float)
    assert load_config(None, [f"train.lr={written}"]).train.lr == value
    assert load_config(None, [f"train.class_weights=[{written}, 1, 1, 1]"]).train.class_weights == (value, 1, 1, 1)


def test_strings_that_are_not_numbers_stay_strings() -> None:
    """Version-like and half-written numbers are not floats; Python's ints (hex, 1_000) are ints."""
    config = load_config(None, ["data.val_split=1e", "data.train_split=1.2.3", "data.root=010", "train.deterministic=false",
                                "data.flip=true", "train.max_iters=1_000", "train.seed=0x1F"])
    assert (config.data.val_split, config.data.train_split, config.data.root) == ("1e", "1.2.3", "010")
    assert config.train.deterministic is False and config.data.flip is True
    assert (config.train.max_iters, config.train.seed) == (1000, 31)
    with pytest.raises(ConfigError, match="train.max_iters: expected int, got '010'"):  # not octal 8
        load_config(None, ["train.max_iters=010"])
    with pytest.raises(ConfigError, match="train.lr: expected float, got '1e'"):
        load_config(None, ["train.lr=1e"])


def test_config_file_that_is_not_utf8_or_a_directory_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("data:\n  root: /données\n".encode("latin-1"))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"config file {path} is not UTF-8 text (line 2, byte 19); save it as UTF-8"
    with pytest.raises(IsADirectoryError, match=f"config file {tmp_path} is a directory; expected a YAML file or a packaged config name"):
        load_config(tmp_path)


def test_a_checkpoints_config_is_checked_like_a_file() -> None:
    values = Config().to_dict()
    values["eval"]["stride"] = [0, 64]
    with pytest.raises(ConfigError, match=r"eval.stride\[0\]: 0 is out of range"):
        config_from_dict(values)


def test_model_options_built_in_code_are_checked_too() -> None:
    """build_model checks a ModelConfig made in code (converters do) as a loaded one is checked."""
    from annseg.engine.config import ModelConfig

    with pytest.raises(ConfigError, match="model.options.key_channels: 0 is out of range"):
        build_model(ModelConfig(options={"key_channels": 0}), num_classes=3)
