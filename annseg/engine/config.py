"""Run configuration: typed dataclasses, loaded from YAML and ``--set key=value`` overrides.

The dataclass defaults ARE the built-in default: a small ResNet-18 ANN trained from scratch
on the generated dataset (``annseg.data.synthetic``) in a few minutes on 2 CPU cores. The
YAML files in ``annseg/configs/`` override them with the paper's settings per dataset. Every key
and value is checked against the annotations here: an unknown key or a wrong type is a
``ConfigError`` that names the key and says what was expected.

Every number is also checked for range and meaning when a config is loaded (a file, the
overrides, a checkpoint's config): each field carries its ``Range`` in its metadata
(``checked(default, Range(...))``) and each section's ``validate()`` holds the rules that
relate several keys. So a run that could not make sense stops before it starts, with one
line that names the key, the value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from annseg.configs import config_file

Dataset = Literal["synthetic", "cityscapes", "ade20k", "pascal_context", "folder"]
Precision = Literal["32", "bf16-mixed", "16-mixed"]


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


SIDE = 2**15  # pixels per image side: beyond it one image alone outgrows any machine's memory
BATCH = 2**16  # images or windows per batch
CHANNELS = 2**16  # feature channels of a layer
STEPS = 10**9  # iterations (and intervals): a billion keeps every count the sampler makes an int64
ITEMS = 10**12  # dataset items: more than any dataset holds, and a length Python's len() can give


@dataclass(frozen=True)
class Range:
    """The values a number (or each item of a tuple, or a string's length) may take.

    ``low``/``high``: bounds (None: unbounded), excluded when ``low_open``/``high_open``.
    Floats must be finite (nan and inf are refused everywhere). ``items``: least number of
    items of a tuple, or characters of a string.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    items: int = 0

    def expected(self, value: Any) -> str:
        """"an int >= 1", "a finite number in (0, 1]": the words for what is accepted."""
        kind = "an int" if isinstance(value, int) else "a finite number"
        if self.low is None and self.high is None:
            return kind
        if self.high is None:
            return f"{kind} {'>' if self.low_open else '>='} {_number(self.low)}"
        if self.low is None:
            return f"{kind} {'<' if self.high_open else '<='} {_number(self.high)}"
        return (f"{kind} in {'(' if self.low_open else '['}{_number(self.low)}, "
                f"{_number(self.high)}{')' if self.high_open else ']'}")

    def check(self, value: Any, key: str) -> None:
        """Raise ConfigError naming ``key`` if ``value`` (already of the field's type) is out of range."""
        if value is None or isinstance(value, bool):
            return
        if isinstance(value, (str, Path)):
            if len(str(value).strip()) < self.items:
                raise ConfigError(f"{key}: {str(value)!r} is empty; expected a non-empty string")
            return
        if isinstance(value, (tuple, list)):
            if len(value) < self.items:
                raise ConfigError(f"{key}: {list(value)} has {len(value)} values; expected at least {self.items}")
            for index, item in enumerate(value):
                self.check(item, f"{key}[{index}]")
            return
        bad = isinstance(value, float) and not math.isfinite(value)
        bad = bad or (self.low is not None and (value <= self.low if self.low_open else value < self.low))
        bad = bad or (self.high is not None and (value >= self.high if self.high_open else value > self.high))
        if bad:
            raise ConfigError(f"{key}: {value!r} is out of range; expected {self.expected(value)}")


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def checked(default: Any = dataclasses.MISSING, check: Range | dict[str, Range] = Range(), *,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose value ``_build`` checks against ``check`` when a config is loaded."""
    return field(default=default, default_factory=default_factory, metadata={"check": check})


POSITIVE = Range(0, low_open=True)  # a finite number > 0
UNIT = Range(0, 1, high_open=True)  # a fraction in [0, 1)
NON_EMPTY = Range(items=1)
SIDES = Range(1, SIDE)


@dataclass
class DataConfig:
    """Where images come from and how they are augmented (docs/method.md, "Training")."""

    dataset: Dataset = "synthetic"
    root: str | None = checked(None, NON_EMPTY)  # dataset folder; not used by the built-in dataset
    train_split: str = checked("train", NON_EMPTY)
    val_split: str = checked("val", NON_EMPTY)
    train_length: int | None = checked(None, Range(1, ITEMS))  # built-in: items generated; files: the first N
    val_length: int | None = checked(None, Range(1, ITEMS))
    size: tuple[int, int] = checked((64, 96), SIDES)  # built-in dataset's image size (H, W)
    crop_size: tuple[int, int] = checked((64, 96), SIDES)
    scale: tuple[float, float] = checked((1.0, 1.0), Range(0, 16, low_open=True))  # (low, high) factors
    aspect: tuple[float, float] = checked((1.0, 1.0), Range(0, 16, low_open=True))
    flip: bool = True
    brightness: float = checked(0.1, Range(0, 1))  # ColorJitter: factor drawn in [1 - b, 1 + b]
    # of RGB in [0, 1]: mmsegmentation's 0-255 values (123.675, ...) are these times 255
    mean: tuple[float, float, float] = checked((0.485, 0.456, 0.406), Range(0, 1))
    std: tuple[float, float, float] = checked((0.229, 0.224, 0.225), Range(0, 1, low_open=True))
    batch_size: int = checked(8, Range(1, BATCH))  # per device
    val_batch_size: int = checked(8, Range(1, BATCH))
    num_workers: int = checked(0, Range(0, 256))

    def validate(self, prefix: str) -> None:
        """Rules that relate keys: ranges are (low, high); BatchNorm needs two values per channel."""
        for name in ("scale", "aspect"):
            low, high = getattr(self, name)
            if low > high:
                raise ConfigError(f"{prefix}{name}: {[low, high]} is not a range; expected [low, high] with low <= high")
        # The network's smallest feature map is at 1/8 of the crop (each stride-2 step rounds up);
        # in training, BatchNorm fails on a batch that gives it one value per channel there.
        cells = self.batch_size * math.ceil(self.crop_size[0] / 8) * math.ceil(self.crop_size[1] / 8)
        if cells < 2:
            raise ConfigError(
                f"{prefix}crop_size: {list(self.crop_size)} with {prefix}batch_size {self.batch_size} leaves BatchNorm "
                f"one value per channel at 1/8 of the crop; use a crop side of at least 9 or a batch of 2 or more")
        if self.dataset == "synthetic":
            from annseg.data.synthetic import check_size

            try:
                check_size(self.size)
            except ValueError as error:
                raise ConfigError(f"{prefix}size: {error}") from None


@dataclass
class ModelConfig:
    """A named model of the zoo: ``{variant}_{backbone}`` with ANN keyword options."""

    backbone: str = "resnet18"
    variant: Literal["fcn", "nb", "apnb", "afnb", "ann"] = "ann"
    backbone_weights: str | None = checked(None, NON_EMPTY)  # local .pth / .safetensors ImageNet weights
    options: dict[str, Any] = checked(
        default_factory=lambda: {"head_channels": 128, "key_channels": 64, "value_channels": 64, "aux_channels": 128},
        check={  # what ANN's keywords mean; their types come from ANN's signature (option_types)
            "head_channels": Range(1, CHANNELS), "key_channels": Range(1, CHANNELS),
            "value_channels": Range(1, CHANNELS), "aux_channels": Range(1, CHANNELS),
            "sizes": Range(1, 256, items=1),  # anchor grid sides of the pyramid sampling
            "dropout": UNIT,
            "output_stride": Range(8, 16),  # 8 (dilated, the paper's) or 16; validate() refuses the rest
        },
    )

    @property
    def name(self) -> str:
        return f"{self.variant}_{self.backbone}"

    def validate(self, prefix: str) -> None:
        """The backbone is one annseg can name (its ResNets or ``timm:NAME``); the options are ANN's
        keywords, typed and in range."""
        from annseg.models.backbones import OUTPUT_STRIDES, resolve_backbone

        try:
            resolve_backbone(self.backbone)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{prefix}backbone: {error}") from None
        self.options = check_options(self.options, f"{prefix}options")
        stride = self.options.get("output_stride")
        if stride is not None and stride not in OUTPUT_STRIDES:
            raise ConfigError(f"{prefix}options.output_stride: {stride} is not one of {list(OUTPUT_STRIDES)}")


@functools.cache
def option_types() -> dict[str, Any]:
    """The ANN keywords a config's model.options may set, with their annotations.

    The rest (classes, backbone, variant) come from the config itself. Imported when first
    needed: the network's module pulls in torch and timm.
    """
    from annseg.models.ann import ANN

    return {name: hint for name, hint in typing.get_type_hints(ANN.__init__).items()
            if name not in ("num_classes", "backbone", "backbone_weights", "variant", "return")}


def check_options(options: dict[str, Any], key: str = "model.options") -> dict[str, Any]:
    """``options`` typed against ANN's signature and checked against ModelConfig's option ranges."""
    types_, ranges = option_types(), _option_ranges()
    checked_options = {}
    for name, value in options.items():
        if name not in types_:
            raise ConfigError(f"unknown model option {key}.{name}; valid options: {sorted(types_)}")
        checked_options[name] = convert(value, types_[name], f"{key}.{name}")
        if name in ranges:
            ranges[name].check(checked_options[name], f"{key}.{name}")
    return checked_options


def _option_ranges() -> dict[str, Range]:
    return next(f for f in dataclasses.fields(ModelConfig) if f.name == "options").metadata["check"]


@dataclass
class TrainConfig:
    """Optimisation (docs/method.md, "Training"): SGD, poly lr per iteration, OHEM + 0.4 aux."""

    max_iters: int = checked(500, Range(1, STEPS))
    lr: float = checked(0.02, POSITIVE)  # too large shows as a non-finite loss, which stops the run
    momentum: float = checked(0.9, UNIT)
    weight_decay: float = checked(1e-4, UNIT)
    power: float = checked(0.9, Range(0, 10))  # poly lr: lr * (1 - i / max_iters) ** power; 0 = constant
    aux_weight: float = checked(0.4, Range(0, 10))
    ohem: bool = False
    ohem_threshold: float = checked(0.7, Range(0, 1, low_open=True))  # probability under which a pixel is hard
    ohem_min_kept: int = checked(100_000, Range(0))
    class_weights: tuple[float, ...] | None = checked(None, Range(0, items=1))  # one per class
    precision: Precision = "32"
    accumulate: int = checked(1, Range(1, 1024))
    checkpoint_every: int = checked(100, Range(1, STEPS))
    # iter_*.ckpt kept (newest first) besides last.ckpt and best.ckpt; 0 = none, -1 = all
    keep_checkpoints: int = checked(3, Range(-1, STEPS))
    val_every: int = checked(250, Range(1, STEPS))
    log_every: int = checked(10, Range(1, STEPS))
    seed: int = checked(0, Range(0, 2**32 - 1))  # numpy's seed range
    deterministic: bool = True
    skip_nonfinite: int = checked(0, Range(0, STEPS))  # iterations with a NaN/inf loss or gradient to skip
    init_from: str | None = checked(None, NON_EMPTY)  # fine-tuning: start at iteration 0 from this checkpoint's weights
    checkpoint_backbone: bool = False  # recompute the backbone's activations in the backward: less memory, more time
    compile: bool = False  # torch.compile the network (the first steps compile; the same function)

    def validate(self, prefix: str) -> None:
        """Class weights that are all zero would train on nothing."""
        if self.class_weights is not None and not any(self.class_weights):
            raise ConfigError(f"{prefix}class_weights: all {len(self.class_weights)} weights are 0; "
                              "expected at least one weight > 0")


@dataclass
class EvalConfig:
    """Test-time inference: whole image or sliding windows, over scales, with optional flip."""

    mode: Literal["whole", "slide"] = "whole"
    crop_size: tuple[int, int] = checked((64, 96), SIDES)
    stride: tuple[int, int] = checked((43, 64), SIDES)
    scales: tuple[float, ...] = checked((1.0,), Range(0, 16, low_open=True, items=1))
    flip: bool = False
    short_side: int | None = checked(None, SIDES)  # scale 1 = short side resized to this (ADE20K protocol)
    batch_size: int = checked(8, Range(1, BATCH))  # sliding windows run per forward pass
    precision: Literal["32", "bf16"] = "32"  # bf16: the network under bfloat16 autocast (GPUs, CPUs with AVX512-BF16/AMX)

    def validate(self, prefix: str) -> None:
        """Sliding windows that step further than they reach would leave pixels unseen."""
        for side, (stride, crop) in enumerate(zip(self.stride, self.crop_size)):
            if stride > crop:
                raise ConfigError(f"{prefix}stride[{side}]: {stride} is larger than {prefix}crop_size[{side}] {crop}; "
                                  "expected a stride <= the crop so that the windows cover every pixel")


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

    def validate(self, prefix: str) -> None:
        """Rules across sections: one class weight per class where the dataset fixes its classes."""
        weights = self.train.class_weights
        classes = _fixed_class_count(self.data.dataset)
        if weights is not None and classes is not None and len(weights) != classes:
            raise ConfigError(f"{prefix}train.class_weights: {len(weights)} values, but dataset "
                              f"{self.data.dataset!r} has {classes} classes; expected one weight per class")


def _fixed_class_count(dataset: str) -> int | None:
    """The class count of a dataset whose classes are fixed; None for the folder dataset (classes.txt)."""
    if dataset == "synthetic":
        from annseg.data.synthetic import Synthetic

        return len(Synthetic.classes)
    if dataset == "folder":
        return None
    from annseg.data import DATASETS

    return len(DATASETS[dataset].classes)


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
        try:
            return float(value)
        except OverflowError:  # an int beyond any float
            raise ConfigError(f"{key}: {value!r} is out of range; expected a finite number") from None
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
    built = cls(**kwargs)
    for item in dataclasses.fields(cls):
        check = item.metadata.get("check")
        if isinstance(check, Range):
            check.check(getattr(built, item.name), f"{prefix}{item.name}")
    if hasattr(built, "validate"):
        built.validate(prefix)
    return built


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
        value = yaml.load(raw, Loader=Loader)
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
    """The built-in default, updated by the YAML file at ``path`` and then by ``overrides``.

    ``path`` is a file or the name of a packaged config (``"cityscapes"``; see ``annseg.configs``).
    """
    values: dict[str, Any] = Config().to_dict()
    if path is not None:
        path = config_file(path)  # a file, or a packaged config's name
        try:
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
        except UnicodeDecodeError as error:
            line = error.object[: error.start].count(b"\n") + 1
            raise ConfigError(f"config file {path} is not UTF-8 text (line {line}, byte {error.start}); "
                              "save it as UTF-8") from None
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


class Loader(yaml.SafeLoader):
    """YAML with numbers as Python writes them (as in YAML 1.2), for config files and overrides.

    PyYAML follows YAML 1.1, where ``1e-4`` is a string (it wants ``1.0e-4``) and ``010`` is
    octal. Here ``1e-4``, ``1E5``, ``.5``, ``-2.5e+3``, ``.inf``, ``.nan`` are floats and
    ``10``, ``1_000``, ``0x1F``, ``0o17`` are ints as in Python; ``1e``, ``1.2.3``, ``010``
    and ``1:30`` stay strings. Booleans are unchanged (``true``/``false``).
    """


_FLOAT = re.compile(r"""^[-+]?(?:
    [0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?   # 1.  1.5  1.5e-3
  | \.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?          # .5  .5e3
  | [0-9][0-9_]*[eE][-+]?[0-9]+                 # 1e-4  1E5
  | \.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$""", re.X)
_INT = re.compile(r"^[-+]?(?:0|[1-9](?:_?[0-9])*|0[xX](?:_?[0-9a-fA-F])+|0[oO](?:_?[0-7])+|0[bB](?:_?[01])+)$")
Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:int")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
Loader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node), 0))


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
