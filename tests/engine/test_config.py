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
