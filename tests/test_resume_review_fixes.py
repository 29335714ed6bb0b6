"""Regressions of the kill/resume review of `fastft train`: one run per --output-dir (a lock), damaged checkpoints and
failed saves named, memory settings a resume may change, whole-folder adapter saves, the base model's contents and
the settings' spellings compared on resume, temporaries of killed writes removed, fp16's loss-scaler state kept."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from fastft import files
from fastft.apps.cli import main
from fastft.apps.training import checkpoints as ckpt
from fastft.apps.training.config import ConfigError, TrainConfig, to_yaml_dict, validate
from tests import train_utils
from tests.train_utils import save_tiny_checkpoint

tiny, one_thread = train_utils.tiny, train_utils.one_thread  # the shared fixtures


def _argv(model, out, *extra, steps="4"):
    return ["train", "--model", str(model), "--steps", steps, "--batch-size", "3", "--grad-accum", "2",
            "--eval-examples", "4", "--max-length", "24", "--dropout", "0.1", "--lr", "3e-3", "--save-every", "2",
            "--output-dir", str(out), *extra]


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def _adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


# ----------------------------------------------------------------------------------------- 1: the lock

_HOLD = textwrap.dedent("""
    import sys, time
    from fastft.apps.training.run_lock import _try_lock
    from pathlib import Path
    lock, problem = _try_lock(Path(sys.argv[1]))
    print("held" if lock else problem, flush=True)
    time.sleep(600)
""")


@pytest.mark.slow
def test_a_second_run_on_a_held_output_dir_is_refused_and_a_killed_holder_blocks_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=os.getcwd())
    try:
        assert holder.stdout.readline().strip() == "held"
        err = _error(capsys, _argv(tiny, out, steps="2"))
        assert f"--output-dir {out} is in use by another fastft train run (process {holder.pid} on " in err
        assert not (out / "logs.jsonl").exists() and not (out / "config.yaml").exists()  # refused before writing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    from fastft.apps.training.run_lock import _try_lock

    lock, problem = _try_lock(out)
    assert problem is None  # the kernel dropped the killed holder's lock
    lock.close()


def test_run_start_removes_what_killed_runs_left(tmp_path):
    """With the lock held: temporaries of fastft's naming (old and new), whoever wrote them (no other run writes
    there, and a live-looking PID may be a restarted container's), unfinished checkpoint folders, and a folder save's
    previous version moved aside (put back when the new one never arrived); a user's look-alike stays."""
    from fastft.apps.training.run_lock import clean_output_dir

    out, owner = tmp_path, files._owner()
    host = owner.split("-")[0]
    stale = [".tmp-a1b2c3d4metrics.json", f".metrics.json.tmp-{host}-{_dead_pid()}-x1y2z3w4.json",
             ".report.md.tmp-0000beef-12-abcdefgh.md",  # another host's: no train run writes here but the lock's
             f".logs.jsonl.tmp-{owner}-abcdefgh.jsonl", f".eval.json.tmp-{host}-1-x1y2z3w4.json"]  # live PIDs
    for name in stale:
        (out / name).write_text("half")
    user = out / ".eval.tmp-notes"
    user.mkdir()
    (user / "todo.txt").write_text("mine")
    (out / ".model.tmp-q1w2e3r4" / "sub").mkdir(parents=True)
    (out / "checkpoints" / ".step-00000004.tmp").mkdir(parents=True)
    (out / "checkpoints" / "step-00000002").mkdir()
    (out / ".adapter.old").mkdir()
    (out / ".adapter.old" / "adapter_config.json").write_text("v1")
    (out / "metrics.json").write_text("{}")

    clean_output_dir(out)
    assert sorted(p.name for p in out.iterdir()) == [user.name, "adapter", "checkpoints", "metrics.json"]
    assert (user / "todo.txt").read_text() == "mine"
    assert (out / "adapter" / "adapter_config.json").read_text() == "v1"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]


# ---------------------------------------------------------------------------- 2: damaged checkpoints, failed saves

