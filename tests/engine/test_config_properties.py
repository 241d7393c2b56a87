"""Every numeric config key, given 0, -1, nan, inf or a huge value, either loads into a config
a run can make sense of, or is refused with a ConfigError that names the key. Never another
exception, never a config that would train nothing and exit 0.

The keys are enumerated from the dataclasses and ANN's signature, so a new key is covered
without touching this file."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annseg.engine.config import Config, ConfigError, Range, config_from_dict, load_config, option_types

NUMBERS = (int, float)


def _numeric(annotation: Any) -> type | None:
    """int or float when ``annotation`` is a number, a tuple of numbers or an optional one; else None."""
    if annotation in NUMBERS:
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple or origin in (typing.Union, type(int | None)):
        kinds = {_numeric(arg) for arg in args if arg not in (Ellipsis, type(None))} - {None}
        return kinds.pop() if len(kinds) == 1 else None
    return None


def _keys() -> dict[str, tuple[type, Any, Any]]:
    """``section.key`` -> (int or float, annotation, default) for every numeric key, options included."""
    keys = {}
    defaults = Config()
    for section in dataclasses.fields(Config):
        values = getattr(defaults, section.name)
        hints = typing.get_type_hints(type(values))
        for item in dataclasses.fields(values):
            kind = _numeric(hints[item.name])
            if kind is not None:
                keys[f"{section.name}.{item.name}"] = (kind, hints[item.name], getattr(values, item.name))
    for name, annotation in option_types().items():
        kind = _numeric(annotation)
        if kind is not None:
            keys[f"model.options.{name}"] = (kind, annotation, None)
    return keys


KEYS = _keys()
SPECIAL = (0, -1, 0.0, -1.0, math.nan, math.inf, -math.inf, 1e30, 10**12, 2**64)


def test_the_keys_cover_every_section() -> None:
    """The enumeration finds keys of every section and model.options (a broken walk would find none)."""
    sections = {key.rsplit(".", 1)[0] for key in KEYS}
    assert sections == {"data", "model.options", "train", "eval"}
    assert {"train.max_iters", "train.class_weights", "data.crop_size", "eval.scales", "model.options.sizes",
            "model.options.dropout", "model.options.head_channels"} <= set(KEYS)


def test_every_numeric_key_has_a_range() -> None:
    """A new numeric key must say what it accepts (the ranges are what makes huge values refused)."""
    from annseg.engine.config import ModelConfig

    for section in dataclasses.fields(Config):
        for item in dataclasses.fields(section.default_factory()):
            if f"{section.name}.{item.name}" in KEYS:
                assert isinstance(item.metadata.get("check"), Range), f"{section.name}.{item.name} has no Range"
    option_ranges = next(f for f in dataclasses.fields(ModelConfig) if f.name == "options").metadata["check"]
    missing = {key for key in KEYS if key.startswith("model.options.")} - {f"model.options.{n}" for n in option_ranges}
    assert not missing, f"model options without a Range: {sorted(missing)}"


def _yaml(value: Any) -> str:
    """``value`` as a user writes it in YAML (floats as Python prints them: 1e+30, .nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ".inf" if value > 0 else "-.inf"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(item) for item in value) + "]"
    return repr(value)


def _placed(key: str, value: Any) -> Any:
    """The value as the key takes it: every item of a tuple, or only the first one."""
    _, annotation, default = KEYS[key]
    if typing.get_origin(annotation) is not tuple and not any(
            typing.get_origin(arg) is tuple for arg in typing.get_args(annotation)):
        return value
    items = list(default) if default else [1] * 4  # class_weights: one per class of the built-in dataset
    return [value] * len(items)


def _runs_something(config: Config) -> None:
    """What a run needs to do more than nothing and mean it; independent of how validation says it."""
    train, data, evaluation = config.train, config.data, config.eval
    assert train.max_iters >= 1 and train.lr > 0 and train.accumulate >= 1
    assert min(train.val_every, train.checkpoint_every, train.log_every) >= 1
    assert min(data.batch_size, data.val_batch_size, evaluation.batch_size) >= 1
    assert min(data.train_length or 1, data.val_length or 1) >= 1
    assert min(*data.crop_size, *data.size, *evaluation.crop_size, *evaluation.stride) >= 1
    assert all(s <= c for s, c in zip(evaluation.stride, evaluation.crop_size))
    assert evaluation.scales and min(evaluation.scales) > 0 and min(data.std) > 0
    assert 0 < train.ohem_threshold <= 1 and train.ohem_min_kept >= 0 and train.skip_nonfinite >= 0
    assert train.class_weights is None or sum(train.class_weights) > 0
    numbers = [v for v in _leaves(config.to_dict()) if isinstance(v, float)]
    assert all(math.isfinite(v) for v in numbers), numbers
    options = config.model.options
    assert all(options.get(k, 1) >= 1 for k in ("head_channels", "key_channels", "value_channels", "aux_channels"))
    assert 0 <= options.get("dropout", 0) < 1 and min(options.get("sizes", (1,))) >= 1


def _leaves(value: Any):
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _load(key: str, value: Any, via: str, folder: Path) -> Config:
    section, _, name = key.partition(".")
    if key.startswith("model.options."):
        options = {**Config().model.options, key.removeprefix("model.options."): value}
        text = "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in options.items()) + "}"
        if via == "dict":
            values = Config().to_dict()
            values["model"]["options"] = options
            return config_from_dict(values)
        return load_config(None, [f"model.options={text}"])
    if via == "dict":  # a checkpoint's config
        values = Config().to_dict()
        values[section][name] = value
        return config_from_dict(values)
    if via == "file":
        path = folder / "run.yaml"
        path.write_text(f"{section}:\n  {name}: {_yaml(value)}\n", encoding="utf-8")
        return load_config(path)
    return load_config(None, [f"{key}={_yaml(value)}"])


VALUES = st.one_of(st.sampled_from(SPECIAL), st.floats(allow_nan=True, allow_infinity=True),
                   st.integers(min_value=-(2**70), max_value=2**70))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(KEYS)), value=VALUES, via=st.sampled_from(["override", "file", "dict"]),
       first_only=st.booleans())
def test_numeric_keys_load_sensibly_or_name_the_key(tmp_path: Path, key: str, value: Any, via: str,
                                                    first_only: bool) -> None:
    placed = _placed(key, value)
    if first_only and isinstance(placed, list):  # one bad item among good ones
        default = KEYS[key][2]
        placed[1:] = list(default)[1:] if default else [1] * (len(placed) - 1)
    try:
        config = _load(key, placed, via, tmp_path)
    except ConfigError as error:
        message = str(error)
        assert key in message and "\n" not in message, message
        return
    _runs_something(config)


@pytest.mark.parametrize("key", sorted(KEYS))
def test_each_key_with_each_special_value(key: str) -> None:
    """Every key x every special value, exhaustively (hypothesis above explores around them)."""
    for value in SPECIAL:
        try:
            config = _load(key, _placed(key, value), "override", Path("."))
        except ConfigError as error:
            assert key in str(error), str(error)
            continue
        _runs_something(config)
