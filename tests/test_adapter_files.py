"""Adapter folders on disk: corrupt files get a clear error; saves leave nothing behind, respect the umask and keep
the folder's other files (as peft's save_pretrained does)."""
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

import fastft
from fastft.integration.adapter_files import check_adapter_fits
from tests.utils import randomize_lora_B, tiny_llama


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
                 lambda: check_adapter_fits(tiny_llama(), path)):
        with pytest.raises(ValueError, match="corrupt or truncated") as info:
            call()
        assert str(weights) in str(info.value) and "save the adapter again" in str(info.value)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_prompt_learning_adapters_name_the_file(tmp_path, kind, damage):
    """They went straight to peft: a bare SafetensorError naming no file, or a misleading HFValidationError."""
    from peft import PrefixTuningConfig, PromptTuningConfig

    config = (PrefixTuningConfig if kind == "prefix" else PromptTuningConfig)(task_type="CAUSAL_LM",
                                                                              num_virtual_tokens=3)
    path = fastft.save_adapter(fastft.get_peft_model(tiny_llama(), config), tmp_path / "adapter")
    weights = path / "adapter_model.safetensors"
    if damage == "missing":
        weights.unlink()
        with pytest.raises(FileNotFoundError, match=re.escape(f"{weights} not found")):
            fastft.load_adapter(tiny_llama(), path)
    else:
        weights.write_bytes(weights.read_bytes()[:100])
        with pytest.raises(ValueError, match=re.escape(str(weights)) + ".*corrupt or truncated"):
            fastft.load_adapter(tiny_llama(), path)


def test_a_legacy_bin_adapter_loads(tmp_path):
    """torch.save's pre-1.6 format, which peft loads, was refused as corrupt (mmap reads the zip format only)."""
    model, path = _saved(tmp_path)
    randomize_lora_B(model)
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    (path / "adapter_model.safetensors").unlink()
    torch.save(state, path / "adapter_model.bin", _use_new_zipfile_serialization=False)
    loaded = fastft.load_adapter(tiny_llama(), path)
    for key, value in model.state_dict().items():
        if "lora_B" in key:
            assert torch.equal(loaded.state_dict()[key], value), key


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


def test_a_save_in_the_other_format_drops_the_stale_weights(tmp_path):
    """safe_serialization=False over a safetensors save (and back): the old file stayed beside the new one, and
    fastft's and peft's loaders, which read adapter_model.safetensors first, loaded the weights saved before."""
    model, path = _saved(tmp_path)
    for safe in (False, True):
        randomize_lora_B(model)
        fastft.save_adapter(model, path, safe_serialization=safe)
        names = {p.name for p in path.iterdir()}
        assert ("adapter_model.safetensors" in names) == safe and ("adapter_model.bin" in names) != safe
        loaded = fastft.load_adapter(tiny_llama(), path)
        for key, value in model.state_dict().items():
            if "lora_B" in key:
                assert torch.equal(loaded.state_dict()[key], value), key


def test_save_keeps_the_folders_other_entries(tmp_path):
    """peft's save_pretrained writes its files into the folder and leaves the rest; the old save_adapter swapped
    the whole folder, deleting a run's metrics and a read-only folder in it, and each named adapter saved before."""
    model, path = _saved(tmp_path)
    fastft.add_adapter(model, "other", LoraConfig(r=2, target_modules=["k_proj"]))
    (path / "metrics.json").write_text("{}")
    (path / "locked").mkdir()
    (path / "locked" / "file").write_text("x")
    os.chmod(path / "locked", 0o500)
    try:
        first = (path / "adapter_model.safetensors").read_bytes()
        randomize_lora_B(model, seed=9)
        fastft.save_adapter(model, path, selected_adapters=["other"])
        fastft.save_adapter(model, path, selected_adapters=["default"])
        assert sorted(p.name for p in path.iterdir()) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors", "locked", "metrics.json",
                                                          "other"]
        assert (path / "adapter_model.safetensors").read_bytes() != first  # replaced by the new version
        assert (path / "metrics.json").read_text() == "{}" and (path / "locked" / "file").read_text() == "x"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary left behind
        both = fastft.load_adapter(tiny_llama(), path)
        fastft.load_adapter(both, path / "other", adapter_name="other")
        for name in ("default", "other"):
            got = both.base_model.model.model.layers[1].self_attn
            layer = got.q_proj if name == "default" else got.k_proj
            want = model.base_model.model.model.layers[1].self_attn
            want = want.q_proj if name == "default" else want.k_proj
            assert torch.equal(layer.lora_B[name].weight, want.lora_B[name].weight), name
    finally:
        os.chmod(path / "locked", 0o700)


@pytest.mark.parametrize("target", [".", "./", "sub/.."])
def test_save_into_the_current_folder(tmp_path, monkeypatch, target):
    """Path(".").name is empty: the old save_adapter failed making its temporary sibling."""
    model = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    fastft.save_adapter(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors", "notes.txt"]
    fastft.load_adapter(tiny_llama(), tmp_path)


def test_save_cleans_temporaries_of_killed_saves(tmp_path):
    """A SIGKILLed save leaves its `.adapter.tmp-*` folder; the old code never removed it."""
    model, path = _saved(tmp_path)
    (tmp_path / ".adapter.tmp-k1lled_x").mkdir()
    (tmp_path / ".adapter.tmp-k1lled_x" / "adapter_model.safetensors").write_text("half")
    (tmp_path / ".other.tmp-keep").mkdir()  # another folder's: not ours to remove
    fastft.save_adapter(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-keep", "adapter"]


def test_failed_save_changes_nothing(tmp_path, monkeypatch):
    model, path = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def failing_save(folder, **kwargs):
        (Path(folder) / "adapter_model.safetensors").write_text("half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", failing_save)
    with pytest.raises(OSError, match="No space left"):
        fastft.save_adapter(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