@pytest.mark.slow
def test_damaged_checkpoint_is_named_before_any_model_loads(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(_argv(tiny, out, steps="2")) == 0
    step = out / "checkpoints" / "step-00000002"
    saved = tmp_path / "saved"
    shutil.copytree(step, saved)

    from transformers import AutoModelForCausalLM

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the checkpoint was checked")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_model)
    for name in ("trainer_state.pt", "trainable.safetensors", "optimizer.pt", "rng-0.pt"):
        file = step / name
        os.truncate(file, file.stat().st_size // 2)
        err = _error(capsys, _argv(tiny, out, "--resume", steps="2"))
        assert err.startswith(f"fastft train: error: --resume: checkpoint {step} is damaged: {name}: it cannot be "
                              "read (") and "truncated or corrupt; delete it to start the run over" in err, err
        shutil.copy2(saved / name, file)
    (step / "optimizer.pt").unlink()
    shutil.copytree(saved, out / "checkpoints" / "step-00000001")  # an older complete one: named as the way on
    err = _error(capsys, _argv(tiny, out, "--resume", steps="2"))
    assert f"checkpoint {step} is damaged: optimizer.pt: it is missing; delete it to resume from the older " \
           "step-00000001" in err, err


@pytest.mark.slow
def test_checkpoint_weights_that_do_not_fit_the_trainable_parameters_are_named(tiny, tmp_path, capsys):
    """A trainable.safetensors lacking a parameter resumed with that parameter at its initial value (its optimizer
    moments restored); an extra or reshaped tensor failed with a bare KeyError / RuntimeError."""
    from safetensors.torch import save_file

    out, constant = tmp_path / "run", ("--schedule", "constant", "--warmup-ratio", "0")  # --steps may grow
    assert main(_argv(tiny, out, *constant, steps="2")) == 0
    file = out / "checkpoints" / "step-00000002" / "trainable.safetensors"
    saved = load_file(str(file))
    first = sorted(saved)[0]
    damages = {
        "it lacks 1 trainable parameter(s) (" + first: {k: v for k, v in saved.items() if k != first},
        "it holds 1 tensor(s) that are no trainable parameter here (extra": {**saved, "extra": torch.zeros(2)},
        f"{first} is torch.float32 (3, 3), the parameter torch.float32 ": {**saved, first: torch.zeros(3, 3)},
        f"{first} is torch.float16 ": {**saved, first: saved[first].half()},
    }
    for message, weights in damages.items():
        save_file(weights, str(file))
        err = _error(capsys, _argv(tiny, out, *constant, "--resume", steps="3"))
        assert f"is damaged: trainable.safetensors: {message}" in err, err


# what a full disk raises: an OSError from a plain write; safetensors' own error type (not an OSError) from save_file
_DISK_FULL = {"oserror": (OSError(28, "No space left on device"), "[Errno 28] No space left on device)"),
              "safetensors": ("SafetensorError", "SafetensorError: Error while serializing: I/O error: No space left "
                                                 "on device (os error 28); ")}


@pytest.mark.slow
@pytest.mark.parametrize("raised", list(_DISK_FULL))
def test_a_checkpoint_that_cannot_be_written_stops_with_the_last_good_one(tiny, tmp_path, capsys, monkeypatch,
                                                                           raised):
    """A full disk stops the run with one line naming the last good checkpoint; safetensors' SafetensorError and
    torch.save's RuntimeError on a full disk gave a traceback (they are not OSErrors)."""
    import safetensors.torch
    from safetensors import SafetensorError

    real, calls = safetensors.torch.save_file, {"n": 0}
    error, said = _DISK_FULL[raised]
    if raised == "safetensors":
        error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def disk_full_at_the_second_checkpoint(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_at_the_second_checkpoint)
    out = tmp_path / "run"
    assert main(_argv(tiny, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"fastft train: step 4: its checkpoint could not be written ({said}") \
        and f"the last good checkpoint is {out / 'checkpoints' / 'step-00000002'}" in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]  # the partial one is gone


# ----------------------------------------------------------------- 3: memory settings a resume may change

def _oom_from_step_3(monkeypatch):
    """Out of memory from step 3's forward on (2 micro-batches a step), until `monkeypatch.undo()`."""
    from fastft.apps.training.objectives import ObjectiveModel

    forward, calls = ObjectiveModel.forward, {"n": 0}

    def failing(self, batch):
        if self.training:
            calls["n"] += 1
            if calls["n"] > 4:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, batch)
    monkeypatch.setattr(ObjectiveModel, "forward", failing)


@pytest.mark.slow
def test_resume_after_out_of_memory_with_the_advised_settings_trains_the_same_weights(tiny, tmp_path, capsys,
                                                                                     monkeypatch, one_thread):
    """The advice names --gradient-checkpointing and --offload-activations, which change no value computed: the
    resumed run's adapter is bitwise the uninterrupted run's (dropout on: the recomputation redraws the same masks).
    The loss scaler's state goes into the checkpoint and comes back (its CPU round trip: below)."""
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert main(_argv(tiny, straight)) == 0

    marker = {"scale": torch.tensor([512.0]), "growth_tracker": 3}
    restored = []
    monkeypatch.setattr(ckpt, "scaler_state", lambda accelerator: marker, raising=False)
    monkeypatch.setattr(ckpt, "restore_scaler", lambda accelerator, state: restored.append(state), raising=False)
    with monkeypatch.context() as oom:
        _oom_from_step_3(oom)
        assert main(_argv(tiny, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "out of memory" in err and "--gradient-checkpointing (and --offload-activations)" in err \
        and "--resume accepts these" in err
    state = torch.load(out / "checkpoints" / "step-00000002" / "trainer_state.pt", weights_only=False)
    assert state["scaler"]["growth_tracker"] == 3

    assert main(_argv(tiny, out, "--resume", "--gradient-checkpointing", "--offload-activations")) == 0
    assert len(restored) == 1 and torch.equal(restored[0]["scale"], marker["scale"])
    a, b = _adapter(out), _adapter(straight)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_resume_with_another_split_of_the_same_step_trains_the_same_records(tiny, tmp_path, capsys, monkeypatch,
                                                                            one_thread):
    """--batch-size 1 --grad-accum 6 takes the records of --batch-size 3 --grad-accum 2 a step, and the loss is
    normalised by the step's target count either way: without dropout the weights match the uninterrupted run's
    to rounding. Another product is refused, naming both."""
    no_dropout = ("--dropout", "0")
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert main(_argv(tiny, straight, *no_dropout)) == 0
    with monkeypatch.context() as oom:
        _oom_from_step_3(oom)
        assert main(_argv(tiny, out, *no_dropout)) == 1
    capsys.readouterr()
    err = _error(capsys, _argv(tiny, out, *no_dropout, "--resume", "--batch-size", "2"))
    assert "--batch-size 3 -> 2" in err and "--grad-accum 2 ->" not in err
    assert main(_argv(tiny, out, *no_dropout, "--resume", "--batch-size", "1", "--grad-accum", "6")) == 0
    a, b = _adapter(out), _adapter(straight)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    resumed, uninterrupted = (json.loads((d / "metrics.json").read_text()) for d in (out, straight))
    assert resumed["train_losses"] == pytest.approx(uninterrupted["train_losses"], rel=1e-5)


# ------------------------------------------------------------------------- 4: whole-folder adapter saves

def _adapter_fill(version):
    def fill(folder):
        (folder / "adapter_config.json").write_text(version)
        (folder / "adapter_model.safetensors").write_text(version)
        (folder / "README.md").write_text(version)
        (folder / "named").mkdir()
        (folder / "named" / "adapter_config.json").write_text(version)
    return fill


def _seen(target) -> str:
    """What a reader finds: one version whole, or a mix."""
    if not target.exists():
        return "missing"
    versions = {(target / n).read_text() for n in ("adapter_config.json", "adapter_model.safetensors", "README.md",
                                                   "named/adapter_config.json")}
    assert (target / "metrics.json").read_text() == "kept"  # the folder's other entries stay
    return versions.pop() if len(versions) == 1 else f"mixed {sorted(versions)}"


@pytest.mark.parametrize("exchange", [True, False])
def test_an_adapter_save_killed_at_any_rename_leaves_one_version_whole(tmp_path, monkeypatch, exchange):
    """The old save renamed README.md, adapter_config.json, adapter_model.safetensors one by one: a kill between
    two renames left a new config beside old weights, which peft loads without a word. Where the file system cannot
    exchange two folders in one step, a kill between the two renames leaves the old version aside, put back by
    `recover_folder` (fastft train does at its start) or the next save."""
    real_replace, real_exchange = os.replace, getattr(files, "_exchange", None)
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False, raising=False)
    for kill_at in range(1, 8):
        target = tmp_path / f"kill-{kill_at}" / "adapter"
        files.merge_into_folder(target, _adapter_fill("v1"))
        (target / "metrics.json").write_text("kept")
        calls = {"n": 0}

        def counted(fn):
            def wrapper(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == kill_at:
                    raise KeyboardInterrupt("killed")
                return fn(*args, **kwargs)
            return wrapper

        monkeypatch.setattr(files.os, "replace", counted(real_replace))
        if exchange and real_exchange is not None:
            monkeypatch.setattr(files, "_exchange", counted(real_exchange))
        try:
            files.merge_into_folder(target, _adapter_fill("v2"))
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(files.os, "replace", real_replace)
        seen = _seen(target)
        if seen == "missing":
            assert not exchange  # two renames only where no exchange is possible
            files.recover_folder(target)
            seen = _seen(target)
        assert seen in ("v1", "v2"), (kill_at, seen)


# ------------------------------------------------------------------------- 5: the model's contents

def test_model_fingerprint_tells_another_model_at_the_same_path(tmp_path):
    from fastft.apps.models import model_fingerprint

    model = save_tiny_checkpoint(tmp_path / "m", seed=0, layers=1)
    before = model_fingerprint(model)
    assert "config.json" in before and "model.safetensors" in before and "tokenizer.json" in before
    (model / "README.md").write_text("notes")  # not what training computes
    copy = shutil.copytree(model, tmp_path / "copy")  # a copy (other times) is the same model
    assert model_fingerprint(model) == before == model_fingerprint(copy)
    now = {"model": model_fingerprint(copy), "teacher": None}
    ckpt.check_resumed_models(now, {"model": before, "teacher": None}, tmp_path / "step-00000002")
    ckpt.check_resumed_models(now, None, tmp_path / "step-00000002")  # an older checkpoint: not checked

    save_tiny_checkpoint(copy, seed=1, layers=1)  # regenerated in place: the same sizes, other weights
    with pytest.raises(ConfigError, match=r"--resume: --model's files changed since .* \(model\.safetensors "
                                          r"differs\); resume with the model the run started with"):
        ckpt.check_resumed_models({"model": model_fingerprint(copy), "teacher": None}, {"model": before},
                                  tmp_path / "step-00000002")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rope_theta": 1.0}))
    with pytest.raises(ConfigError, match=r"config\.json differs"):
        ckpt.check_resumed_models({"model": model_fingerprint(copy)}, {"model": before}, tmp_path)


@pytest.mark.slow
def test_resume_refuses_a_changed_model_at_the_same_path(tmp_path, capsys):
    model = save_tiny_checkpoint(tmp_path / "m", seed=0)
    out = tmp_path / "run"
    assert main(_argv(model, out, steps="2")) == 0
    save_tiny_checkpoint(model, seed=1)
    err = _error(capsys, _argv(model, out, "--resume", steps="2"))
    assert "--model's files changed since" in err and "model.safetensors differs" in err


# ----------------------------------------------------------------------- 6: spellings of one setting

def test_resume_accepts_other_spellings_of_the_same_settings(tiny, tmp_path, monkeypatch):
    from fastft.apps.training.resume_checks import check_resumed_settings

    data = tmp_path / "work" / "d.jsonl"
    data.parent.mkdir()
    data.write_text(json.dumps({"text": "x"}) + "\n")
    shutil.copytree(tiny, tmp_path / "work" / "tiny")
    monkeypatch.chdir(tmp_path / "work")
    base = dict(data="d.jsonl", model="tiny", output_dir="run")
    first = validate(TrainConfig(**base, quantize="nf4"))
    checkpoint = tmp_path / "step-00000002"
    check_resumed_settings(validate(TrainConfig(**base, method="qlora")), to_yaml_dict(first), checkpoint)  # older
    saved = ckpt.comparable_settings(to_yaml_dict(first))  # as a checkpoint stores them
    check_resumed_settings(validate(TrainConfig(**base, method="qlora")), saved, checkpoint)
    absolute = dict(base, model=str(tmp_path / "work" / "tiny"), data=str(data))
    check_resumed_settings(validate(TrainConfig(**absolute, quantize="nf4")), saved, checkpoint)
    monkeypatch.chdir(tmp_path)  # resumed from elsewhere
    check_resumed_settings(validate(TrainConfig(**dict(absolute, output_dir="work/run"), method="qlora")), saved,
                           checkpoint)
    with pytest.raises(ConfigError, match=r"--method 'qlora' -> 'lora'"):
        check_resumed_settings(validate(TrainConfig(**absolute)), saved, checkpoint)
    other = shutil.copy(data, tmp_path / "other.jsonl")  # another path: its contents decide (the data's sha256)
    check_resumed_settings(validate(TrainConfig(**dict(absolute, data=str(other)), method="qlora")), saved, checkpoint)
    with pytest.raises(ConfigError, match=r"--eval-data None -> '<a path"):  # given or not still counts
        check_resumed_settings(validate(TrainConfig(**dict(absolute, eval_data=str(other)), method="qlora")), saved,
                               checkpoint)
    with pytest.raises(ConfigError, match=r"--model '<a path.*' -> 'smollm2-135m'"):  # the built-in name: no path
        check_resumed_settings(validate(TrainConfig(**dict(absolute, model="smollm2-135m"), method="qlora")), saved,
                               checkpoint)
    # a checkpoint written before model fingerprints: --model's path as given is the only check, so it still counts
    older = to_yaml_dict(first)
    monkeypatch.chdir(tmp_path / "work")
    check_resumed_settings(validate(TrainConfig(**base, method="qlora")), older, checkpoint, models_fingerprinted=False)
    shutil.copytree(tiny, tmp_path / "work" / "copy")
    with pytest.raises(ConfigError, match=r"--model 'tiny' -> 'copy'"):
        check_resumed_settings(validate(TrainConfig(**dict(base, model="copy"), method="qlora")), older, checkpoint,
                               models_fingerprinted=False)


@pytest.mark.slow
def test_a_moved_project_folder_resumes_with_the_same_relative_paths(tiny, tmp_path, monkeypatch, capsys):
    """A requeued job on a node that mounts the project elsewhere (or a renamed project folder): the same relative
    --model/--data, other absolute paths, the same contents: it resumes."""
    project = tmp_path / "project"
    shutil.copytree(tiny, project / "tiny")
    (project / "d.jsonl").write_text("".join(json.dumps({"text": f"q{i} what is {i}+1? It is {i + 1}."}) + "\n"
                                             for i in range(40)))
    argv = ["train", "--model", "tiny", "--data", "d.jsonl", "--batch-size", "2", "--eval-examples", "4",
            "--max-length", "24", "--save-every", "2", "--schedule", "constant", "--warmup-ratio", "0",
            "--output-dir", "run"]
    monkeypatch.chdir(project)
    assert main([*argv, "--steps", "2"]) == 0
    moved = project.rename(tmp_path / "moved")
    monkeypatch.chdir(moved)
    assert main([*argv, "--steps", "4", "--resume"]) == 0
    assert "(step 2 of 4)" in capsys.readouterr().out  # resumed, not started over


# ----------------------------------------------------------------- 7: temporaries of killed writes

_KILLED_WRITE = textwrap.dedent("""
    import importlib.util, os, signal, sys
    # fastft/files.py alone (standard library only): importing the fastft package loads torch, ~10 s a process
    spec = importlib.util.spec_from_file_location("files", sys.argv[2])
    files = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(files)
    atomic_write = files.atomic_write
    def write(tmp):
        open(tmp, "wb").write(b"x" * 100_000)
        os.kill(os.getpid(), signal.SIGKILL)
    atomic_write(sys.argv[1], write)
""")


def test_atomic_write_removes_the_temporaries_of_killed_writes_of_its_target(tmp_path):
    target = tmp_path / "model.safetensors"
    for _ in range(3):  # SIGKILL skips any cleanup; the next write removes the killed one's temporary
        assert subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(target), files.__file__]).returncode == -9
        assert len(list(tmp_path.iterdir())) == 1 and not target.exists()
    live = tmp_path / f".model.safetensors.tmp-{files._owner()}-abcdefgh.safetensors"  # a write in progress
    live.write_bytes(b"x")
    other = tmp_path / f".other.bin.tmp-{files._owner().split('-')[0]}-{_dead_pid()}-abcdefgh.bin"  # another target
    other.write_bytes(b"x")
    files._WRITING.add(str(live))  # held by a write of this process (one no write holds is an interrupted one's)
    try:
        files.atomic_write(target, b"complete")
    finally:
        files._WRITING.discard(str(live))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, target.name])
    assert target.read_bytes() == b"complete"


