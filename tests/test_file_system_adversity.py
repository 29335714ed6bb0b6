"""Files under adverse conditions (audit round 13, docs/fuzz-results.md): a save and a load of one folder at once,
names of the other kind, full disks, read-only folders, links, long names, '~', damaged indexes and logs, killed
conversions. Each test failed on the code before its fix."""
import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import fastft
from fastft.files import atomic_write, replace_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _lora(seed, alpha=8):
    from peft import LoraConfig
    model = fastft.get_peft_model(_tiny_llama(0), LoraConfig(r=4, lora_alpha=alpha,
                                                              target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.train_utils import save_tiny_checkpoint
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _train_argv(tiny, out, *extra):
    return ["train", "--model", str(tiny), "--steps", "2", "--batch-size", "2", "--grad-accum", "1",
            "--eval-examples", "4", "--max-length", "24", "--save-every", "2", "--rank", "4",
            "--output-dir", str(out), *extra]


# B1 (silent wrong result) -------------------------------------------------------------------------------------
def test_load_adapter_during_a_save_never_mixes_one_saves_config_with_the_others_weights(tmp_path, monkeypatch):
    """A save of adapter B (lora_alpha 32) lands while load_adapter reads adapter A (lora_alpha 8) from the same
    folder: the load must give A whole or B whole (README: 'a reader finds the previous save or the new one, never
    files of both'); fastft gives A's config with B's weights (scaling 2 on B's weights) and no error."""
    import peft.utils.save_and_load as sl

    folder = tmp_path / "adapter"
    a, b = _lora(1, alpha=8), _lora(2, alpha=32)
    fastft.save_adapter(a, folder)
    read_weights, saved = sl.safe_load_file, []

    def concurrent_save_then_read(*args, **kwargs):  # the other process's save, between the reader's two reads
        if not saved:
            saved.append(fastft.save_adapter(b, folder))
        return read_weights(*args, **kwargs)

    monkeypatch.setattr(sl, "safe_load_file", concurrent_save_then_read)
    loaded = fastft.load_adapter(_tiny_llama(0), folder)
    key = next(k for k in loaded.state_dict() if "lora_A" in k)
    weights_of = "a" if torch.equal(loaded.state_dict()[key], a.state_dict()[key]) else "b"
    scaling = loaded.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    config_of = "a" if scaling == 8 / 4 else "b"
    assert weights_of == config_of, f"weights of {weights_of} loaded with the lora_alpha of {config_of}"


# B2 (data loss) -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("as_link", [False, True])
def test_replace_folder_refuses_a_file_at_the_target(tmp_path, as_link):
    """fastft train's OUTPUT_DIR/model and OUTPUT_DIR/merged go through replace_folder, which swaps a *file* of that
    name (or the file a link of that name points to) out and deletes it, without a word."""
    user_file = tmp_path / "notes.txt"
    user_file.write_text("the user's file\n")
    target = tmp_path / "merged"
    if as_link:
        target.symlink_to(user_file)
    else:
        user_file.rename(target)
        user_file = target
    with pytest.raises(NotADirectoryError):
        replace_folder(target, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert user_file.read_text() == "the user's file\n"


# B3 (crash after the work is done) ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,kind", [("adapter", "file"), ("metrics.json", "folder"), ("report.md", "folder"),
                                       ("logs.jsonl", "folder")])
def test_train_refuses_an_output_name_of_the_other_kind_before_training(tiny, tmp_path, name, kind):
    """bench and study check their output names before any run (output_names_problem); fastft train does not: it
    trains, then fails in the final save (or, for logs.jsonl, raises IsADirectoryError out of main)."""
    from fastft.apps.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / name).mkdir() if kind == "folder" else (out / name).write_text("user data\n")
    with pytest.raises(SystemExit) as stopped:  # a ConfigError, before the model loads
        main(_train_argv(tiny, out))
    assert stopped.value.code == 2
    assert not (out / "checkpoints").exists()


