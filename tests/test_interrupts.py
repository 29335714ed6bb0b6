"""Graceful interruption (Ctrl-C / KeyboardInterrupt raised at a Python line, SIGTERM): what fastft's cleanup code
(finally blocks, except BaseException) leaves behind. Each test injects the interrupt deterministically: a
KeyboardInterrupt raised by a trace function at the first line event of a chosen source line (found by its text, so
the tests survive line-number changes), or a monkeypatched function. Every test failed on the code it was written
against (/work/main at b1406c9).

Lines of peft's own code are interrupted through a monkeypatched call (the lines change between peft versions).
SIGTERM keeps Python's default (the process ends at once, as a SIGKILL: round 21's resume holds).
"""
import contextlib
import inspect
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fastft
import fastft.files as ff

# ----------------------------------------------------------------------------------------------------- helpers

class _Interrupt:
    def __init__(self, code, line, occurrence):
        self.code, self.line, self.occurrence, self.seen, self.fired = code, line, occurrence, 0, False

    def local(self, frame, event, arg):
        if event == "line" and frame.f_lineno == self.line and not self.fired:
            self.seen += 1
            if self.seen == self.occurrence:
                self.fired = True
                raise KeyboardInterrupt(f"injected at {self.code.co_filename}:{self.line}")
        return self.local

    def glob(self, frame, event, arg):
        return self.local if frame.f_code is self.code else None


def _line_of(func, text: str, which: int | None = None) -> int:
    """The line of `func` holding `text` (the only one, or the `which`-th of several)."""
    lines, first = inspect.getsourcelines(func)
    hits = [first + i for i, line in enumerate(lines) if text in line]
    assert hits and (len(hits) == 1 or which is not None), f"{text!r} found {len(hits)} times in {func.__qualname__}"
    return hits[which or 0]


@contextlib.contextmanager
def interrupted_at(func, text: str, occurrence: int = 1, which: int | None = None):
    """KeyboardInterrupt at the `occurrence`-th time the line of `func` holding `text` is about to run (caught here:
    pytest must never see a KeyboardInterrupt, it would end the session). Yields the injector (`.fired`)."""
    func = inspect.unwrap(getattr(func, "__func__", func))
    inj = _Interrupt(func.__code__, _line_of(func, text, which), occurrence)
    sys.settrace(inj.glob)
    try:
        yield inj
    except KeyboardInterrupt:
        assert inj.fired, "a real KeyboardInterrupt"
    finally:
        sys.settrace(None)
    assert inj.fired, f"the line {text!r} of {func.__qualname__} never ran {occurrence} time(s)"


def _tiny(seed=0, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=tie)).eval()


_X = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(3))


def _out(model):
    with torch.no_grad():
        return model(_X).logits


def _lora_config():
    from peft import LoraConfig
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])


def _trained_lora(base):
    torch.manual_seed(5)
    model = fastft.get_peft_model(base, _lora_config())
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.02)
    return model


# ------------------------------------------------------------------- 1. in-memory data loss: quantize_model

def test_quantize_model_interrupted_between_two_layers_loses_no_weight():
    """quantize_model drops each layer's dense weight (`linear.weight = None`) before it puts the NF4Linear in the
    layer's place: a Ctrl-C between the two leaves an nn.Linear without a weight in the model (its forward fails)
    and the NF4 copy unreachable; quantize_model again fails on it ('must be a torch.Tensor, got NoneType'). The
    weight is gone: the model must be reloaded. Interrupted anywhere, a retry must finish the job."""
    from fastft.integration.nf4_model import _quantize_model

    reference = _out(fastft.quantize_model(_tiny(), "nf4"))
    model = _tiny()
    with interrupted_at(_quantize_model, "set_submodule(model, name, quantized[id(linear)])", occurrence=3):
        fastft.quantize_model(model, "nf4")
    weightless = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.weight is None]
    assert not weightless, f"interrupted quantize_model left {weightless} without a weight"
    fastft.quantize_model(model, "nf4")  # the retry finishes it
    assert torch.equal(_out(model), reference)