# ------------------------------------------------------------------------------ fp16's loss scaler

def test_loss_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    """fp16 (GPU only) scales the loss by a GradScaler whose scale halves on inf gradients and doubles after
    growth_interval good steps: a resumed run restarting at 65536 would skip other steps than the uninterrupted one.
    Its state is saved with the trainer state and restored; checked with a CPU GradScaler."""
    class Accelerator:
        def __init__(self):
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)

    def step(scaler, weight, grad):  # a training step's scaler calls, the gradient that of the scaled loss
        scaler.scale(torch.zeros(()))  # makes the scaler's lazy state (a restored one's too)
        weight.grad = grad * scaler.get_scale()
        scaler.step(torch.optim.SGD([weight], lr=0.1))
        scaler.update()

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4))
    grads = [torch.randn(4), torch.full((4,), float("inf")), torch.randn(4), torch.randn(4), torch.randn(4)]
    first = Accelerator()
    for grad in grads[:3]:
        step(first.scaler, weight, grad)
    state = ckpt.scaler_state(first)
    torch.save({"scaler": state}, tmp_path / "trainer_state.pt")
    resumed = Accelerator()
    ckpt.restore_scaler(resumed, torch.load(tmp_path / "trainer_state.pt", weights_only=False)["scaler"])
    assert resumed.scaler.state_dict() == first.scaler.state_dict() and first.scaler.get_scale() != 2.0**10
    scales = []
    for grad in grads[3:]:
        for run in (first, resumed):
            step(run.scaler, weight, grad)
        assert resumed.scaler.get_scale() == first.scaler.get_scale()
        scales.append(first.scaler.get_scale())
    # halved on the inf step, one good step counted: the growth tracker came back too, so the scale grows on the
    # first step after the resume, as it did in the uninterrupted run
    assert (state["scale"], state["_growth_tracker"]) == (512.0, 1) and scales == [1024.0, 1024.0]
    assert ckpt.scaler_state(type("NoScaler", (), {"scaler": None})()) is None