# B4 (crash with an unclear error) -----------------------------------------------------------------------------
def test_train_full_disk_on_logs_jsonl_is_the_one_line_stop(tiny, tmp_path, monkeypatch, capsys):
    """A full disk at a checkpoint or the final save is a one-line stop naming the last good checkpoint; at the
    logs.jsonl append (and config.yaml at the start) the OSError escapes main() as a traceback with no path."""
    import builtins

    import fastft.apps.training.logs as logs
    from fastft.apps.cli import main

    def full(path, mode="r", *args, **kwargs):
        if str(path).endswith("logs.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(logs, "open", full, raising=False)
    assert main(_train_argv(tiny, tmp_path / "run")) == 1
    assert "logs.jsonl" in capsys.readouterr().err


# B5 (crash with an unclear error) -----------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["empty", "torn"])
def test_load_nf4_model_names_a_damaged_index_file(tmp_path, damage):
    folder = tmp_path / "nf4"
    fastft.save_nf4_model(fastft.quantize_model(_tiny_llama(0), "nf4"), folder)
    index = folder / "model.safetensors.index.json"
    text = json.dumps({"metadata": {}, "weight_map": {"model.norm.weight": "model.safetensors"}})
    index.write_text("" if damage == "empty" else text[: len(text) // 2])
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        fastft.load_nf4_model(str(folder))


# B6 (cosmetic: a user's link broken, the linked file left stale) ----------------------------------------------
def test_atomic_write_writes_through_a_link_to_a_file(tmp_path):
    """metrics.json / report.md / config.yaml / bench reports: a link the user made to keep the file elsewhere is
    replaced by a regular file (the linked file keeps the old text); transformers' and peft's writers (open 'w')
    write through it, as fastft's own folder saves do for a link to a folder."""
    shared = tmp_path / "elsewhere.json"
    shared.write_text("{}")
    (tmp_path / "metrics.json").symlink_to(shared)
    atomic_write(tmp_path / "metrics.json", '{"new": 1}')
    assert (tmp_path / "metrics.json").is_symlink()
    assert shared.read_text() == '{"new": 1}'


# B7 (crash with an unclear error) -----------------------------------------------------------------------------
def test_save_adapter_takes_a_name_peft_takes(tmp_path):
    """A 230-character folder name (the file system takes 255): peft saves it; fastft's temporary sibling
    '.NAME.tmp-HOST-PID-START-XXXXXXXX' is ~40 characters longer and fails ENAMETOOLONG naming that temporary."""
    model = _lora(1)
    name = tmp_path / ("a" * 230)
    model.save_pretrained(name)  # peft: fine
    fastft.save_adapter(model, name)


# B8 (data loss: a protected version replaced) -----------------------------------------------------------------
def test_save_adapter_respects_a_read_only_adapter_folder(tmp_path):
    """chmod 0555 on a saved adapter folder: peft's save into it fails (PermissionError); fastft's swap needs write
    access to the parent only and replaces the protected adapter. Run without CAP_DAC_OVERRIDE (root ignores modes)."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to drop CAP_DAC_OVERRIDE")
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r}); sys.path.insert(0, {ROOT!r})
        from test_file_system_adversity import _lora
        import fastft
        folder = {str(tmp_path / "adapter")!r}
        fastft.save_adapter(_lora(1), folder)
        before = open(folder + "/adapter_model.safetensors", "rb").read()
        os.chmod(folder, 0o555)
        try:
            open(folder + "/probe", "w")
            sys.exit(3)  # modes not enforced here
        except PermissionError:
            pass
        try:
            fastft.save_adapter(_lora(2), folder)
        except PermissionError:
            pass
        after = open(folder + "/adapter_model.safetensors", "rb").read()
        os.chmod(folder, 0o755)
        sys.exit(0 if after == before else 1)
    """))
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"] if os.getuid() == 0 else []
    result = subprocess.run([*drop, sys.executable, str(script)], capture_output=True, text=True)
    if result.returncode == 3:
        pytest.skip("file modes are not enforced for this process")
    assert result.returncode == 0, "the read-only adapter folder was replaced" + result.stderr[-2000:]


# B9 (silent wrong result, narrow) -----------------------------------------------------------------------------
def test_bottleneck_save_pretrained_failing_midway_leaves_the_previous_adapter(tmp_path, monkeypatch):
    """BottleneckAdapterModel.save_pretrained writes the weights and the config as two separate atomic files: a full
    disk at the config leaves the new weights under the old config (activation relu instead of tanh), which
    load_adapter loads without an error as neither adapter. (fastft.save_adapter, a folder swap, is safe.)"""
    def make(seed, activation):
        model = fastft.get_peft_model(_tiny_llama(0), fastft.BottleneckAdapterConfig(size=8, activation=activation))
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(std=0.3)
        return model

    a, b = make(1, "relu"), make(2, "tanh")
    a.save_pretrained(tmp_path / "adapter")
    real = pathlib.Path.write_text

    def full_at_the_config(self, *args, **kwargs):  # written after the weights
        if "adapter_config.json" in str(self):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_at_the_config)
    with pytest.raises(OSError):
        b.save_pretrained(tmp_path / "adapter")
    monkeypatch.setattr(pathlib.Path, "write_text", real)
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        loaded = fastft.load_adapter(_tiny_llama(0), tmp_path / "adapter")(x).logits
        assert torch.allclose(loaded, a(x).logits)  # the previous save, whole


