"""Progress in a log file: whole lines, no carriage returns or escape codes, nothing glued to a bar."""

import io
import re

import pytest

from annseg.engine.progress import progress_lines
from tests.engine.tiny import tiny_cli_args


def test_progress_lines_are_whole_lines_and_end_with_the_total() -> None:
    stream = io.StringIO()
    assert list(progress_lines(range(5), "eval val", "img", stream=stream, every=0)) == list(range(5))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("eval val: 5/5 (100%), ") and "img/s" in lines[-1]
    quiet = io.StringIO()
    list(progress_lines(range(5), "x", stream=quiet, every=3600))
    first, last = quiet.getvalue().splitlines()  # the first item, then only the end
    assert first.startswith("x: 1/5 (20%)") and first.endswith("left") and last.startswith("x: 5/5 (100%)")
    assert "left" not in last


def test_train_in_a_log_file_prints_plain_progress_lines(tmp_path, capsys: pytest.CaptureFixture) -> None:
    """stderr is not a terminal under pytest: the command prints iteration and validation lines, each whole."""
    from annseg.cli import main
    from annseg.engine import progress

    original = progress.LineProgressBar.__init__
    progress.LineProgressBar.__init__ = lambda self, stream=None, every=30.0: original(self, stream, every=0)
    try:
        main(["train", *tiny_cli_args(), "--out", str(tmp_path / "run")])
    finally:
        progress.LineProgressBar.__init__ = original
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err
    steps = re.findall(r"^train: iteration (\d+)/4 \(\d+%\), train/loss [\d.]+.*it/s", err, re.M)
    assert steps == ["1", "2", "3", "4"]
    assert re.search(r"^validation at iteration 4: val/mIoU [\d.]+", err, re.M)


def test_library_messages_start_their_own_line_beside_a_bar(capsys: pytest.CaptureFixture) -> None:
    import logging
    import sys

    from tqdm import tqdm

    from annseg.cli import _report_library_messages

    _report_library_messages()
    bar = tqdm(total=10, file=sys.stderr, desc="train")
    bar.update(3)
    logging.getLogger("annseg.engine.test").warning("checkpoint skipped")
    bar.close()
    err = capsys.readouterr().err
    assert re.search(r"\r *\rannseg: checkpoint skipped\n", err), err  # the bar cleared, then the line
