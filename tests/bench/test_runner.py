import json

from annseg.bench.runner import write_script_results


def test_script_results_are_the_record_and_the_table_with_its_command(tmp_path):
    record = {"command": "python benchmarks/x/measure.py --out y", "rows": [{"conv": "a", "ms": 1.5}]}
    markdown = write_script_results(tmp_path / "new", record, ["| conv | ms |", "|---|---:|", "| a | 2 |"])
    assert json.loads((tmp_path / "new" / "results.json").read_text()) == record
    assert (tmp_path / "new" / "results.md").read_text() == markdown
    assert markdown.startswith("| conv | ms |\n")
    assert markdown.splitlines()[-1] == "Command: `python benchmarks/x/measure.py --out y`"
