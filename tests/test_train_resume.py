"""Kill-safe training: a run killed with SIGKILL resumes to bit-identical weights; a non-finite loss or an
out-of-memory stops with one line and the last good checkpoint intact."""
import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from fastft.apps.cli import main
from tests import train_utils

tiny, one_thread = train_utils.tiny, train_utils.one_thread  # the shared fixtures


pytestmark = pytest.mark.slow  # runs training jobs


def _argv(tiny, out, *extra):
    return ["train", "--model", str(tiny), "--steps", "12", "--batch-size", "3", "--grad-accum", "2",
            "--eval-examples", "4", "--max-length", "24", "--dropout", "0.1", "--lr", "3e-3", "--save-every", "2",
            "--output-dir", str(out), *extra]


def _start_and_kill(tiny, out, max_delay: float) -> bool:
    """Start a run, SIGKILL it up to max_delay s after its first checkpoint appears; True when the kill landed
    before the run wrote its final adapter."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastft.apps.cli", *_argv(tiny, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not any((out / "checkpoints").glob("step-*")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, max_delay))  # any moment: mid-step, mid-save, mid-evaluation
    proc.kill()
    code = proc.wait()
    assert code in (-9, 0), proc.stderr.read().decode()[-2000:]
    return code == -9 and not (out / "adapter").exists()


def test_sigkill_then_resume_is_bit_identical(tiny, tmp_path, one_thread):
    # A quiet machine can finish the ten steps after the first checkpoint within the delay: then try again,
    # sooner (the last try kills at once, ten steps before the end).
    for attempt, max_delay in enumerate((0.3, 0.1, 0.0)):
        killed = tmp_path / f"killed-{attempt}"
        if _start_and_kill(tiny, killed, max_delay):
            break
    else:
        raise AssertionError("every run finished before it could be killed")

    assert main(_argv(tiny, killed, "--resume")) == 0
    assert main(_argv(tiny, tmp_path / "straight")) == 0
    a = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    resumed, straight = (json.loads((d / "metrics.json").read_text()) for d in (killed, tmp_path / "straight"))
    assert resumed["resumed_from"] and resumed["train_losses"] == straight["train_losses"]
    steps = [json.loads(line)["step"] for line in (killed / "logs.jsonl").read_text().splitlines()
             if "eval" not in json.loads(line)]
    assert steps == list(range(1, 13))  # the killed run's lines past its checkpoint were dropped
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-00000012"]


@pytest.mark.parametrize("failure", ["nan", "oom", "no targets"])
def test_failure_stops_with_the_last_checkpoint_intact(tiny, tmp_path, monkeypatch, capsys, failure):
    from fastft.apps.training.objectives import ObjectiveModel

    forward, count = ObjectiveModel.forward, ObjectiveModel.count
    calls = {"train": 0, "count": 0}

    def failing(self, batch):
        if self.training:
            calls["train"] += 1
            if calls["train"] > 4:  # step 3 (2 micro-batches a step)
                if failure == "oom":
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                loss, stats = forward(self, batch)
                return (loss * float("nan") if failure == "nan" else loss * 0), stats
        return forward(self, batch)

    def counting(self, batch):  # what a step whose labels are all masked counts (built-in data never has one)
        calls["count"] += self.training
        return 0 if failure == "no targets" and calls["count"] > 4 else count(self, batch)

    monkeypatch.setattr(ObjectiveModel, "forward", failing)
    monkeypatch.setattr(ObjectiveModel, "count", counting)
    out = tmp_path / "run"
    assert main(_argv(tiny, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fastft train: step 3:") and str(out / "checkpoints" / "step-00000002") in err
    assert {"oom": "out of memory", "nan": "the loss is nan", "no targets": "no target token"}[failure] in err
    checkpoint = out / "checkpoints" / "step-00000002"
    assert load_file(str(checkpoint / "trainable.safetensors"))
    assert torch.load(checkpoint / "trainer_state.pt", weights_only=False)["step"] == 2
    assert not (out / "adapter").exists()


@pytest.mark.parametrize("at_step, save_every, before, last", [(4, "2", "its checkpoint", 2), (12, "5", "saving", 10)])
def test_non_finite_weights_are_never_saved(tiny, tmp_path, monkeypatch, capsys, at_step, save_every, before, last):
    """An optimizer step that leaves NaN weights is seen by the next step's loss, except the one before a checkpoint
    and the last one: the run stops before saving them, the previous checkpoint intact."""
    step, calls = torch.optim.AdamW.step, {"n": 0}

    def poisoning(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == at_step:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning)
    out = tmp_path / "run"
    assert main(_argv(tiny, out, "--save-every", save_every)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"fastft train: step {at_step}: the weights are not finite") and f"before {before}" in err
    checkpoint = out / "checkpoints" / f"step-{last:08d}"
    assert str(checkpoint) in err and sorted(p.name for p in checkpoint.parent.iterdir()) == [checkpoint.name]
    assert not (out / "adapter").exists()


def test_resume_refuses_changed_settings_and_a_new_run_refuses_old_checkpoints(tiny, tmp_path, capsys, one_thread):
    """A resumed run with another learning rate or rank would mix two runs (the restored optimizer and scheduler
    keep the old values): refused, naming the settings, before config.yaml is touched. A run without --resume in a
    folder holding an earlier run's checkpoints is refused too (its checkpoint steps would collide, and a later
    --resume would pick the old run's newest)."""
    out = tmp_path / "run"
    short = ["train", "--model", str(tiny), "--steps", "2", "--batch-size", "2", "--eval-examples", "0",
             "--max-length", "24", "--save-every", "1", "--output-dir", str(out)]
    assert main(short) == 0
    saved = (out / "config.yaml").read_text()

    def error(argv) -> str:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    err = error([*short, "--resume", "--lr", "0.01", "--rank", "8", "--save-every", "5"])
    assert "--resume:" in err and "--lr 0.001 -> 0.01" in err and "--rank 16 -> 8" in err and "save-every" not in err
    assert (out / "config.yaml").read_text() == saved
    assert "holds checkpoints of an earlier run (step-00000002); pass --resume" in error(short)
    # --steps only where no learning rate depends on it
    assert "--steps 2 -> 3" in error([*short, "--resume", "--steps", "3"])
    # settings that only decide what is evaluated and saved may change
    assert main([*short, "--resume", "--eval-examples", "2", "--save-every", "3"]) == 0
    # each process restores its own RNG: another process count is refused, before any model loads
    state_file = out / "checkpoints" / "step-00000002" / "trainer_state.pt"
    torch.save({**torch.load(state_file, weights_only=False), "processes": 2}, state_file)
    saved = (out / "config.yaml").read_text()
    assert "was written by 2 processes, this run has 1" in error([*short, "--resume"])
    assert (out / "config.yaml").read_text() == saved


