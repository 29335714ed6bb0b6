"""The "Incomplete" warning atop the markdown table: for a table marked complete: false, not for a complete one
nor for a results file written before the field existed (those were complete)."""
from fastft.apps.bench.report import _incomplete_note


def _result(**extra):
    return {"rows": [{"status": "ok"}, {"status": "planned"}, {"status": "planned"}], **extra}


def test_incomplete_note_only_for_tables_marked_incomplete():
    assert _incomplete_note(_result(complete=False))[0].startswith("> **Incomplete**: 2 of 3 runs")
    assert _incomplete_note(_result(complete=True)) == []
    assert _incomplete_note(_result()) == []   # written before the field: read as complete