@pytest.mark.slow
def test_max_grad_norm_clips_the_parameters_prepare_leaves(tiny, tmp_path, monkeypatch, one_thread):
    """accelerate's FSDP2 plugin (a GPU's --distributed fsdp) shards inside `prepare`, replacing every parameter;
    the trainer clipped the list it made before (no gradients there): grad_norm 0.0 logged, nothing clipped, and
    the weights drifted from one process's (0.027). Emulated: prepare replaces the trainable parameters and remaps the
    optimizer, as the plugin does; the run must match a plain one."""
    import accelerate
    from safetensors.torch import load_file

    real_prepare = accelerate.Accelerator.prepare

    def prepare_replacing_parameters(self, *args, **kwargs):
        if len(args) == 2:
            objective, optimizer = args
            swapped = {}
            for module in objective.modules():
                for name, p in list(module._parameters.items()):
                    if p is not None and p.requires_grad:
                        module._parameters[name] = swapped[id(p)] = torch.nn.Parameter(p.detach().clone())
            for group in optimizer.param_groups:
                group["params"] = [swapped.get(id(p), p) for p in group["params"]]
        return real_prepare(self, *args, **kwargs)

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i} " * (i % 5 + 2)}) + "\n" for i in range(24)))
    runs = {}
    for kind in ("plain", "replaced"):
        if kind == "replaced":
            monkeypatch.setattr(accelerate.Accelerator, "prepare", prepare_replacing_parameters)
        out = tmp_path / kind
        assert main(["train", "--model", str(tiny), "--data", str(data), "--steps", "3", "--batch-size", "4",
                     "--eval-examples", "4", "--max-length", "24", "--lr", "3e-3", "--max-grad-norm", "0.05",
                     "--dropout", "0", "--output-dir", str(out)]) == 0
        norms = [json.loads(line).get("grad_norm") for line in (out / "logs.jsonl").read_text().splitlines()]
        runs[kind] = ([n for n in norms if n is not None], load_file(str(out / "adapter" / "adapter_model.safetensors")))
    assert len(runs["plain"][0]) == 3 and all(n > 0.05 for n in runs["plain"][0])  # clipping did something
    assert runs["replaced"][0] == pytest.approx(runs["plain"][0], rel=1e-5)
    for name, w in runs["plain"][1].items():
        torch.testing.assert_close(runs["replaced"][1][name], w, rtol=1e-5, atol=1e-7)
