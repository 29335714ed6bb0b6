"""datasets._read_text reads a data file as Python's universal newlines read it (\\r\\n and a lone \\r both end a
line) and falls back to latin-1 for a file that is not UTF-8. Mutation run 18: leaving lone \\r in, or decoding a
latin-1 file as UTF-8 with replacement characters, passed every test (the task tests need the data packages).
Against Python's own text reading."""
import pytest

from fastft.apps.datasets import _read_text


@pytest.mark.parametrize("data, encoding", [("one\rtwo\r\nthree\nfour", "utf-8"), ("café\r\nnaïve\rend", "latin-1")])
def test_read_text_as_python_reads_it(tmp_path, data, encoding):
    path = tmp_path / "data.txt"
    path.write_bytes(data.encode(encoding))
    with open(path, encoding=encoding, newline=None) as f:
        assert _read_text(path) == f.read()