# B10 (files land elsewhere than reported) ---------------------------------------------------------------------
def test_train_config_output_dir_expands_the_home_folder(tiny, tmp_path, monkeypatch):
    """A YAML config is not shell-expanded: `output_dir: ~/run` wrote into a literal './~/run' while the run said
    'adapter saved to ~/run/adapter'; transformers' TrainingArguments expands '~' (os.path.expanduser)."""
    from fastft.apps.cli import main

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    (work / "cfg.yaml").write_text(f"model: {tiny}\nsteps: 2\nbatch_size: 2\ngrad_accum: 1\neval_examples: 4\n"
                                   "max_length: 24\nsave_every: 2\nrank: 4\noutput_dir: ~/run\n")
    assert main(["train", "--config", str(work / "cfg.yaml")]) == 0
    assert not (work / "~").exists()
    assert (home / "run" / "adapter" / "adapter_config.json").is_file()


# B11 (disk leak: ~538 MB per killed conversion) ----------------------------------------------------------------
def test_smollm2_cache_removes_a_killed_conversions_temporary(tmp_path, monkeypatch):
    """smollm2_checkpoint converts into mkdtemp('.smollm2-135m.XXXXXXXX'); a kill leaves that folder (538 MB) in
    the cache for good. Written under fastft.files' temporary naming (owner = host-pid-start), a dead writer's
    folder can be told from a live one's and removed, as every other fastft save does."""
    from fastft import files
    from fastft.apps import models

    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path))
    target = tmp_path / "models" / models.SMOLLM2
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps({"transformers_version": "5.24.0"}))  # a good cached copy
    host = files._owner().split("-")[0]
    dead = target.parent / f".{models.SMOLLM2}.tmp-{host}-4999999-1-abcdefgh"  # pid 4999999: no such process
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"\0" * 1024)
    assert models.smollm2_checkpoint() == target
    assert not dead.exists()


# B12 (crash with an unclear error) ----------------------------------------------------------------------------
def test_resume_drops_a_logs_jsonl_line_that_is_not_utf8(tmp_path):
    """RunLog drops torn and NUL-filled lines on resume, but reads the file with read_text(): a line of non-UTF-8
    bytes (disk garbage after a crash; logs.jsonl appends are not fsynced) raises UnicodeDecodeError (no file named)
    out of fastft train --resume."""
    from fastft.apps.training.logs import RunLog

    log = tmp_path / "logs.jsonl"
    log.write_bytes(b'{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo\xff\xfe\n')
    RunLog(str(tmp_path), enabled=True, resume_step=2).close()
    assert log.read_text().splitlines() == ['{"step": 1, "loss": 1.0}', '{"step": 2, "loss": 0.5}']
