"""`fastft train --resume` on a finished run, from a docs audit: without checkpoints (--save-every 0, the default)
the run's config.yaml was compared word for word, so `./out` for `out`, `--method qlora` for `--quantize nf4` or a
new --eval-every were refused as "its config.yaml differs" (naming nothing), against the README; now compared as a
checkpoint's settings are, naming what differs, and a --save-merged it lacks is merged from its adapter. A finished
run's "a larger --steps continues it" is said only where --steps may change. A resume's metrics keep the whole run's
peak memory (a --save-merged resume trained nothing: its own peak replaced the run's). --patch-model on with an
architecture patch_model refuses stops before the model loads."""
import json
import os

import pytest
import torch

from fastft.apps.cli import main
from fastft.apps.training import loop
from tests import train_utils

tiny, one_thread = train_utils.tiny, train_utils.one_thread  # the shared fixtures

pytestmark = pytest.mark.slow  # runs training jobs


def _train(tiny, out, *extra):
    return main(["train", "--model", str(tiny), "--steps", "1", "--batch-size", "2", "--eval-examples", "2",
                 "--max-length", "24", "--output-dir", str(out), *extra])


def _refused(*argv_calls):
    """main's ConfigError exit (status 2)."""
    with pytest.raises(SystemExit) as stop:
        argv_calls[0](*argv_calls[1:])
    assert stop.value.code == 2


def test_a_finished_run_without_checkpoints_resumes_as_a_checkpointed_one_does(tiny, one_thread, tmp_path, capsys,
                                                                             monkeypatch):
    out = tmp_path / "run"
    assert _train(tiny, out, "--quantize", "nf4") == 0
    metrics = (out / "metrics.json").read_text()
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    for same in (["--quantize", "nf4", "--output-dir", "./run"],   # the folder spelled another way
                 ["--method", "qlora"],                           # the setting spelled another way
                 ["--quantize", "nf4", "--eval-every", "5"]):     # what is evaluated may change
        assert _train(tiny, out, *same, "--resume") == 0, same
        assert "holds this run finished" in capsys.readouterr().out and (out / "metrics.json").read_text() == metrics
    _refused(_train, tiny, out, "--quantize", "nf4", "--lr", "3e-3", "--resume")
    err = capsys.readouterr().err
    assert "without checkpoints, written with other settings (--lr 0.001 -> 0.003)" in err, err
    _refused(_train, tiny, out, "--quantize", "nf4", "--steps", "2", "--resume")  # nothing to continue from
    assert "(--steps 1 -> 2)" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == metrics


@pytest.mark.parametrize("method", ["qlora", "ia3"])
def test_save_merged_on_a_finished_run_without_checkpoints_merges_its_adapter(tiny, one_thread, tmp_path, capsys,
                                                                              method):
    """As the run would have merged at its end: the merged weights of a run trained with --save-merged."""
    from safetensors.torch import load_file

    assert _train(tiny, tmp_path / "at-the-end", "--method", method, "--save-merged") == 0
    out = tmp_path / "run"
    assert _train(tiny, out, "--method", method) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert _train(tiny, out, "--method", method, "--save-merged", "--resume") == 0
    assert "its adapter" in capsys.readouterr().out
    want, got = (load_file(str(folder / "merged" / "model.safetensors")) for folder in (tmp_path / "at-the-end", out))
    assert got.keys() == want.keys()
    for name, weight in want.items():
        assert torch.equal(got[name], weight), name
    assert json.loads((out / "metrics.json").read_text()) == {**metrics, "merged_model": str(out / "merged")}
    assert (out / "merged" / "tokenizer.json").is_file()
    assert _train(tiny, out, "--method", method, "--save-merged", "--resume") == 0  # merged: nothing to do now
    assert "nothing to do" in capsys.readouterr().out


def test_save_merged_on_a_finished_run_without_its_adapter_says_so(tiny, one_thread, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    assert _train(tiny, out) == 0
    shutil.rmtree(out / "adapter")
    _refused(_train, tiny, out, "--save-merged", "--resume")
    assert "without its adapter folder, so there is nothing to merge" in capsys.readouterr().err
    assert not (out / "merged").exists()


@pytest.mark.parametrize("schedule, hint", [(["--schedule", "constant", "--warmup-ratio", "0"],
                                              "a larger --steps continues it"),
                                             ([], "--steps may grow under --schedule constant --warmup-ratio 0 only")])
def test_a_finished_runs_hint_names_a_resume_that_runs(tiny, one_thread, tmp_path, capsys, schedule, hint):
    out = tmp_path / "run"
    assert _train(tiny, out, "--save-every", "1", *schedule) == 0
    capsys.readouterr()
    assert _train(tiny, out, "--save-every", "1", *schedule, "--resume") == 0
    assert f"nothing to do ({hint})" in capsys.readouterr().out
    grow = (_train, tiny, out, "--save-every", "1", *schedule, "--resume", "--steps", "2")
    if schedule:
        assert grow[0](*grow[1:]) == 0
    else:
        _refused(*grow)


def test_a_save_merged_resume_keeps_the_runs_peak_memory(tiny, one_thread, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(loop, "peak_memory_gib", lambda device: 2.0)  # the training process
    assert _train(tiny, out, "--save-every", "1") == 0
    monkeypatch.setattr(loop, "peak_memory_gib", lambda device: 1.0)  # a process that trains no step
    assert _train(tiny, out, "--save-every", "1", "--save-merged", "--resume") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["merged_model"] and metrics["peak_memory_gib"] == 2.0
    assert "peak memory 2" in (out / "report.md").read_text()


def test_patch_model_on_an_architecture_it_refuses_stops_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from tests.train_utils import smollm2_tokenizer_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_path())
    OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                             num_attention_heads=4, word_embed_proj_dim=32)).save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(loop, "load_models", lambda *a: (str(tmp_path / "opt"), tokenizer, no_load, no_load))
    _refused(main, ["train", "--model", str(tmp_path / "opt"), "--patch-model", "on", "--target-modules", "q_proj",
                    "--steps", "1", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "--patch-model on: fastft.patch_model: architecture 'opt' is not supported" in err, err
    assert not os.path.exists(tmp_path / "run" / "config.yaml")
