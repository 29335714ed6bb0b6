"""fastft.apps.models.model_fingerprint hashes a large file's first and last MiB: a weights file of the same size
that differs only in its last bytes (its last tensors' values) is told apart, and one that differs only in the
middle (not hashed) is not."""
from fastft.apps.models import model_fingerprint

MIB = 2**20


def _fingerprint(tmp_path, data: bytearray) -> str:
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    return model_fingerprint(tmp_path)["model.safetensors"]["sha256"]


def test_the_last_mib_of_a_large_file_is_hashed(tmp_path):
    data = bytearray(5 * MIB)
    base = _fingerprint(tmp_path, data)
    data[-1] = 1
    assert _fingerprint(tmp_path, data) != base
    data[-1] = 0
    data[2 * MIB + 5] = 1     # neither the first nor the last MiB
    assert _fingerprint(tmp_path, data) == base
    data[2 * MIB + 5] = 0
    data[0] = 1
    assert _fingerprint(tmp_path, data) != base
