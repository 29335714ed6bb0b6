"""A SmolLM2 cache written by transformers 5.6 itself (the first that converts the tokenizer right) is kept, not
converted again on every load (mutation MO2: `>=` → `>` in _written_right survived)."""
import json

import pytest

from fastft.apps.models import _written_right


@pytest.mark.parametrize("version, kept", [("5.5.9", False), ("5.6", True), ("5.6.0", True), ("5.24.0", True)])
def test_written_right_from_the_first_right_version(tmp_path, version, kept):
    (tmp_path / "config.json").write_text(json.dumps({"transformers_version": version}))
    assert _written_right(tmp_path) is kept
