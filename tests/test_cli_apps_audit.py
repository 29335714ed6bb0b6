"""`fastft bench` and `fastft study` from the command line (audit round 13): '~' in paths, names of the other kind
below the study's folders, --max-length past MiniLM's positions, a misspelled bench flag, the bench plot's legend,
a resume refused over a setting no method reads, an earlier plan's study plots, a --model folder without a
tokenizer. Each test failed on the code before its fix."""
import json
from pathlib import Path

import pytest

from fastft.apps import cli

DATA = Path(__file__).parent / "data"
TINY_BENCH = ["--shape", "tiny", "--steps", "1", "--warmup", "1", "--seq-len", "8", "--batch-size", "1",
              "--methods", "ia3", "--peers", "none", "--formats", "json"]
# a study plan that runs nothing (--plan): validation only, no model is loaded
TINY_STUDY = ["--models", "minilm", "--tasks", "subj", "--methods", "lora", "--steps", "2", "--seeds", "1",
              "--regimes", "32-per-class", "--evals", "1", "--max-dev", "16", "--max-test", "32", "--batch-size", "8",
              "--max-length", "32"]


def _exit_code(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


# 1. `~` in --output-dir: fastft train expands it (training/config.py PATH_SETTINGS); bench and study write into
#    a folder literally named `~` under the current directory.
def test_bench_output_dir_tilde_is_expanded_as_train_does(tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert cli.main(["bench", *TINY_BENCH, "--output-dir", "~/benchout"]) == 0
    assert not (cwd / "~").exists(), "fastft bench wrote into ./~ instead of $HOME"
    assert (home / "benchout" / "bench_methods.json").is_file()


def test_study_output_dir_tilde_is_expanded_as_train_does(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["study", *TINY_STUDY, "--plan", "--output-dir", "~/studyout"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith(f"into {home / 'studyout'}"), first


# 2. Names of the other kind inside the study's --output-dir, below its cells/ and plots/ folders: the check before
#    any cell runs covers results.json, report.md, cells and plots only, so a plot or a cell file whose name is a
#    folder ends the study with an IsADirectoryError traceback after the work (report.md not written).
@pytest.mark.parametrize("entry", ["plots/score_vs_params.png", "plots/tasks_minilm-32-per-class.png",
                                   "cells/minilm__subj__32-per-class__lora__fastft__seed0.json"])
def test_study_refuses_a_plot_or_cell_name_taken_by_a_folder_before_running(tmp_path, capsys, entry):
    out = tmp_path / "study"
    (out / entry).mkdir(parents=True)
    assert _exit_code(["study", *TINY_STUDY, "--plan", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and entry.split("/")[-1] in err, err


# 3. --max-length above MiniLM's 512 position embeddings is accepted; every MiniLM cell of a task with long texts
#    then fails after loading ("RuntimeError: The expanded size of the tensor (874) must match ... (512)").
def test_study_refuses_max_length_beyond_minilm_positions(capsys, tmp_path):
    assert _exit_code(["study", *TINY_STUDY[:-2], "--max-length", "1024", "--plan",
                       "--output-dir", str(tmp_path / "unused")]) == 2
    assert "--max-length" in capsys.readouterr().err


# 4. A misspelled bench flag followed by its value: the error blames the optional positional `what`
#    ("argument what: invalid choice: '2'") instead of naming the unknown flag.
@pytest.mark.parametrize("argv", [["--stepz", "2"], ["--batchsize", "4", "--steps", "2"]])
def test_bench_misspelled_flag_error_names_the_flag(capsys, argv):
    assert _exit_code(["bench", "--shape", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert argv[0] in err, err


# 5. bench_methods.png: a peer with no bar anywhere (liger/unsloth rows all 'not installed' or 'unavailable') still
#    gets a legend entry, drawn in the default colour (peft's blue), so the legend shows three blue peers.
def test_bench_plot_legend_colours_are_the_implementations_colours():
    import matplotlib.colors as mc

    from fastft.apps.bench.report import COLORS, LEGEND, plot_figure

    def row(method, peer, impl, status, tps=None):
        return {"method": method, "peer": peer, "implementation": impl, "status": status, "compile": "off",
                "tokens_per_s": tps, "memory_kind": "cpu peak RSS"}
    rows = [row("lora", "fastft", "fastft", "ok", 300.0), row("lora", "peft", "peft", "ok", 320.0),
            row("lora", "liger", "peft+liger", "not installed"), row("lora", "unsloth", "unsloth", "not installed"),
            row("ia3", "fastft", "fastft", "ok", 900.0), row("ia3", "peft", "peft", "ok", 300.0),
            row("ia3", "liger", "peft+liger", "not installed"), row("ia3", "unsloth", "unsloth", "unavailable")]
    result = {"rows": rows, "config": {"model": None, "shape": "tiny", "batch_size": 2, "seq_len": 32,
                                       "dtype_resolved": "fp32"}, "environment": {"card": "cpu"}}
    legend = plot_figure(result).axes[0].get_legend()
    by_label = {v: k for k, v in LEGEND.items()}
    for text, handle in zip(legend.get_texts(), legend.legend_handles):
        impl = by_label[text.get_text()]
        assert tuple(handle.get_facecolor()) == pytest.approx(mc.to_rgba(COLORS[impl])), text.get_text()


# 6. A table whose rows read no --rank (ia3 only) is refused on a rerun at another --rank, which the same run
#    notes as "not used"; the study reruns nothing for its unused --head-lr.
def test_bench_resume_ignores_settings_no_benchmarked_method_reads():
    import torch

    from fastft.apps.bench.config import BenchConfig
    from fastft.apps.bench.methods import table_config
    from fastft.apps.bench.resume import config_differences

    cpu = torch.device("cpu")
    old = table_config(BenchConfig(shape="tiny", methods=("ia3",), peers=(), rank=8, alpha=4.0,
                                   num_virtual_tokens=4), cpu)
    new = table_config(BenchConfig(shape="tiny", methods=("ia3",), peers=()), cpu)
    assert config_differences(old, new) == []


# 7. A rerun of another plan into the same --output-dir leaves the previous plan's plots/tasks_*.png beside the new
#    report (bench removes its old plot at start; the study never does).
def test_study_report_removes_plots_of_an_earlier_plan(tmp_path):
    from fastft.apps.study.report import write_report

    results = json.loads((DATA / "study_results_tiny.json").read_text())
    other = json.loads(json.dumps(results))
    for c in other["cells"]:
        c["regime"] = "full"
        c["key"] = c["key"].replace("32-per-class", "full")
    write_report(other, tmp_path)
    write_report(results, tmp_path)
    report = (tmp_path / "report.md").read_text()
    stale = [p.name for p in (tmp_path / "plots").glob("*.png") if p.name not in report]
    assert not stale, f"plots the report does not show: {stale}"


# 8. --model: a checkpoint folder as save_pretrained writes it (config + weights, no tokenizer) passes the check
#    before the run, then every row is 'error' ("ValueError: Couldn't instantiate the backend tokenizer from one
#    of: " — cut at its first line), and the run exits 1. The bench feeds random token ids: it never needs the
#    tokenizer (shapes.build_model drops it), so either run without it or refuse the folder up front.
def test_bench_model_folder_without_tokenizer_runs_or_is_refused_up_front(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=128)).save_pretrained(tmp_path / "ckpt")
    code = _exit_code(["bench", "--model", str(tmp_path / "ckpt"), "--steps", "1", "--warmup", "1", "--seq-len", "8",
                       "--batch-size", "1", "--methods", "ia3", "--peers", "none", "--formats", "json",
                       "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0 or (code == 2 and "--model" in err and "tokenizer" in err), (code, err[-500:])