def test_resume_refuses_changed_data_a_moved_split_and_fewer_steps(tiny, tmp_path, capsys):
    """The same --data path with other contents, an --eval-examples that moves the held-out split of --data, and
    --steps below the checkpoint's step (where --steps may change) are refused before any model loads; an
    --eval-examples that leaves the split as it was resumes."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(40)))
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny), "--data", str(data), "--steps", "2", "--batch-size", "2",
            "--eval-examples", "4", "--max-length", "16", "--save-every", "2", "--schedule", "constant",
            "--warmup-ratio", "0", "--output-dir", str(out)]
    assert main(argv) == 0

    def error(*extra) -> str:
        with pytest.raises(SystemExit) as info:
            main([*argv, "--resume", *extra])
        assert info.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "is at step 2, past --steps 1" in error("--steps", "1")
    assert "trained on 36 records, this run has 38" in error("--eval-examples", "2")  # the split moved
    original = data.read_text()
    data.write_text(original.replace("record 1", "record 9"))
    assert "--data changed since" in error()
    data.write_text(original)
    assert main([*argv, "--resume", "--eval-examples", "9"]) == 0  # 10% of 40 caps both at 4: the same split


@pytest.mark.parametrize("final_step", [2, 4])
def test_resumed_log_keeps_each_line_once(tmp_path, final_step):
    """Lines past the checkpoint go; the final evaluation at the checkpoint's step goes too (the resumed run writes
    it again), an evaluation at a checkpoint before the last step stays (the resumed run does not repeat it)."""
    from fastft.apps.training.logs import RunLog

    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 2, "eval": {"loss": 0.8}},
             {"step": 3, "loss": 0.7}]
    (tmp_path / "logs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 3, "lo')
    # the checkpoint holds the step-2 evaluation when it was periodic (the run went on to step 4), not when it was
    # the final one of a run that ended at step 2
    RunLog(str(tmp_path), True, resume_step=2, eval_steps={2} if final_step == 4 else set()).close()
    kept = [json.loads(line) for line in (tmp_path / "logs.jsonl").read_text().splitlines()]
    assert kept == (lines[:2] if final_step == 2 else lines[:3])


def test_resumed_tensorboard_purges_the_steps_past_the_checkpoint(tmp_path, monkeypatch):
    """The killed run's TensorBoard events past the checkpoint stayed beside the resumed run's: each of those steps
    showed twice. A resumed RunLog opens its writer with purge_step = the checkpoint's step + 1; a fresh start
    (--save-every 0 run again in its folder, or --resume of a run killed before its first checkpoint) purges every
    earlier event, as it empties logs.jsonl (it kept them all)."""
    import sys
    import types

    from fastft.apps.training.logs import RunLog

    opened = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            opened.append(purge_step)

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    RunLog(str(tmp_path), True).close()
    RunLog(str(tmp_path), True, resume_step=3).close()
    assert opened == [0, 4]


def test_a_finished_run_extended_keeps_the_evaluation_at_its_old_end(tiny, tmp_path, one_thread):
    """--steps 4 then --resume --steps 6 (allowed under a constant schedule): the step-4 evaluation was the first
    run's final one, which its checkpoint did not hold; metrics.json lost it while logs.jsonl kept it. Now the
    extended run has the uninterrupted run's evaluations, in both files."""
    common = ["train", "--model", str(tiny), "--batch-size", "3", "--eval-examples", "4", "--max-length", "24",
              "--eval-every", "2", "--save-every", "2", "--schedule", "constant", "--warmup-ratio", "0",
              "--dropout", "0", "--lr", "3e-3"]
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    assert main([*common, "--steps", "6", "--output-dir", str(straight)]) == 0
    assert main([*common, "--steps", "4", "--output-dir", str(extended)]) == 0
    assert main([*common, "--steps", "6", "--resume", "--output-dir", str(extended)]) == 0
    runs = []
    for out in (straight, extended):
        metrics = json.loads((out / "metrics.json").read_text())
        logged = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
        runs.append(([e["step"] for e in metrics["evals"]], [r["step"] for r in logged if "eval" in r],
                     [r["step"] for r in logged if "eval" not in r], [e["loss"] for e in metrics["evals"]]))
    assert runs[0][:3] == runs[1][:3] == ([2, 4], [2, 4, 6], [1, 2, 3, 4, 5, 6]), runs
    assert runs[1][3] == pytest.approx(runs[0][3], rel=1e-5)


def test_deterministic_runs_under_torchs_deterministic_algorithms(tiny, tmp_path, monkeypatch):
    from fastft.apps.training.objectives import ObjectiveModel
    from fastft.kernels.runtime import deterministic

    seen, forward = [], ObjectiveModel.forward
    monkeypatch.setattr(ObjectiveModel, "forward",
                        lambda self, batch: (seen.append(deterministic()), forward(self, batch))[1])
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("FASTFT_DETERMINISTIC", raising=False)
    argv = ["train", "--model", str(tiny), "--steps", "2", "--batch-size", "2", "--eval-examples", "2",
            "--max-length", "24"]
    assert main([*argv, "--output-dir", str(tmp_path / "plain")]) == 0
    assert seen and not any(seen)
    seen.clear()
    assert main([*argv, "--deterministic", "--output-dir", str(tmp_path / "deterministic")]) == 0
    assert seen and all(seen)
    assert not torch.are_deterministic_algorithms_enabled()  # the process's setting, restored
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