# ---------------------------------------------------------- 2. merge_and_unload: QLoRA layers and peft's merge

@pytest.mark.parametrize("line", ["self.__class__ = FusedLoraLinear", "self.fan_in_fan_out = base.from_conv1d"])
def test_qlora_merge_and_unload_interrupted_in_to_dense_can_be_retried(line):
    """FusedQLoraLinear.to_dense swaps in the dense base, then the class, then sets fan_in_fan_out: interrupted
    between them, the layer is a QLoRA layer over a dense nn.Linear (the retry: "'Linear' object has no attribute
    'to_linear'") or a FusedLoraLinear without fan_in_fan_out (its forward and the retry: AttributeError). The model
    is stuck: neither usable nor mergeable."""
    from fastft.modules.qlora import FusedQLoraLinear

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _out(fastft.merge_and_unload(_trained_lora(fastft.quantize_model(_tiny(), "nf4"))))
        model = _trained_lora(fastft.quantize_model(_tiny(), "nf4"))
        with interrupted_at(FusedQLoraLinear.to_dense, line, occurrence=2):
            fastft.merge_and_unload(model)
        merged = fastft.merge_and_unload(model)  # a retry
    assert torch.equal(_out(merged), reference)


class _AppendInterrupted(list):
    """A layer's merged_adapters whose first append (peft's record of a merge, right after the weight changed) is
    interrupted."""

    def append(self, item):
        if not getattr(self, "fired", False):
            self.fired = True
            raise KeyboardInterrupt("injected at merged_adapters.append")
        super().append(item)


def test_merge_and_unload_interrupted_inside_a_layers_merge_does_not_add_the_update_twice():
    """peft's LoRA merge adds ΔW to the base weight, then records the adapter as merged: a Ctrl-C between the two
    leaves ΔW in the weight with the adapter still unmerged, and merge_and_unload run again adds ΔW a second time.
    No error, no warning: a merged model whose layer holds W + 2·ΔW (its outputs differ from the right merge)."""
    reference = _out(fastft.merge_and_unload(_trained_lora(_tiny())))
    model = _trained_lora(_tiny())
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    layer.merged_adapters = _AppendInterrupted()
    with pytest.raises(KeyboardInterrupt):
        fastft.merge_and_unload(model)
    assert layer.merged_adapters.fired and not layer.merged
    merged = fastft.merge_and_unload(model)
    assert torch.allclose(_out(merged), reference, atol=1e-6), \
        f"max difference {(_out(merged) - reference).abs().max():.3g}: an update merged twice"


