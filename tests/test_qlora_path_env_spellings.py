"""FASTFT_QLORA_PATH is read as the other FASTFT_* switches are: case and surrounding blanks do not matter, and an
empty value (`FASTFT_QLORA_PATH=` in a launcher's environment) means auto, the measured choice, not an error."""
import pytest

from fastft.ops import qlora_path


@pytest.mark.parametrize("value, path", [("Dequant", "dequant"), (" FUSED\n", "fused"), ("fused", "fused"),
                                         ("", None), ("  ", None), ("AUTO", None)])
def test_forced_path_spellings(monkeypatch, value, path):
    monkeypatch.setenv(qlora_path.ENV, value)
    assert qlora_path.forced_path() == path


def test_unset_is_auto_and_a_typo_is_refused(monkeypatch):
    monkeypatch.delenv(qlora_path.ENV, raising=False)
    assert qlora_path.forced_path() is None
    monkeypatch.setenv(qlora_path.ENV, "dequantize")
    with pytest.raises(ValueError, match="FASTFT_QLORA_PATH must be one of fused, dequant or auto, got 'dequantize'"):
        qlora_path.forced_path()
