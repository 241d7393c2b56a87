"""The wheel ships what a user needs (configs, LICENSE, py.typed, every module), and packaged
configs are found by name from any folder."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from annseg.cli import main
from annseg.configs import CONFIG_DIR, packaged_configs

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """A wheel built from a copy of the source tree (so no build/ folder lands in the checkout)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "annseg", source / "annseg", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, cwd=source)
    (path,) = out.glob("annseg-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_configs_license_py_typed_and_every_module(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    configs = {f"annseg/configs/{path.name}" for path in CONFIG_DIR.glob("*.yaml")}
    assert len(configs) >= 4 and configs <= names
    assert "annseg/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "annseg").rglob("*.py")}
    assert modules - names == set()


def _annseg(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "annseg.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


def test_config_by_name_from_another_folder(tmp_path: Path) -> None:
    """As an installed user runs it: a fresh process in a folder without the source tree."""
    result = _annseg("train", "--config", "cityscapes", "--print-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dataset: cityscapes" in result.stdout and "crop_size: [769, 769]" in result.stdout


def test_config_paths_old_paths_and_unknown_names(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"configs/cityscapes\.yaml does not exist; .*`--config cityscapes`$"):
        main(["train", "--config", "configs/cityscapes.yaml", "--print-config"])
    with pytest.raises(SystemExit, match="unknown config 'citiscapes'; packaged configs: ade20k, cityscapes, default, "
                                         "pascal_context"):
        main(["train", "--config", "citiscapes", "--print-config"])
    (tmp_path / "mine.yaml").write_text("train:\n  max_iters: 7\n")
    main(["train", "--config", "mine.yaml", "--print-config"])
    assert "max_iters: 7" in capsys.readouterr().out


def test_configs_command_lists_every_config(capsys) -> None:
    main(["configs"])
    lines = capsys.readouterr().out.splitlines()
    for name in packaged_configs():
        row = next(line for line in lines if line.startswith(name + " "))
        assert "ANN" in row or "built-in" in row  # the description from the file's first comment
    assert any(line.split()[:2] == ["cityscapes", "cityscapes"] for line in lines)