def test_unmerge_interrupted_before_its_subtraction_keeps_the_merge(monkeypatch):
    """peft's unmerge drops the merge record, then computes ΔW and subtracts it: interrupted in between, the layer
    said unmerged while its weight still held ΔW, and its forward added ΔW a second time (silently)."""
    model = _trained_lora(_tiny())
    before = _out(model)
    model.merge_adapter()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    weight = layer.get_base_layer().weight.detach().clone()

    def interrupted(adapter):
        raise KeyboardInterrupt("injected before the subtraction")
    monkeypatch.setattr(layer, "get_delta_weight", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.unmerge_adapter()
    monkeypatch.undo()
    assert layer.merged and torch.equal(layer.get_base_layer().weight, weight)
    assert torch.allclose(_out(model), before, atol=1e-5)
    model.unmerge_adapter()
    assert not layer.merged and torch.allclose(_out(model), before, atol=1e-5)


class _ExtendInterrupted(list):
    """A QLoRA layer's merged_adapters whose first extend (the record of a requantized merge) is interrupted."""

    def extend(self, items):
        if not getattr(self, "fired", False):
            self.fired = True
            raise KeyboardInterrupt("injected at merged_adapters.extend")
        super().extend(items)


def test_a_requantized_qlora_merge_interrupted_before_its_record_merges_once():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _out(fastft.merge_and_unload(_trained_lora(fastft.quantize_model(_tiny(), "nf4")),
                                                 requantize=True))
        model = _trained_lora(fastft.quantize_model(_tiny(), "nf4"))
        layer = model.base_model.model.model.layers[1].mlp.up_proj
        layer.merged_adapters = record = _ExtendInterrupted()
        with pytest.raises(KeyboardInterrupt):
            fastft.merge_and_unload(model, requantize=True)
        assert record.fired and not layer.merged
        merged = fastft.merge_and_unload(model, requantize=True)
    assert torch.equal(_out(merged), reference)


# ------------------------------------------------------------------------------------ 3. get_peft_model

def test_get_peft_model_interrupted_midway_can_be_retried(monkeypatch):
    """peft injects the adapter layers into the base model one by one; a Ctrl-C in the middle left some layers
    wrapped and no PeftModel. fastft.get_peft_model on that model then refused with a message about trained adapters
    ('a second get_peft_model would build its adapters again over the trained ones'): nothing was trained, and no
    fastft call undid the half-done wrapping: the model had to be reloaded. The interrupted call undoes its layers."""
    from peft.tuners.lora.model import LoraModel

    torch.manual_seed(5)
    reference = fastft.get_peft_model(_tiny(), _lora_config())
    model = _tiny()
    before = [(n, type(m), [p.requires_grad for p in m.parameters(recurse=False)]) for n, m in model.named_modules()]
    real, calls = LoraModel._create_and_replace, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:   # two layers wrapped already
            raise KeyboardInterrupt("injected in peft's layer injection")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(LoraModel, "_create_and_replace", interrupted)
    torch.manual_seed(5)
    with pytest.raises(KeyboardInterrupt):
        fastft.get_peft_model(model, _lora_config())
    monkeypatch.setattr(LoraModel, "_create_and_replace", real)
    assert [(n, type(m), [p.requires_grad for p in m.parameters(recurse=False)])
            for n, m in model.named_modules()] == before
    torch.manual_seed(5)
    retried = fastft.get_peft_model(model, _lora_config())
    assert [type(m).__name__ for m in retried.modules()] == [type(m).__name__ for m in reference.modules()]
    assert torch.equal(_out(retried), _out(reference))


# ---------------------------------------------------------------------------------- 4. patch_model

def test_patch_model_interrupted_midway_leaves_a_model_unpatch_model_restores():
    """patch_model swaps module classes one by one and writes its record (what unpatch_model undoes) last: a Ctrl-C
    in the middle leaves a half-patched model that unpatch_model refuses ('is not patched')."""
    from fastft.integration.patching.patch import original_class, patch_model

    model = _tiny()
    with interrupted_at(patch_model, "_swap_class(module, new_cls)", occurrence=3):
        fastft.patch_model(model)
    if any(original_class(m) is not type(m) for m in model.modules()):
        fastft.unpatch_model(model)  # fails: "LlamaForCausalLM is not patched"
    assert all(original_class(m) is type(m) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


def test_patch_model_interrupted_after_switching_attention_keeps_the_original_attention():
    """Interrupted after switching attention to "fastft" but before the record: patch_model again records no
    attention change (it is "fastft" already), so unpatch_model leaves the model on fastft's attention for good."""
    from fastft.integration.patching.patch import patch_model

    model = _tiny()
    with interrupted_at(patch_model, "record.attn_implementation = attn_change"):
        fastft.patch_model(model)
    with contextlib.suppress(ValueError):
        fastft.patch_model(model)
    with contextlib.suppress(ValueError):
        fastft.unpatch_model(model)
    assert model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- 5. folder saves (files.py)

def _saved(seed):
    return _trained_lora(_tiny()) if seed is None else _trained_lora_seeded(seed)


def _trained_lora_seeded(seed):
    model = fastft.get_peft_model(_tiny(), _lora_config())
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    return model


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p != folder)


def test_an_interrupted_adapter_save_leaves_no_temporary_once_the_next_save_ran(tmp_path):
    """A Ctrl-C between the temporary folder's creation and the try block that removes it (the write-permission
    probe runs there), or after the swap and before the previous version's removal, leaves `.adapter.tmp-OWNER-*`
    (a whole copy of the adapter, or of an NF4 model: gigabytes) beside the target. The next save in the same
    process does not remove it (its owner, this process, is alive), nor does any later one while the process (a
    notebook's kernel) lives."""
    a, b = _trained_lora_seeded(1), _trained_lora_seeded(2)
    target = tmp_path / "adapter"
    fastft.save_adapter(a, target)
    with interrupted_at(ff._save_folder, "if os.path.lexists(path) and not path.is_dir():"):
        fastft.save_adapter(b, target)
    with interrupted_at(ff._save_folder, "if old is not None:"):
        fastft.save_adapter(a, target)
    fastft.save_adapter(b, target)
    assert _siblings(target) == [], "left beside the adapter after the next save"


def test_an_adapter_save_interrupted_in_the_write_probe_leaves_nothing_inside_the_adapter(tmp_path):
    """The write-permission probe is a temporary file created INSIDE the target folder; interrupted before it is
    removed, it stays in the user's adapter folder, and every later save keeps it (merge_into_folder carries the
    folder's other entries into the new version)."""
    a, b = _trained_lora_seeded(1), _trained_lora_seeded(2)
    target, fresh = tmp_path / "adapter", tmp_path / "fresh" / "adapter"
    fastft.save_adapter(a, target)
    with interrupted_at(ff._can_write_in, "os.close(fd)"):
        fastft.save_adapter(b, target)
    fastft.save_adapter(b, target)
    fastft.save_adapter(b, fresh)
    assert sorted(os.listdir(target)) == sorted(os.listdir(fresh))


def test_a_folder_save_without_exchange_interrupted_between_its_renames_keeps_the_folder(tmp_path, monkeypatch):
    """Where the file system cannot exchange two paths in one step (NFS, macOS, older kernels) a folder save renames
    the previous version aside, then the new one into place. A Ctrl-C between the two runs the save's cleanup, which
    deletes the new version (complete) and leaves the target missing: load_adapter fails until a later save or
    `fastft train` puts `.adapter.old` back. The cleanup could finish the swap (or put the previous version back)."""
    monkeypatch.setattr(ff, "_exchange", lambda a, b: False)
    a, b = _trained_lora_seeded(1), _trained_lora_seeded(2)
    target = tmp_path / "adapter"
    fastft.save_adapter(a, target)
    with interrupted_at(ff._swap_in, "os.replace(tmp, path)", which=-1):  # the second rename
        fastft.save_adapter(b, target)
    assert (target / "adapter_model.safetensors").is_file(), f"the adapter is gone; beside it: {_siblings(target)}"
    fastft.load_adapter(_tiny(), target)


def test_an_interrupted_smollm2_reconversion_leaves_no_stale_copy(tmp_path, monkeypatch):
    """A cached SmolLM2 checkpoint written by an older transformers is converted again; the old one is moved into
    `.SmolLM2-135M-Instruct.stale.XXXXXXXX/` and removed. Interrupted before the removal, the finally block deletes
    the new conversion (not yet in place) and the stale folder (538 MB) stays for good: its name is not one of the
    temporaries the next call removes."""
    from fastft.apps import models

    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path))
    target = tmp_path / "models" / models.SMOLLM2
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps({"transformers_version": "4.0.0"}))
    (target / "model.safetensors").write_bytes(b"0" * 1024)

    def convert(into):
        import transformers
        (Path(into) / "config.json").write_text(json.dumps({"transformers_version": transformers.__version__}))
    monkeypatch.setattr(models, "_convert_smollm2", convert)
    with interrupted_at(models._swap_in, "release_temporary(stale)"):
        models.smollm2_checkpoint()
    models.smollm2_checkpoint()
    assert sorted(p.name for p in target.parent.iterdir()) == [models.SMOLLM2]


