"""Run configuration: typed dataclasses, loaded from YAML and ``--set key=value`` overrides.

The dataclass defaults ARE the built-in default: a small ResNet-18 ANN trained from scratch
on the generated dataset (``annseg.data.synthetic``) in a few minutes on 2 CPU cores. The
YAML files in ``configs/`` override them with the paper's settings per dataset. Every key
and value is checked against the annotations here: an unknown key or a wrong type is a
``ConfigError`` that names the key and says what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Dataset = Literal["synthetic", "cityscapes", "ade20k", "pascal_context", "folder"]
Precision = Literal["32", "bf16-mixed", "16-mixed"]


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


@dataclass
class DataConfig:
    """Where images come from and how they are augmented (PAPER.md: Augmentation)."""

    dataset: Dataset = "synthetic"
    root: str | None = None  # dataset folder; not used by the built-in dataset
    train_split: str = "train"
    val_split: str = "val"
    train_length: int | None = None  # built-in: items generated; files: use only the first N
    val_length: int | None = None
    size: tuple[int, int] = (64, 96)  # built-in dataset's image size (H, W)
    crop_size: tuple[int, int] = (64, 96)
    scale: tuple[float, float] = (1.0, 1.0)
    aspect: tuple[float, float] = (1.0, 1.0)
    flip: bool = True
    brightness: float = 0.1
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    batch_size: int = 8  # per device
    val_batch_size: int = 8
    num_workers: int = 0


@dataclass
class ModelConfig:
    """A named model of the zoo: ``{variant}_{backbone}`` with ANN keyword options."""

    backbone: str = "resnet18"
    variant: Literal["fcn", "nb", "apnb", "afnb", "ann"] = "ann"
    backbone_weights: str | None = None  # local .pth / .safetensors ImageNet weights
    options: dict[str, Any] = field(
        default_factory=lambda: {"head_channels": 128, "key_channels": 64, "value_channels": 64, "aux_channels": 128}
    )

    @property
    def name(self) -> str:
        return f"{self.variant}_{self.backbone}"


@dataclass
class TrainConfig:
    """Optimisation (PAPER.md: Training): SGD, poly lr per iteration, OHEM + 0.4 aux."""

    max_iters: int = 500
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    power: float = 0.9
    aux_weight: float = 0.4
    ohem: bool = False
    ohem_threshold: float = 0.7
    ohem_min_kept: int = 100_000
    class_weights: tuple[float, ...] | None = None
    precision: Precision = "32"
    accumulate: int = 1
    checkpoint_every: int = 100
    val_every: int = 250
    log_every: int = 10
    seed: int = 0
    deterministic: bool = True
    skip_nonfinite: int = 0  # iterations with a NaN/inf loss or gradient to skip before stopping
    init_from: str | None = None  # fine-tuning: start at iteration 0 from this annseg checkpoint's network weights


@dataclass
class EvalConfig:
    """Test-time inference: whole image or sliding windows, over scales, with optional flip."""

    mode: Literal["whole", "slide"] = "whole"
    crop_size: tuple[int, int] = (64, 96)
    stride: tuple[int, int] = (43, 64)
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    short_side: int | None = None  # scale 1 = short side resized to this (ADE20K protocol)
    batch_size: int = 8  # sliding windows run per forward pass


@dataclass
class Config:
    """One run: data, model, training and evaluation settings."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe dict (tuples as lists)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _describe(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def convert(value: Any, annotation: Any, key: str) -> Any:
    """``value`` checked against ``annotation`` (ints pass as floats, lists as tuples).

    Raises ConfigError naming ``key`` and the expected type. Also used for model options,
    checked against ANN's constructor annotations.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return convert(value, option, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    elif origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(item, args[0], f"{key}[{i}]") for i, item in enumerate(value))
        if len(value) == len(args):
            return tuple(convert(item, arg, f"{key}[{i}]") for i, (item, arg) in enumerate(zip(value, args)))
    elif origin is dict and isinstance(value, dict):
        return dict(value)
    elif annotation is bool and isinstance(value, bool):
        return value
    elif annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif annotation in (str, Path) and isinstance(value, (str, Path)):
        return annotation(value)
    raise ConfigError(f"{key}: expected {_describe(annotation)}, got {value!r}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"; did you mean {prefix}{close[0]!r}?" if close else ""
        raise ConfigError(f"unknown config key {prefix}{key!r}{hint} (valid keys here: {names})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = convert(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "options":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """``"train.max_iters=100"`` -> ``{"train": {"max_iters": 100}}`` (value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not KEY=VALUE, e.g. train.max_iters=100")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({_yaml_problem(error)})") from None
    nested: dict[str, Any] = {}
    cursor = nested
    *parents, leaf = key.strip().split(".")
    for part in parents:
        cursor = cursor.setdefault(part, {})
    cursor[leaf] = value
    return nested


def apply_overrides(values: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``values`` (a plain config dict) with each ``KEY=VALUE`` override merged in, in order."""
    for text in overrides:
        values = _merge(values, parse_override(text))
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The built-in default, updated by the YAML file at ``path`` and then by ``overrides``."""
    values: dict[str, Any] = Config().to_dict()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(error)}") from None
        if loaded is not None:
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {path}: expected a mapping at the top, got {type(loaded).__name__}")
            values = _merge(values, loaded)
    values = apply_overrides(values, overrides)
    try:
        return _build(Config, values, "")
    except ConfigError as error:
        where = f"config file {path}: " if path is not None else ""
        raise ConfigError(f"{where}{error}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: where the YAML parser stopped and why (its own message spans several lines)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def config_from_dict(values: dict[str, Any]) -> Config:
    """A Config from a plain dict such as ``Config.to_dict()`` gives (checked like a file)."""
    return _build(Config, values, "")


def dump_config(config: Config) -> str:
    """The config as YAML, as ``annseg train --print-config`` shows it."""
    return yaml.dump(config.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, one-line lists: ``crop_size: [769, 769]`` as people write configs."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))
_Dumper.add_representer(dict, lambda dumper, data: dumper.represent_mapping(
    "tag:yaml.org,2002:map", data, flow_style=bool(data) and all(not isinstance(v, (dict, list)) for v in data.values())
    and len(data) <= 4))
