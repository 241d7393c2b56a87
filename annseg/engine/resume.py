"""What a resumed run may change: every config key is either "must match" or "may change".

A resumed run continues the run its checkpoint belongs to. The network, the classes, the
objective, the seed and the data a step sees define that run: they must match, or the
result would be a mix of two runs that neither config describes. Paths, worker counts,
evaluation settings and the schedule may change; the schedule (lr, max_iters, power,
momentum, weight decay) then takes effect from the resumed iteration i, as if the run had
used it all along: lr = lr_new * (1 - i / max_iters_new) ** power_new.

``RESUME_RULES`` is the one list; ``check_same_run`` and ``changed_settings`` read it, the
README's table is generated from it (``rules_markdown``), and a test asserts that every
Config field is in it.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from annseg.engine.config import Config, ConfigError

Rule = Literal["must match", "may change"]
MUST: Rule = "must match"
MAY: Rule = "may change"

RESUME_RULES: dict[str, Rule] = {
    # data: what a training step sees, and which validation set the log's curve measures
    "data.dataset": MUST, "data.root": MAY, "data.train_split": MUST, "data.val_split": MUST,
    "data.train_length": MUST, "data.val_length": MUST, "data.size": MUST, "data.crop_size": MUST,
    "data.scale": MUST, "data.aspect": MUST, "data.flip": MUST, "data.brightness": MUST, "data.mean": MUST,
    "data.std": MUST, "data.batch_size": MUST, "data.val_batch_size": MAY, "data.num_workers": MAY,
    # model: the network the checkpoint's weights belong to (ImageNet weights only matter at iteration 0)
    "model.backbone": MUST, "model.variant": MUST, "model.backbone_weights": MAY, "model.options": MUST,
    # train: the objective, precision, effective batch and seed must match; the schedule and the
    # bookkeeping may change (the schedule from the resumed iteration on)
    "train.max_iters": MAY, "train.lr": MAY, "train.momentum": MAY, "train.weight_decay": MAY, "train.power": MAY,
    "train.aux_weight": MUST, "train.ohem": MUST, "train.ohem_threshold": MUST, "train.ohem_min_kept": MUST,
    "train.class_weights": MUST, "train.precision": MUST, "train.accumulate": MUST,
    "train.checkpoint_every": MAY, "train.keep_checkpoints": MAY, "train.val_every": MAY, "train.log_every": MAY,
    "train.seed": MUST,
    "train.deterministic": MAY, "train.skip_nonfinite": MAY, "train.init_from": MAY,
    "train.checkpoint_backbone": MAY, "train.compile": MAY,
    # eval: test-time inference only
    "eval.mode": MAY, "eval.crop_size": MAY, "eval.stride": MAY, "eval.scales": MAY, "eval.flip": MAY,
    "eval.short_side": MAY, "eval.batch_size": MAY, "eval.precision": MAY,
}


def config_keys() -> list[str]:
    """Every ``section.key`` of Config, in declaration order (``model.options`` is one key)."""
    sections = typing.get_type_hints(Config)
    return [f"{section.name}.{field.name}" for section in dataclasses.fields(Config)
            for field in dataclasses.fields(sections[section.name])]


def config_values(config: Config) -> dict[str, Any]:
    """``{"section.key": value}`` for every key of ``config`` (``config_keys``)."""
    plain = config.to_dict()
    return {key: plain[key.split(".")[0]][key.split(".")[1]] for key in config_keys()}


def _rule(key: str) -> Rule:
    if key not in RESUME_RULES:  # a new Config field must be classified (tests/engine/test_resume.py)
        raise AssertionError(f"config key {key} is missing from annseg.engine.resume.RESUME_RULES")
    return RESUME_RULES[key]


def check_same_run(saved: Config, config: Config, source: str, what: str = "--resume", *,
                   keys: list[str] | None = None, advice: str = "a resumed run must keep it") -> None:
    """Raise ConfigError naming the first must-match key that differs between ``saved`` (the
    config recorded in ``source``) and this run's ``config``; ``keys`` limits the check."""
    old, new = config_values(saved), config_values(config)
    for key in keys or config_keys():
        if _rule(key) == MUST and old[key] != new[key]:
            was, now = show_value(old[key]), show_value(new[key])
            raise ConfigError(
                f"{what}: {key} is {was} in {source} but {now} in this run's config, and {advice}; set it back "
                f"(--set {key}={was}), or start a new run in another --out (with --set train.init_from=CHECKPOINT "
                "to start from a checkpoint's weights)")


def changed_settings(saved: Config, config: Config) -> list[tuple[str, Any, Any]]:
    """The may-change keys whose value differs: ``(key, old, new)`` for the log."""
    old, new = config_values(saved), config_values(config)
    return [(key, old[key], new[key]) for key in config_keys() if _rule(key) == MAY and old[key] != new[key]]


def show_value(value: Any) -> str:
    """A value as it is written in ``--set`` and config.yaml."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def rules_markdown() -> str:
    """The README's table of resume rules, one row per config section."""
    lines = ["| section | must match on resume | may change on resume |", "|---|---|---|"]
    for section in dataclasses.fields(Config):
        keys = [key for key in config_keys() if key.startswith(f"{section.name}.")]
        cells = [", ".join(f"`{key.split('.')[1]}`" for key in keys if _rule(key) == rule) or "(none)"
                 for rule in (MUST, MAY)]
        lines.append(f"| `{section.name}` | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"
