"""The run configs shipped inside the package, found by name: ``--config cityscapes``.

Each ``NAME.yaml`` here holds one dataset's settings (docs/method.md says where they come
from); its first comment line describes it. They travel in the wheel, so a name works from
any folder; a path to a user's own YAML file works as well (``config_file`` decides which).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent


def packaged_configs() -> dict[str, Path]:
    """Name -> file of every packaged config, sorted by name."""
    return {path.stem: path for path in sorted(CONFIG_DIR.glob("*.yaml"))}


def packaged_config(name: str) -> Path:
    """The packaged config ``name``; a ValueError lists the names when there is none."""
    configs = packaged_configs()
    if name not in configs:
        raise ValueError(f"unknown config {name!r}; packaged configs: {', '.join(configs)} "
                         "(or give the path of a YAML file)")
    return configs[name]


def config_file(argument: str | Path) -> Path:
    """The YAML file a ``--config`` argument means.

    An existing file is itself. A bare name (no folder, no ``.yaml``) is the packaged config of
    that name. A path that does not exist but whose stem names a packaged config (the configs
    used to sit in a top-level ``configs/`` folder) is an error that suggests the name.
    """
    path = Path(argument)
    if path.is_file():
        return path
    if path.is_dir():
        raise IsADirectoryError(f"config file {path} is a directory; expected a YAML file or a packaged config "
                                f"name ({', '.join(packaged_configs())})")
    if len(path.parts) == 1 and path.suffix not in (".yaml", ".yml"):
        return packaged_config(str(path))
    if path.suffix in (".yaml", ".yml") and path.stem in packaged_configs():
        raise FileNotFoundError(f"config file {path} does not exist; the packaged {path.stem} config is "
                                f"`--config {path.stem}`")
    raise FileNotFoundError(f"config file {path} does not exist")


def describe(path: Path) -> dict[str, Any]:
    """``name``, ``dataset`` and ``description`` (the file's first comment line) of a config file."""
    text = path.read_text(encoding="utf-8")
    comment = next((line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")), "")
    values = yaml.safe_load(text) or {}
    dataset = (values.get("data") or {}).get("dataset")
    return {"name": path.stem, "dataset": dataset, "description": comment}
