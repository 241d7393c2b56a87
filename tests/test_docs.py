"""What users read speaks to them: no citations of files they do not have, no internal tracker
references, no paths of the machines that measured."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_FACING = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md"),
                      *(ROOT / "annseg").rglob("*.py"), *(ROOT / "annseg" / "configs").glob("*.yaml")])
INTERNAL = re.compile(r"PAPER\.md|\bissue [0-9]|/root/|/work/")


@pytest.mark.parametrize("path", USER_FACING, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_internal_references(path: Path) -> None:
    hits = [f"{number}: {line.strip()}" for number, line in enumerate(path.read_text().splitlines(), 1)
            if INTERNAL.search(line)]
    assert not hits, hits


def test_docs_named_in_the_readme_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", readme):
        assert (ROOT / link).is_file(), link