# ------------------------------------------------------------------------------------- 6. the command line

def test_train_interrupted_by_ctrl_c_says_so_in_one_line_and_exits_non_zero(monkeypatch, capsys, tmp_path):
    """Ctrl-C during `fastft train` ends in a Python traceback (40-70 lines in a single process; 145 lines and three
    tracebacks under torchrun), where every other stop of the command is one line (cli's docstring). Expected: one
    line ('fastft train: interrupted ...', naming the last checkpoint / --resume) and exit status 130."""
    import fastft.apps.training as training
    from fastft.apps import cli

    monkeypatch.setattr(training, "validate", lambda cfg: cfg)

    def interrupted(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(training, "train", interrupted)
    try:
        code = cli.main(["train", "--steps", "2", "--output-dir", str(tmp_path / "never")])
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped fastft's command line (a traceback for the user)")
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(err) == 1 and "interrupt" in err[0].lower(), (code, err)


@pytest.mark.parametrize("name", ["bench", "bench kernels", "study"])
def test_bench_and_study_interrupted_by_ctrl_c_say_so_in_one_line_and_exit_130(name, monkeypatch, capsys, tmp_path):
    """Ctrl-C during `fastft bench` or `fastft study` ended in a Python traceback (the KeyboardInterrupt left the
    program; the shell saw 130 only as the signal's death), where `fastft train` says it in one line and exits 130.
    Expected the same of both, naming how to resume (the same command: bench_methods.json's rows, cells/)."""
    from fastft.apps import cli
    from fastft.apps.bench import methods as bench_methods
    from fastft.apps.study import runner as study_runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    if name == "bench":
        monkeypatch.setattr(bench_methods, "bench_methods", interrupted)
        argv = ["bench", "--shape", "tiny", "--methods", "lora", "--peers", "none", "--output-dir", str(tmp_path)]
    elif name == "bench kernels":  # its own line: it keeps no table to resume
        from fastft.apps.bench import kernels as bench_kernels

        monkeypatch.setattr(bench_kernels, "run_kernels", interrupted)
        argv = ["bench", "kernels", "--output-dir", str(tmp_path)]
    else:
        monkeypatch.setattr(study_runner, "check_inputs", lambda config: {})
        monkeypatch.setattr(study_runner, "run_study", interrupted)
        argv = ["study", "--quick", "--methods", "lora", "--no-progress", "--output-dir", str(tmp_path)]
    try:
        code = cli.command(argv)
    except KeyboardInterrupt:
        pytest.fail(f"the KeyboardInterrupt escaped `fastft {name}` (a traceback for the user)")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(err) == 1, (code, err)
    command = name.split()[0]
    expected = "runs the kernel benchmarks again" if name == "bench kernels" else "same command resumes"
    assert err[0].startswith(f"fastft {command}: interrupted") and expected in err[0], err


@pytest.mark.parametrize("checkpoint", [False, True])
def test_train_interrupted_before_its_first_checkpoint_is_not_sent_to_resume(checkpoint, monkeypatch, capsys,
                                                                             tmp_path):
    """The Ctrl-C line said "`fastft train ... --resume` continues from the last checkpoint" wherever the run was
    stopped: stopped before its --output-dir was made (data loading, the launch), that --resume is refused ("the
    output directory ... does not exist (nothing to resume; drop --resume to start a run)"). The line names the
    checkpoint --resume continues from, or says to run the command again when there is none."""
    import fastft.apps.training as training
    from fastft.apps import cli

    out = tmp_path / "run"
    if checkpoint:
        (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    monkeypatch.setattr(training, "validate", lambda cfg: cfg)

    def interrupted(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(training, "train", interrupted)
    assert cli.main(["train", "--steps", "4", "--output-dir", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    if checkpoint:
        assert "--resume" in err[0] and "step-00000002" in err[0], err
    else:
        assert "--resume" not in err[0] and "run the same command again" in err[0], err
        assert f"{out} not made yet" in err[0], err  # not "none in run/checkpoints", a folder that is not there


def _toy_study(monkeypatch, tmp_path, seeds: int, interrupt):
    """A one-task study of `seeds` cells over a toy task, each cell a quick diverged result unless interrupt(key)
    says to stop there (KeyboardInterrupt); returns its config."""
    from dataclasses import asdict

    from fastft.apps.study import runner
    from tests.test_study_review_fixes import _toy_task

    def run_cell(spec, settings):
        if interrupt(spec.key):
            raise KeyboardInterrupt
        return {"key": spec.key, **asdict(spec), "settings": asdict(settings), "status": "diverged",
                "reason": "training loss nan at step 1 of 2", "wall_seconds": 0.0}

    monkeypatch.setattr(runner, "run_cell", run_cell)
    monkeypatch.setattr(runner, "load_study_task", lambda name: _toy_task())
    return runner.StudyConfig(methods=("lora",), tasks=("subj",), models=("minilm",), regimes=("32-per-class",),
                              seeds=seeds, steps=2, with_peft=False, output_dir=str(tmp_path))


def test_a_study_stopped_midway_leaves_results_marked_incomplete(tmp_path, monkeypatch):
    """results.json is rewritten after every cell; a study stopped midway left the cells so far under the full
    plan's config with nothing saying so, and a redraw (python -m fastft.apps.study.report results.json) read as a
    finished study. Expected: `complete` false with the planned count, and the redrawn report saying it."""
    import json

    from fastft.apps.study import runner
    from fastft.apps.study.report import write_report

    calls = []
    config = _toy_study(monkeypatch, tmp_path, 3, lambda key: calls.append(key) or len(calls) == 2)
    with pytest.raises(KeyboardInterrupt):
        runner.run_study(config, progress=False, log=lambda line: None)
    stopped = json.loads((tmp_path / "results.json").read_text())
    assert (stopped["complete"], stopped["planned_cells"], len(stopped["cells"])) == (False, 3, 1)
    assert "> **Incomplete**: 1 of 3 cells run" in write_report(stopped, tmp_path)["report"].read_text()
    finished = runner.run_study(config, progress=False, log=lambda line: None)
    assert (finished["complete"], finished["resumed_cells"], len(calls)) == (True, 1, 4)
    assert "Incomplete" not in write_report(finished, tmp_path)["report"].read_text()
    old = {k: v for k, v in finished.items() if k not in ("complete", "planned_cells")}  # written before they were kept
    assert "Incomplete" not in write_report(old, tmp_path)["report"].read_text()


def test_a_rerun_stopped_midway_leaves_no_report_of_the_earlier_run(tmp_path, monkeypatch):
    """A finished study's report.md stayed beside the results.json a later run (a larger plan) rewrote and left
    incomplete when stopped: a report of a finished study over results marked incomplete. The run replaces it
    first (through a link the user made to it, as every write of it); the command draws it again at the end."""
    from dataclasses import replace

    from fastft.apps.study import runner
    from fastft.apps.study.report import write_report

    stop = []
    config = _toy_study(monkeypatch, tmp_path, 1, lambda key: bool(stop))
    kept = tmp_path / "kept.md"
    kept.write_text("")
    (tmp_path / "report.md").symlink_to(kept)
    write_report(runner.run_study(config, progress=False, log=lambda line: None), tmp_path)
    assert "Incomplete" not in kept.read_text() and "subj" in kept.read_text()
    stop.append(True)
    with pytest.raises(KeyboardInterrupt):
        runner.run_study(replace(config, seeds=2), progress=False, log=lambda line: None)
    assert (tmp_path / "report.md").is_symlink()
    assert "subj" not in kept.read_text() and "python -m fastft.apps.study.report" in kept.read_text()
