"""Adapter folders on disk: corrupt files get a clear error, saves leave nothing behind and respect the umask."""
import os
import shutil
import stat

import pytest
from peft import LoraConfig

import fastft
from tests.utils import tiny_llama


def _saved(tmp_path):
    model = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return model, fastft.save_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_adapter_weights_name_the_file(tmp_path, damage):
    _, path = _saved(tmp_path)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 64)
    for call in (lambda: fastft.load_adapter(tiny_llama(), path),
                 lambda: fastft.integration.peft_lora.check_adapter_fits(tiny_llama(), path)):
        with pytest.raises(ValueError, match="corrupt or truncated") as info:
            call()
        assert str(weights) in str(info.value) and "save the adapter again" in str(info.value)


def test_corrupt_adapter_config_names_the_file(tmp_path):
    _, path = _saved(tmp_path)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not a readable"):
        fastft.load_adapter(tiny_llama(), path)


def test_saved_adapter_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _, path = _saved(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()} == {0o644}


def test_overwrite_removes_read_only_previous_version(tmp_path):
    model, path = _saved(tmp_path)
    (path / "locked").mkdir()
    (path / "locked" / "file").write_text("x")
    os.chmod(path / "locked", 0o500)
    fastft.save_adapter(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_previous_version_that_cannot_be_removed_is_reported(tmp_path, monkeypatch):
    """The old code removed the previous version with ignore_errors and left `.adapter.old/` behind silently."""
    model, path = _saved(tmp_path)
    real_rmtree = shutil.rmtree

    def failing_rmtree(tree, *args, **kwargs):
        if str(tree).endswith(".adapter.old") and os.path.exists(tree):
            if kwargs.get("ignore_errors"):
                return None
            raise PermissionError(13, "Permission denied", str(tree))
        return real_rmtree(tree, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", failing_rmtree)
    with pytest.raises(OSError, match=r"could not be removed .*delete it by hand"):
        fastft.save_adapter(model, path)
    assert (path / "adapter_model.safetensors").is_file()  # the new version is in place


def test_stale_previous_version_from_an_interrupted_save_is_cleaned(tmp_path):
    model, path = _saved(tmp_path)
    shutil.copytree(path, tmp_path / ".adapter.old")
    fastft.save_adapter(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
