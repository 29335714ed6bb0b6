"""Gaps a mutation run over the code of audit round 13 (commits 7564887..b1406c9) found: behaviour the suite did not
pin down (fastft.arguments' checks of flags and dtypes at their edges and the entry points that call them; files.py's
one_version under a concurrent save, its cleanup, FIFOs and dangling links; atomic_write through dangling and
relative links; long names, their checksums and extensions; fastft train's '~' in every path setting, its output
names, unwritable config.yaml / logs.jsonl at each write; bench's --model '~' and resume comparisons; the study's
--max-length bound; rope's tables from position_ids; NF4Linear's sizes; damaged nf4 indexes and shards). Each test
is named for what it checks (docs/fuzz-results.md, audit round 14)."""
from __future__ import annotations

import errno
import os
import tempfile
import threading

import pytest
import torch

import fastft
from fastft.arguments import check_flag, check_float_dtype
from fastft.quant import quantize_nf4


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))


# --- fastft/arguments.py --------------------------------------------------------------------------------------------
def test_none_for_a_flag_that_takes_no_none_is_refused():
    with pytest.raises(TypeError, match=r"quantize_nf4: `double_quant` must be True or False, got None"):
        quantize_nf4(torch.randn(32, 64), double_quant=None)


@pytest.mark.parametrize("value", [2, -1, 0.5], ids=["two", "minus-one", "half"])
def test_a_number_other_than_zero_or_one_for_a_flag_is_refused(value):
    with pytest.raises(TypeError, match=r"`double_quant` must be True or False, got "):
        quantize_nf4(torch.randn(32, 64), double_quant=value)


@pytest.mark.parametrize("value", [torch.tensor([True, False]), "numpy"], ids=["tensor", "numpy"])
def test_an_array_for_a_flag_is_refused_as_a_type_error(value):
    """a tensor's or an array's truth value raises (RuntimeError / ValueError): the check turns it into its TypeError"""
    if value == "numpy":
        np = pytest.importorskip("numpy")
        value = np.array([True, False])
    with pytest.raises(TypeError, match=r"`double_quant` must be True or False, got "):
        quantize_nf4(torch.randn(32, 64), double_quant=value)


def test_a_flag_that_takes_none_says_so_in_its_refusal():
    with pytest.raises(TypeError, match=r"quantize_model: `double_quant` must be True, False or None, got 'no'"):
        fastft.quantize_model(_tiny(), double_quant="no")
    check_flag(None, "op", "flag", none_ok=True)  # taken


def test_quantize_model_use_default_skip_as_a_string_is_refused():
    with pytest.raises(TypeError, match=r"quantize_model: `use_default_skip` must be True or False, got 'no'"):
        fastft.quantize_model(_tiny(), use_default_skip="no")


def test_a_dtype_of_none_is_refused_where_none_is_not_taken(tmp_path):
    with pytest.raises(TypeError, match=r"load_nf4_model: `dtype` must be a floating torch.dtype .*got None"):
        fastft.load_nf4_model(str(tmp_path), dtype=None)
    assert check_float_dtype(None, "op", none_ok=True) is None


@pytest.mark.parametrize("name, dtype", [("torch.float16", torch.float16), ("bfloat16", torch.bfloat16),
                                         ("torch.float32", torch.float32)])
def test_a_dtype_by_its_torch_prefixed_name(name, dtype):
    assert check_float_dtype(name, "op") is dtype


def test_a_name_of_torch_that_is_no_dtype_is_refused_naming_the_string():
    with pytest.raises(TypeError, match=r"op: `dtype` must be a floating torch.dtype .*got 'Tensor'$"):
        check_float_dtype("Tensor", "op")


# --- the entry points' argument checks (fastft/integration/peft_lora.py) -------------------------------------------
@pytest.mark.parametrize("path", [None, 3], ids=["none", "int"])
def test_load_adapter_path_type(path):
    with pytest.raises(TypeError, match=r"load_adapter: `path` must be a folder path \(a str or os.PathLike\)"):
        fastft.load_adapter(_tiny(), path)


def test_get_peft_model_of_something_that_is_not_a_model():
    from peft import LoraConfig
    with pytest.raises(TypeError, match=r"get_peft_model: `model` must be a torch nn.Module .*got NoneType"):
        fastft.get_peft_model(None, LoraConfig(r=4, target_modules=["q_proj"]))


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix"])
def test_apply_method_of_something_that_is_not_a_model_names_apply_method(method):
    with pytest.raises(TypeError, match=r"^apply_method: `model` must be a torch nn.Module .*got NoneType"):
        fastft.apply_method(None, method)


