"""``annseg predict`` as a user drives it: every input keeps its outputs, collisions stop before
anything is written, overlays are PNGs of the kind asked for."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from annseg.cli import main
from tests.engine.tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.ckpt"
    tiny_checkpoint(path)
    return path


def photo(path: Path, seed: int = 0, size: tuple[int, int] = (16, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def predict(checkpoint: Path, *args: str) -> None:
    main(["predict", *args, "--checkpoint", str(checkpoint)])


def written(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_same_names_in_different_folders_are_all_kept(checkpoint: Path, tmp_path: Path, monkeypatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    photo(Path("a/x.png"), 1, (16, 24)), photo(Path("b/x.png"), 2, (18, 20)), photo(Path("x.jpg"), 3, (24, 16))
    predict(checkpoint, "a/x.png", "b/x.png", "x.jpg", "--out", "out")
    assert written(Path("out")) == ["a/x.png", "a/x_overlay.png", "b/x.png", "b/x_overlay.png", "x.png",
                                    "x_overlay.png"]
    assert "wrote 3 label PNG(s) and blend overlays" in capsys.readouterr().out
    sizes = [Image.open(f"out/{name}").size for name in ("a/x.png", "b/x.png", "x.png")]
    assert sizes == [(24, 16), (20, 18), (16, 24)]  # each file holds its own image's prediction


def test_one_folder_or_one_file_keeps_todays_places(checkpoint: Path, tmp_path: Path) -> None:
    photo(tmp_path / "photos" / "top.png"), photo(tmp_path / "photos" / "2024" / "deep.jpg")
    predict(checkpoint, str(tmp_path / "photos"), "--out", str(tmp_path / "out"), "--overlay", "none")
    assert written(tmp_path / "out") == ["2024/deep.png", "top.png"]
    predict(checkpoint, str(tmp_path / "photos" / "2024" / "deep.jpg"), "--out", str(tmp_path / "one"))
    assert written(tmp_path / "one") == ["deep.png", "deep_overlay.png"]


@pytest.mark.parametrize(("names", "clash", "extra"), [
    (["x.png", "x.jpg"], "x.png", []),  # two images of one stem
    (["x.png", "x_overlay.png"], "x_overlay.png", []),  # an input named like another's overlay
    (["x.png", "x_overlay.png"], "x_overlay.png", ["--overlay", "panels"]),
])
def test_a_collision_stops_before_anything_is_written(checkpoint: Path, tmp_path: Path, names: list[str],
                                                      clash: str, extra: list[str]) -> None:
    for seed, name in enumerate(names):
        photo(tmp_path / "in" / name, seed)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as error:
        predict(checkpoint, str(tmp_path / "in"), "--out", str(out), *extra)
    message = str(error.value)
    assert message.startswith("annseg: error: inputs ") and "\n" not in message
    assert all(str(tmp_path / "in" / name) in message for name in names) and f"write {out / clash}" in message
    assert not out.exists()


def test_without_overlays_an_overlay_like_name_is_fine(checkpoint: Path, tmp_path: Path) -> None:
    photo(tmp_path / "in" / "x.png"), photo(tmp_path / "in" / "x_overlay.png", 1)
    predict(checkpoint, str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--overlay", "none")
    assert written(tmp_path / "out") == ["x.png", "x_overlay.png"]
    assert Image.open(tmp_path / "out" / "x_overlay.png").mode == "P"  # the label map of x_overlay.png


def test_an_out_folder_among_the_inputs_never_overwrites_them(checkpoint: Path, tmp_path: Path) -> None:
    source = photo(tmp_path / "photos" / "x.png")
    before = source.read_bytes()
    with pytest.raises(SystemExit, match="would overwrite the input"):
        predict(checkpoint, str(tmp_path / "photos"), "--out", str(tmp_path / "photos"))
    assert source.read_bytes() == before and written(tmp_path / "photos") == ["x.png"]


@pytest.mark.parametrize(("kind", "size"), [("blend", (384, 256 + 32)), ("panels", (2 * 384 + 6, 28 + 256 + 32))])
def test_overlays_are_upscaled_pngs_of_the_kind_asked(checkpoint: Path, tmp_path: Path, kind: str,
                                                      size: tuple[int, int]) -> None:
    photo(tmp_path / "x.png")
    predict(checkpoint, str(tmp_path / "x.png"), "--out", str(tmp_path / "out"), "--overlay", kind)
    picture = Image.open(tmp_path / "out" / "x_overlay.png")
    assert picture.format == "PNG" and picture.size == size
    assert Image.open(tmp_path / "out" / "x.png").size == (24, 16)  # the label map keeps the input's size


def test_cityscapes_format_refuses_overlays(checkpoint: Path, tmp_path: Path) -> None:
    photo(tmp_path / "x.png")
    with pytest.raises(SystemExit, match="--format cityscapes writes label ids only"):
        predict(checkpoint, str(tmp_path / "x.png"), "--format", "cityscapes", "--overlay", "blend",
                "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_linked_folder_is_read_and_a_dangling_link_is_named(checkpoint: Path, tmp_path: Path) -> None:
    """Inputs are walked like datasets: a symlinked sub-folder counts; a dangling image link stops in
    one line naming it, before anything is written."""
    photo(tmp_path / "elsewhere" / "far.png"), photo(tmp_path / "photos" / "near.png")
    (tmp_path / "photos" / "linked").symlink_to(tmp_path / "elsewhere")
    predict(checkpoint, str(tmp_path / "photos"), "--out", str(tmp_path / "out"), "--overlay", "none")
    assert written(tmp_path / "out") == ["linked/far.png", "near.png"]
    (tmp_path / "photos" / "gone.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(SystemExit) as stop:
        predict(checkpoint, str(tmp_path / "photos"), "--out", str(tmp_path / "out2"))
    assert str(stop.value) == (f"annseg: error: {tmp_path / 'photos' / 'gone.png'}: image is a symlink to "
                               f"{tmp_path / 'missing.png'}, which does not exist; fix the link or remove it")
    assert not (tmp_path / "out2").exists()
