"""``annseg plot RUN_DIR``: training curves from the run's CSV log, driven as a user would."""

import sys
from pathlib import Path

import pytest

from annseg.cli import main
from annseg.viz.curves import curve_panels, read_metrics

pytest.importorskip("matplotlib")

HEADER = "epoch,step,train/loss,train/lr,val/aAcc,val/mIoU,val/IoU/road,val/IoU_car\n"
ROWS = ["0,1,2.5,0.01,,,,", "0,3,2.1,0.008,,,,", "0,4,,,0.8,0.3,0.5,0.1", "0,5,1.9,0.006,,,,", "0,8,,,0.9,0.4,0.6,0.2"]


def write_log(run: Path, text: str) -> Path:
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "metrics.csv").write_text(text)
    return run


def test_plot_writes_a_png_of_the_curves(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = write_log(tmp_path / "run", HEADER + "\n".join(ROWS) + "\n")
    main(["plot", str(run)])
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"wrote {run / 'curves.png'}" in capsys.readouterr().out
    main(["plot", str(run), "--out", str(tmp_path / "elsewhere" / "c.png")])
    assert (tmp_path / "elsewhere" / "c.png").is_file()


def test_every_panel_and_the_per_class_columns_are_read(tmp_path: Path) -> None:
    run = write_log(tmp_path / "run", HEADER + "\n".join(ROWS) + "\n")
    x, series = read_metrics(run / "logs" / "metrics.csv")
    panels = {title: lines for title, lines, _ in curve_panels(series)}
    assert x == "step" and list(panels) == ["training loss", "learning rate", "val mIoU", "val IoU per class"]
    assert panels["val IoU per class"] == {"road": [(4.0, 0.5), (8.0, 0.6)], "car": [(4.0, 0.1), (8.0, 0.2)]}
    assert panels["training loss"]["training loss"] == [(1.0, 2.5), (3.0, 2.1), (5.0, 1.9)]


@pytest.mark.parametrize(("text", "message"), [(None, "metrics.csv does not exist"),
                                               (HEADER, "holds no rows yet"),
                                               ("epoch,step,train/loss\n0,1,\n", "holds no values")])
def test_a_missing_or_empty_log_is_one_line(tmp_path: Path, text: str | None, message: str) -> None:
    run = tmp_path / "run"
    if text is not None:
        write_log(run, text)
    with pytest.raises(SystemExit) as error:
        main(["plot", str(run)])
    assert str(error.value).startswith("annseg: error: ") and message in str(error.value)
    assert "\n" not in str(error.value) and not (run / "curves.png").exists()


def test_without_matplotlib_it_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = write_log(tmp_path / "run", HEADER + "\n".join(ROWS) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r'pip install "annseg\[plot\]"'):
        main(["plot", str(run)])