def test_load_nf4_model_path_type():
    with pytest.raises(TypeError, match=r"load_nf4_model: `path` must be a folder path \(a str or os.PathLike\)"):
        fastft.load_nf4_model(None)


def test_load_nf4_model_double_quant_as_a_string_is_refused(tmp_path):
    with pytest.raises(TypeError, match=r"load_nf4_model: `double_quant` must be True or False, got 'no'"):
        fastft.load_nf4_model(str(tmp_path), double_quant="no")


# --- fastft/files.py: one_version -----------------------------------------------------------------------------------
def _folder(path, text):
    path.mkdir(parents=True, exist_ok=True)
    for name in ("a.txt", "b.txt"):
        (path / name).write_text(text)
    return path


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="one_version reads through /proc/self/fd")


@needs_proc
def test_one_version_leaves_no_private_folder_and_no_open_file(tmp_path, monkeypatch):
    from fastft.files import one_version

    folder = _folder(tmp_path / "adapter", "1")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = _open_fds()
    with one_version(folder) as view:
        assert view != folder and sorted(p.name for p in view.iterdir()) == ["a.txt", "b.txt"]
        assert _open_fds() >= before + 2
    assert list(scratch.iterdir()) == []  # the folder of links is gone
    assert _open_fds() == before  # and every file it held open is closed


@needs_proc
def test_one_version_of_a_folder_saved_again_while_its_files_are_opened_is_the_new_version(tmp_path, monkeypatch):
    """A save swaps a new folder in after the reader listed the old one: the reader sees the swap (the folder at the
    path is no longer the one it opened) and reads the new version whole, closing what it had opened of the old."""
    from fastft.files import one_version, replace_folder

    folder = _folder(tmp_path / "adapter", "old")
    real_listdir, saved = os.listdir, []

    def listdir_then_a_save(path=None):
        names = real_listdir(path)
        if isinstance(path, int) and not saved:
            saved.append(replace_folder(folder, lambda tmp: _folder(tmp, "new")))
        return names

    monkeypatch.setattr(os, "listdir", listdir_then_a_save)
    before = _open_fds()
    with one_version(folder) as view:
        assert {p.name: p.read_text() for p in view.iterdir()} == {"a.txt": "new", "b.txt": "new"}
    assert saved and _open_fds() == before


@needs_proc
def test_one_version_retries_a_read_that_met_a_swap(tmp_path, monkeypatch):
    from fastft import files

    folder = _folder(tmp_path / "adapter", "1")
    real, calls = files._open_version, []

    def swapped_once(path):
        calls.append(path)
        return None if len(calls) == 1 else real(path)

    monkeypatch.setattr(files, "_open_version", swapped_once)
    with files.one_version(folder) as view:
        assert (view / "a.txt").read_text() == "1"
    assert len(calls) == 2


