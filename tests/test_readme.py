"""The README's promises: its code runs, and CI runs exactly its test command."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _quick_start() -> list[str]:
    block = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    install_and_run, install_and_test = _quick_start()
    assert install_and_run.startswith("pip install") and "annseg " in install_and_run
    assert install_and_test.startswith("pip install") and install_and_test.endswith("pytest")
    assert install_and_test in (ROOT / ".ci" / "run").read_text()


def test_python_api_example_runs():
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (2, 512, 97, 97)
    assert namespace["z"].shape == (2, 2048, 33, 33)
    assert namespace["main"].shape == namespace["aux"].shape == (2, 19, 129, 129)
    assert namespace["logits"].shape == (1, 19, 256, 512)
    assert torch.isfinite(namespace["loss"])


def test_demo_table_matches_the_committed_demo_runs():
    """The FCN-vs-ANN figures in the README are those of benchmarks/demo/*.json (from `annseg demo`)."""
    import json

    table = README.split("<!-- annseg demo: start -->", 1)[1].split("<!-- annseg demo: end -->", 1)[0]
    runs = sorted((ROOT / "benchmarks" / "demo").glob("*.json"))
    assert {p.stem for p in runs} >= {"fcn", "ann"}
    for path in runs:
        scores = json.loads(path.read_text())
        row = next(line for line in table.splitlines() if line.startswith(f"| `{path.stem}` |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        expected = [f"{100 * scores['IoU'][name]:.1f}" for name in ("background", "beacon", "object_red", "object_blue")]
        assert cells[1] == f"{100 * scores['mIoU']:.1f}" and cells[2:6] == expected, (row, path)