@needs_proc
def test_one_version_skips_a_dangling_link_and_a_fifo(tmp_path):
    """a dangling link has no file to read; a FIFO's open would wait for a writer forever"""
    from fastft.files import one_version

    folder = _folder(tmp_path / "adapter", "1")
    (folder / "gone").symlink_to(tmp_path / "missing")
    os.mkfifo(folder / "pipe")
    result = {}

    def read():
        with one_version(folder) as view:
            result["names"] = sorted(p.name for p in view.iterdir())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # let the blocked open go (a writer's open, not blocking: a reader waits)
        os.close(os.open(folder / "pipe", os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
        pytest.fail("one_version opened the FIFO (it waited for a writer)")
    assert result["names"] == ["a.txt", "b.txt"]


# --- fastft/files.py: links, long names, refusals --------------------------------------------------------------------
def test_atomic_write_through_a_link_returns_the_link(tmp_path):
    from fastft.files import atomic_write

    (tmp_path / "elsewhere.json").write_text("{}")
    (tmp_path / "metrics.json").symlink_to(tmp_path / "elsewhere.json")
    assert atomic_write(tmp_path / "metrics.json", "{}") == tmp_path / "metrics.json"


def test_atomic_write_through_a_dangling_link_creates_its_file(tmp_path):
    from fastft.files import atomic_write

    (tmp_path / "metrics.json").symlink_to(tmp_path / "kept" / "metrics.json")
    atomic_write(tmp_path / "metrics.json", "{}")
    assert (tmp_path / "metrics.json").is_symlink()
    assert (tmp_path / "kept" / "metrics.json").read_text() == "{}"


def test_atomic_write_through_a_relative_link_resolves_it_from_the_links_folder(tmp_path, monkeypatch):
    from fastft.files import atomic_write

    (tmp_path / "run").mkdir()
    (tmp_path / "shared.json").write_text("{}")
    (tmp_path / "run" / "metrics.json").symlink_to(os.path.join("..", "shared.json"))
    elsewhere = tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    atomic_write(tmp_path / "run" / "metrics.json", '{"new": 1}')
    assert (tmp_path / "shared.json").read_text() == '{"new": 1}'
    assert not (tmp_path / "a" / "shared.json").exists()


def test_a_refused_folder_save_leaves_no_temporary(tmp_path):
    from fastft.files import replace_folder

    (tmp_path / "merged").write_text("the user's file\n")
    with pytest.raises(NotADirectoryError):
        replace_folder(tmp_path / "merged", lambda tmp: (tmp / "config.json").write_text("{}"))
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_a_parent_folder_that_refuses_the_temporary_is_named(tmp_path, monkeypatch):
    from fastft import files

    def refused(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(dir, ".merged.tmp-x"))

    monkeypatch.setattr(files.tempfile, "mkdtemp", refused)
    with pytest.raises(PermissionError,
                       match=rf"{tmp_path} may not be written into \(read-only\?\): a save of merged "):
        files.replace_folder(tmp_path / "merged", lambda tmp: None)


@pytest.mark.parametrize("length", [161, 200, 215, 240, 255])
def test_long_names_of_files_and_folders_save_again_and_again(tmp_path, length):
    """the temporaries (and a two-rename swap's `.NAME.old`) carry a long name shortened, whatever its length"""
    from fastft.files import atomic_write, replace_folder

    for suffix in (".safetensors", ".json"):
        path = tmp_path / ("a" * (length - len(suffix)) + suffix)
        for text in ("1", "2"):
            atomic_write(path, text)
        assert path.read_text() == "2"
    folder = tmp_path / ("f" * length)
    for text in ("1", "2"):
        replace_folder(folder, lambda tmp: (tmp / "a.txt").write_text(text))
    assert (folder / "a.txt").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        folder.name]


def test_a_long_folder_name_with_a_long_extension(tmp_path):
    """the shortened name keeps an extension of 16 bytes at most"""
    from fastft.files import replace_folder

    folder = tmp_path / ("a" * 20 + "." + "b" * 200)
    for text in ("1", "2"):
        replace_folder(folder, lambda tmp: (tmp / "a.txt").write_text(text))
    assert (folder / "a.txt").read_text() == "2" and len(list(tmp_path.iterdir())) == 1


def test_a_long_folder_name_saves_again_where_no_exchange_is_possible(tmp_path, monkeypatch):
    """the two-rename swap's `.NAME.old` of a 254-byte name would be 259 bytes long"""
    from fastft import files

    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    folder = tmp_path / ("f" * 254)
    for text in ("1", "2"):
        files.replace_folder(folder, lambda tmp: (tmp / "a.txt").write_text(text))
    assert (folder / "a.txt").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_long_names_sharing_their_first_100_bytes_keep_their_own_previous_versions(tmp_path):
    """`.NAME.old` of two long names alike in their first 100 bytes differ (the checksum): finishing the killed swap
    of one removes nothing of the other's"""
    from fastft import files

    a, b = tmp_path / ("x" * 100 + "a" * 80), tmp_path / ("x" * 100 + "b" * 80)
    files.replace_folder(a, lambda tmp: (tmp / "who").write_text("a"))
    old_b = files._old_version(b)  # b's save killed between its renames: b missing, its version at .NAME.old
    old_b.mkdir()
    (old_b / "who").write_text("b")
    files.replace_folder(a, lambda tmp: (tmp / "who").write_text("a2"))
    files.recover_folder(b)
    assert (b / "who").read_text() == "b" and (a / "who").read_text() == "a2"


_KILLED_WRITER = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("files_under_test", sys.argv[1])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
if sys.argv[3] == "file":
    files.atomic_write(sys.argv[2], lambda tmp: os._exit(0))
else:
    files.replace_folder(sys.argv[2], lambda tmp: ((tmp / "x").write_text("x"), os._exit(0)))
"""


@pytest.mark.parametrize("kind", ["file", "folder"])
@pytest.mark.parametrize("length", [40, 200, 250])
def test_a_killed_writers_temporary_of_a_long_name_is_removed_by_the_next_save(tmp_path, kind, length):
    import subprocess
    import sys

    from fastft import files

    path = tmp_path / ("n" * (length - 5) + ".json")
    subprocess.run([sys.executable, "-c", _KILLED_WRITER, files.__file__, str(path), kind], check=True)
    left = [p for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".")  # the killed writer's temporary
    if kind == "file":
        files.atomic_write(path, "{}")
    else:
        files.replace_folder(path, lambda tmp: (tmp / "x").write_text("y"))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


# --- fastft train: paths, output names, unwritable logs (fastft/apps/training) --------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.train_utils import save_tiny_checkpoint
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _train_argv(tiny, out, *extra):
    return ["train", "--model", str(tiny), "--steps", "2", "--batch-size", "2", "--grad-accum", "1",
            "--eval-examples", "4", "--max-length", "24", "--save-every", "2", "--rank", "4",
            "--output-dir", str(out), *extra]


def test_train_expands_the_home_folder_in_every_path_setting(tmp_path, monkeypatch):
    from fastft.apps.training.config import TrainConfig, validate

    home = tmp_path / "home"
    for name in ("model", "teacher"):
        (home / name).mkdir(parents=True)
        (home / name / "config.json").write_text("{}")
    for name in ("train.jsonl", "eval.jsonl"):
        (home / name).write_text('{"text": "a b c"}\n')
    monkeypatch.setenv("HOME", str(home))
    cfg = validate(TrainConfig(model="~/model", data="~/train.jsonl", eval_data="~/eval.jsonl", objective="distill",
                               teacher="~/teacher", output_dir="~/out"))
    assert (cfg.model, cfg.data, cfg.eval_data, cfg.teacher, cfg.output_dir) == (
        str(home / "model"), str(home / "train.jsonl"), str(home / "eval.jsonl"), str(home / "teacher"),
        str(home / "out"))


def _output_problem(tmp_path, name, kind, **settings):
    from fastft.apps.training.config import ConfigError, TrainConfig, validate

    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    (out / name).mkdir() if kind == "folder" else (out / name).write_text("user data\n")
    try:
        validate(TrainConfig(model=str(model), output_dir=str(out), **settings))
    except ConfigError as e:
        return str(e)
    return None


@pytest.mark.parametrize("name, kind, settings", [
    ("config.yaml", "folder", {}), ("losses.png", "folder", {}), ("metrics.json", "folder", {}),
    ("report.md", "folder", {}), ("checkpoints", "file", {}), ("model", "file", {"method": "full"}),
    ("merged", "file", {"save_merged": True}),
], ids=lambda v: v if isinstance(v, str) else None)
def test_train_refuses_each_output_name_of_the_other_kind(tmp_path, name, kind, settings):
    problem = _output_problem(tmp_path, name, kind, **settings)
    assert problem and "--output-dir" in problem and name in problem, problem


@pytest.mark.parametrize("name, settings", [("adapter", {"method": "full"}), ("model", {}), ("merged", {})])
def test_train_takes_a_file_named_as_an_output_the_run_does_not_write(tmp_path, name, settings):
    assert _output_problem(tmp_path, name, "file", **settings) is None


def test_resume_keeps_the_lines_after_one_that_is_not_utf8_and_drops_it_even_if_its_json_is_whole(tmp_path):
    from fastft.apps.training.logs import RunLog

    log = tmp_path / "logs.jsonl"
    log.write_bytes(b'{"step": 1, "loss": 1.0}\n{"step": 1, "note": "\xff"}\n{"step": 2, "loss": 0.5}\n'
                    b'{"step": 3, "loss": 0.25}\n')
    RunLog(str(tmp_path), enabled=True, resume_step=2).close()
    assert log.read_text().splitlines() == ['{"step": 1, "loss": 1.0}', '{"step": 2, "loss": 0.5}']


def test_train_config_yaml_unwritable_is_the_one_line_stop(tiny, tmp_path, monkeypatch, capsys):
    import fastft.apps.training.loop as loop
    from fastft.apps.cli import main

    real = loop.atomic_write

    def full(path, content):
        if str(path).endswith("config.yaml"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, content)

    monkeypatch.setattr(loop, "atomic_write", full)
    assert main(_train_argv(tiny, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert "config.yaml could not be written" in err and "nothing was trained" in err, err


def test_train_logs_jsonl_that_cannot_be_opened_is_the_one_line_stop(tiny, tmp_path, monkeypatch, capsys):
    import fastft.apps.training.loop as loop
    from fastft.apps.cli import main

    def unwritable(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(loop, "RunLog", unwritable)
    assert main(_train_argv(tiny, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert "logs.jsonl could not be written" in err and "stopped before step 1" in err, err


def _full_at(monkeypatch, which):
    from fastft.apps.training.logs import RunLog

    real = RunLog.write

    def write(self, record):
        if which(record):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, record)

    monkeypatch.setattr(RunLog, "write", write)


@pytest.mark.parametrize("which", ["periodic eval", "final eval"])
def test_train_full_disk_at_an_eval_record_is_the_one_line_stop(tiny, tmp_path, monkeypatch, capsys, which):
    from fastft.apps.cli import main

    _full_at(monkeypatch, (lambda r: "eval" in r and r["step"] == 1) if which == "periodic eval"
             else (lambda r: "eval" in r and r["step"] == 2))
    assert main(_train_argv(tiny, tmp_path / "run", "--eval-every", "1")) == 1
    err = capsys.readouterr().err
    assert "logs.jsonl could not be written" in err and "stopped before the next step" in err, err


def test_train_full_disk_at_the_eval_on_resuming_is_the_one_line_stop(tiny, tmp_path, monkeypatch, capsys):
    from fastft.apps.cli import main

    out = tmp_path / "run"
    assert main(_train_argv(tiny, out, "--eval-every", "2", "--schedule", "constant", "--warmup-ratio", "0")) == 0
    _full_at(monkeypatch, lambda r: "eval" in r and r["step"] == 2)
    assert main([*_train_argv(tiny, out, "--eval-every", "2", "--schedule", "constant", "--warmup-ratio", "0",
                              "--resume"), "--steps", "4"]) == 1
    err = capsys.readouterr().err
    assert "logs.jsonl could not be written" in err and "step 2:" in err, err


# --- fastft bench / study (fastft/apps/bench, fastft/apps/study, fastft/apps/models.py) -----------------------------
def test_bench_model_flag_expands_the_home_folder(tmp_path, monkeypatch):
    import argparse

    from fastft.apps.bench.command import add_bench_parser

    monkeypatch.setenv("HOME", str(tmp_path))
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--model", "~/checkpoint", "--output-dir", "~/out"])
    assert (args.model, args.output_dir) == (str(tmp_path / "checkpoint"), str(tmp_path / "out"))


def _bench_table(**settings):
    from fastft.apps.bench.config import BenchConfig
    from fastft.apps.bench.methods import table_config

    return table_config(BenchConfig(shape="tiny", peers=(), **settings), torch.device("cpu"))


@pytest.mark.parametrize("old_methods, new_methods", [(("lora",), ("ia3",)), (("ia3",), ("lora",)),
                                                      (("lora",), ("lora",))])
def test_bench_resume_compares_the_rank_where_a_method_of_either_table_reads_it(old_methods, new_methods):
    from fastft.apps.bench.resume import config_differences

    old, new = _bench_table(methods=old_methods, rank=8), _bench_table(methods=new_methods, rank=16)
    assert any(d.startswith("rank: 8 there, 16 now") for d in config_differences(old, new))


def test_bench_resume_compares_the_virtual_tokens_where_prompt_tuning_reads_them():
    from fastft.apps.bench.resume import config_differences

    old, new = _bench_table(methods=("prefix",), num_virtual_tokens=4), _bench_table(methods=("prefix",))
    assert [d.split(":")[0] for d in config_differences(old, new)] == ["num_virtual_tokens"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    _tiny().save_pretrained(path)
    return path


def test_bench_build_model_loads_a_checkpoint_in_the_dtype_asked(tiny_folder):
    from fastft.apps.bench.shapes import build_model

    model = build_model(model=str(tiny_folder), dtype=torch.bfloat16, seq_len=16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.training


def test_bench_build_model_resolves_the_built_in_model_name(tiny_folder, monkeypatch):
    from fastft.apps import models
    from fastft.apps.bench.shapes import build_model

    monkeypatch.setattr(models, "resolve_model_path",
                        lambda name: str(tiny_folder) if name == models.SMOLLM2 else name)
    model = build_model(model=models.SMOLLM2, seq_len=16)
    assert model.config.hidden_size == 32


def test_smollm2_conversion_writes_into_a_temporary_the_next_call_can_tell_is_stale(tmp_path, monkeypatch):
    from fastft import files
    from fastft.apps import models

    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path))
    into = []

    def killed(tmp):
        into.append(tmp)
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_smollm2", killed)
    with pytest.raises(KeyboardInterrupt):
        models.smollm2_checkpoint()
    match = files._temporary_of(into[0].name)
    assert into[0].parent == tmp_path / "models" and match is not None and match["target"] == models.SMOLLM2


def _study_exit(argv):
    from fastft.apps import cli
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


_STUDY = ["study", "--tasks", "subj", "--methods", "lora", "--steps", "2", "--seeds", "1", "--regimes",
          "32-per-class", "--evals", "1", "--max-dev", "16", "--max-test", "32", "--batch-size", "8", "--plan"]


def test_study_takes_max_length_512_for_minilm(tmp_path):
    assert _study_exit([*_STUDY, "--models", "minilm", "--max-length", "512", "--output-dir", str(tmp_path)]) == 0


def test_study_takes_a_max_length_past_512_for_smollm2_alone(tmp_path, capsys):
    assert _study_exit([*_STUDY, "--models", "smollm2", "--max-length", "1024", "--output-dir", str(tmp_path)]) == 0, \
        capsys.readouterr().err


# --- fastft/integration: the bottleneck adapter's save, a checkpoint file holding more than its index lists ---------
def test_bottleneck_save_pretrained_keeps_the_other_files_of_its_folder(tmp_path):
    model = fastft.get_peft_model(_tiny(), fastft.BottleneckAdapterConfig(size=8))
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "README.md").write_text("the user's notes\n")
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "README.md").read_text() == "the user's notes\n"
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_load_nf4_model_reads_a_file_holding_tensors_its_index_does_not_list(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = tmp_path / "nf4"
    fastft.save_nf4_model(fastft.quantize_model(_tiny(), "nf4"), folder)
    file = folder / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: file.name for k in tensors}}))  # as a sharded save of one shard lists it
    save_file({**tensors, "stray.tensor": torch.zeros(2)}, str(file), metadata=metadata)
    x = torch.randint(0, 64, (1, 8))
    loaded = fastft.load_nf4_model(str(folder), dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(loaded(x).logits).all()


@needs_proc
def test_one_version_closes_the_files_it_opened_of_a_version_swapped_out(tmp_path, monkeypatch):
    """the save lands after the reader opened every file of the old version, before it checked the folder"""
    from fastft.files import one_version, replace_folder

    folder = _folder(tmp_path / "adapter", "old")
    real_listdir, real_stat, armed, saved = os.listdir, os.stat, [], []

    def listdir(path=None):
        armed.append(isinstance(path, int))
        return real_listdir(path)

    def stat(path, *args, **kwargs):
        if any(armed) and not saved and kwargs.get("dir_fd") is None and isinstance(path, os.PathLike) \
                and os.fspath(path) == str(folder):
            saved.append("saving")  # (the save stats paths too)
            replace_folder(folder, lambda tmp: _folder(tmp, "new"))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(os, "stat", stat)
    before = _open_fds()
    with one_version(folder) as view:
        assert {p.name: p.read_text() for p in view.iterdir()} == {"a.txt": "new", "b.txt": "new"}
    assert saved and _open_fds() == before


# --- fastft/ops/rope.py: the tables made from position_ids ---------------------------------------------------------
def _inv_freq(d):
    return 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))


def test_rope_attention_scaling_infinite_is_refused():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"`attention_scaling` must be a finite positive number"):
        fastft.ops.rope(q, q.clone(), position_ids=torch.arange(4)[None], inv_freq=_inv_freq(8),
                        attention_scaling=float("inf"))


@pytest.mark.parametrize("op", ["rope", "rope_"])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_rope_position_ids_of_one_row_serve_a_batch_in_either_layout(op, unsqueeze_dim):
    from fastft.ops import rope, rope_
    from fastft.ops.rope import rope_cos_sin

    B, H, S, D = 3, 2, 5, 8
    shape = (B, H, S, D) if unsqueeze_dim == 1 else (B, S, H, D)
    q, k = torch.randn(shape), torch.randn(shape)
    positions = torch.arange(S)[None]
    cos, sin = rope_cos_sin(positions, _inv_freq(D))
    want = rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, backend="torch")
    fn = rope if op == "rope" else rope_
    got = fn(q.clone(), k.clone(), position_ids=positions, inv_freq=_inv_freq(D), unsqueeze_dim=unsqueeze_dim,
             backend="torch")
    torch.testing.assert_close(got, want)


def test_rope_tables_of_the_wrong_size_name_what_made_them_in_the_bshd_layout():
    q = torch.randn(1, 4, 2, 8)  # (batch, seq, heads, dim): unsqueeze_dim=2
    with pytest.raises(ValueError, match=r"rope: `position_ids` \(1, 5\) and `inv_freq` \(4,\) must be \(1, 4\) "):
        fastft.ops.rope(q, q.clone(), position_ids=torch.arange(5)[None], inv_freq=_inv_freq(8), unsqueeze_dim=2)


# --- fastft/modules/nf4_linear.py ------------------------------------------------------------------------------------
def test_nf4_linear_takes_zero_features():
    from fastft.modules.nf4_linear import NF4Linear

    layer = NF4Linear(0, 8, bias=False)
    assert (layer.in_features, layer.out_features) == (0, 8)


@pytest.mark.parametrize("args, error", [((True, 8), r"`in_features` must be a non-negative int, got True"),
                                         ((8, -1), r"`out_features` must be a non-negative int, got -1"),
                                         ((8, 4.0), r"`out_features` must be a non-negative int, got 4.0")])
def test_nf4_linear_refuses_a_bool_or_a_bad_out_features(args, error):
    from fastft.modules.nf4_linear import NF4Linear

    with pytest.raises(ValueError, match=error):
        NF4Linear(*args)


# --- fastft/integration/nf4_files.py: damaged indexes and shards -----------------------------------------------------
@pytest.fixture()
def nf4_folder(tmp_path):
    folder = tmp_path / "nf4"
    fastft.save_nf4_model(fastft.quantize_model(_tiny(), "nf4"), folder)
    return folder


@pytest.mark.parametrize("index", ["{}", "[]", '{"weight_map": {"model.norm.weight": 1}}',
                                   '{"weight_map": ["model.safetensors"]}'],
                         ids=["no-weight-map", "a-list", "a-file-not-a-name", "map-a-list"])
def test_load_nf4_model_names_an_index_of_the_wrong_shape(nf4_folder, index):
    (nf4_folder / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=r"load_nf4_model: .*model.safetensors.index.json is damaged"):
        fastft.load_nf4_model(str(nf4_folder))


def test_load_nf4_model_names_a_shard_the_index_lists_that_is_missing(nf4_folder):
    import json

    (nf4_folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002.safetensors, which model.safetensors.index.json "
                                                r"lists, is missing"):
        fastft.load_nf4_model(str(nf4_folder))


def test_load_nf4_model_names_a_shard_it_cannot_read(nf4_folder, monkeypatch):
    import safetensors

    def unreadable(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(safetensors, "safe_open", unreadable)
    with pytest.raises(ValueError, match=r"load_nf4_model: .*model.safetensors \([\d,]+ bytes\) is corrupt or "
                                         r"truncated"):
        fastft.load_nf4_model(str(nf4_folder))


# --- meta tensors where a dtype differs (fastft/ops/shared.py autocast_enabled and its callers) ---------------------
def _meta(*shape, dtype=torch.float32):
    return torch.randn(*shape, device="meta", dtype=dtype)


def test_compute_input_on_meta_casts_an_fp32_input_to_a_bf16_weight():
    from fastft.ops.shared import compute_input

    assert compute_input(_meta(4, 16), _meta(8, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_load_nf4_model_reads_an_index_naming_a_shard_in_utf8(nf4_folder):
    import json

    from safetensors import safe_open

    shard = nf4_folder / "modèle-00001-of-00001.safetensors"
    (nf4_folder / "model.safetensors").rename(shard)
    with safe_open(str(shard), framework="pt") as f:
        keys = list(f.keys())
    (nf4_folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: shard.name for k in keys}}, ensure_ascii=False), encoding="utf-8")
    assert fastft.load_nf4_model(str(nf4_folder), dtype=torch.float32).config.hidden_size == 32


def test_save_nf4_model_path_type():
    with pytest.raises(TypeError, match=r"save_nf4_model: `path` must be a folder path \(a str or os.PathLike\)"):
        fastft.save_nf4_model(fastft.quantize_model(_tiny(), "nf4"), None)


def test_study_report_keeps_the_plots_it_draws(tmp_path):
    import json
    import re
    from pathlib import Path

    pytest.importorskip("matplotlib")
    from fastft.apps.study.report import write_report

    results = json.loads((Path(__file__).parent / "data" / "study_results_tiny.json").read_text())
    write_report(results, tmp_path)
    write_report(results, tmp_path)  # again into the same folder: its own plots are not stale
    shown = set(re.findall(r"plots/(tasks_[^)\s]+\.png)", (tmp_path / "report.md").read_text()))
    assert shown and all((tmp_path / "plots" / name).is_file() for name in shown)


def test_bench_refuses_a_mode_that_is_neither_methods_nor_kernels(tmp_path, capsys):
    code = _study_exit(["bench", "bogus", "--shape", "tiny", "--steps", "1", "--warmup", "1", "--seq-len", "8",
                        "--batch-size", "1", "--methods", "ia3", "--peers", "none", "--formats", "json",
                        "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "expected `fastft bench methods` or `fastft bench kernels`, got 'bogus'" in err, err


def _bench_plot_legend(rows):
    from fastft.apps.bench.report import plot_figure

    result = {"rows": rows, "config": {"model": None, "shape": "tiny", "batch_size": 2, "seq_len": 32,
                                       "dtype_resolved": "fp32"}, "environment": {"card": "cpu"}}
    return plot_figure(result).axes[0].get_legend()


def _row(method, peer, impl, compile="off", tps=300.0, **extra):
    return {"method": method, "peer": peer, "implementation": impl, "status": "ok", "compile": compile,
            "tokens_per_s": tps, "memory_kind": "cuda peak allocated", "peak_gib": 1.0, "step_ms": 10.0, **extra}


def test_bench_plot_legend_has_one_entry_per_implementation_and_mode():
    """(two panels, tokens/s and CUDA memory: the legend is drawn once, from the first)"""
    import matplotlib.colors as mc

    pytest.importorskip("matplotlib")
    rows = [_row(m, p, i, c, **({"compile_backend": "inductor"} if c != "off" else {}))
            for m in ("lora", "ia3") for p, i in (("fastft", "fastft"), ("peft", "peft"))
            for c in ("off", "default")]
    legend = _bench_plot_legend(rows)
    texts = [t.get_text() for t in legend.get_texts()]
    assert len(texts) == len(set(texts)) == 4, texts
    compiled = [h for t, h in zip(texts, legend.legend_handles) if "compiled" in t]
    assert len(compiled) == 2 and all(h.get_hatch() == "//" and tuple(h.get_edgecolor()) == mc.to_rgba("white")
                                      for h in compiled)


def test_bench_plot_of_one_implementation_has_its_legend():
    pytest.importorskip("matplotlib")
    legend = _bench_plot_legend([_row("lora", "fastft", "fastft"), _row("ia3", "fastft", "fastft")])
    assert legend is not None and len(legend.get_texts()) == 1


@pytest.mark.parametrize("name", ["a." + "b" * 150, "a" * 20 + "." + "b" * 200])
def test_atomic_write_takes_a_legal_name_with_a_long_extension(tmp_path, name):
    """The temporary repeated the whole extension (mkstemp's suffix), which the shortening never bounded: a legal
    152-byte name with a 150-byte extension failed ENAMETOOLONG; its temporary is recognised as stale too."""
    from fastft import files
    path = tmp_path / name
    path.write_text("old")
    files.atomic_write(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_saves_of_one_folder_from_threads_never_carry_a_write_probe(tmp_path):
    """A save adds the folder's other entries to its new version; another writer's write probe (there for a moment)
    vanished while it was linked or copied (FileNotFoundError), and one an interrupt left was carried on."""
    from fastft.files import merge_into_folder
    target, errors = tmp_path / "adapter", []
    (tmp_path / "adapter").mkdir()
    (target / ".fastft-write-test.tmp-0bbfd16a-1-1-abcdefgh").write_text("")   # a dead writer's probe

    def writer(k):
        for i in range(20):
            def write(tmp, i=i):
                (tmp / "adapter_config.json").write_text(f"{k}-{i}")
            try:
                merge_into_folder(target, write)
            except Exception as e:  # noqa: BLE001 - counted
                errors.append(repr(e))
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(os.listdir(target)) == ["adapter_config.json"]
