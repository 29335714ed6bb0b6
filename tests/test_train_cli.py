"""`fastft train` end to end, shortened: real model, real data, adapter saved in peft's format."""
import json

import pytest
import torch
from peft import PeftModel

from fastft.apps.cli import main
from fastft.apps.datasets import EVAL_SIZE, load_task
from fastft.apps.models import load_causal_lm

pytestmark = pytest.mark.slow


def test_train_runs_and_saves_a_loadable_adapter(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "3", "--batch-size", "4", "--eval-examples", "8", "--max-length", "32",
                 "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_before"]["examples"] == 8 and metrics["eval_after"]["examples"] == 8
    assert metrics["tokens_per_second"] > 0 and metrics["peak_memory_gib"] > 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    model, _ = load_causal_lm()
    loaded = PeftModel.from_pretrained(model, str(out / "adapter"))
    assert any(torch.count_nonzero(p) for n, p in loaded.named_parameters() if "lora_B" in n)
    printed = capsys.readouterr().out
    assert "before: accuracy" in printed and "after:  accuracy" in printed


def test_task_splits_are_fixed_and_disjoint():
    a, b = load_task("mr", seed=0), load_task("mr", seed=0)
    assert a.eval == b.eval and len(a.eval) == EVAL_SIZE
    assert not set(t for t, _ in a.eval) & set(t for t, _ in a.train[:2000])
    assert {label for _, label in a.train} == {0, 1}


@pytest.mark.parametrize("argv,message", [
    (["train", "--steps", "0"], "--steps must be at least 1"),
    (["train", "--task", "imdb"], "invalid choice: 'imdb'"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_unknown_model_path(tmp_path, capsys):
    """A user error: one line on stderr, exit status 2, no traceback (was a FileNotFoundError)."""
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", str(tmp_path / "nope"), "--steps", "1"])
    assert info.value.code == 2
    assert "expected 'smollm2-135m' or a local checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A small random Llama with SmolLM2's real tokenizer, saved as a local checkpoint."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fastft.apps.models import smollm2_checkpoint

    path = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_qlora_training_reports_merge_costs(tiny_checkpoint, tmp_path):
    out = tmp_path / "qlora"
    assert main(["train", "--model", str(tiny_checkpoint), "--quantize", "nf4", "--steps", "2", "--batch-size", "4",
                 "--eval-examples", "8", "--max-length", "32", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["quantize"] == "nf4"
    merged = metrics["eval_merged"]
    # merging into dequantized weights is exact: the same evaluation as the trained QLoRA model
    assert merged["dense"]["loss"] == pytest.approx(metrics["eval_after"]["loss"], rel=1e-4)
    assert merged["requantized"]["examples"] == 8
    # the run's report: the evaluations as metrics.json has them, the loss curve as a PNG
    report = (out / "report.md").read_text()
    assert "| after training | " in report and "| merged (requantized) | " in report
    assert f"{metrics['eval_after']['loss']:.4g}" in report and "| method | qlora |" in report
    assert (out / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_on_every_record_form_at_once(tiny_checkpoint, tmp_path):
    """Plain text, a chat, ShareGPT, Alpaca and prompt-completion records in one file train together."""
    forms = [{"text": "The sky is blue."},
             {"messages": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}]},
             {"conversations": [{"from": "human", "value": "Grass?"}, {"from": "gpt", "value": "Green."}]},
             {"instruction": "Name the colour.", "input": "snow", "output": "White."},
             {"prompt": "The sun is", "completion": " yellow."}]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(forms[i % len(forms)]) + "\n" for i in range(40)))
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_checkpoint), "--data", str(data), "--steps", "2", "--batch-size", "5",
                 "--eval-examples", "4", "--max-length", "64", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["train_losses"]) == 2 and all(loss == loss for loss in metrics["train_losses"])
    assert metrics["eval_after"]["examples"] == 4


def test_dpo_on_conversational_pairs(tiny_checkpoint, tmp_path):
    """TRL's conversational preference records (explicit and implicit prompt in one file) train under dpo."""
    user = {"role": "user", "content": "Colour of the sky?"}
    blue, green = ({"role": "assistant", "content": c} for c in ("Blue.", "Green."))
    forms = [{"prompt": [user], "chosen": [blue], "rejected": [green]},
             {"chosen": [user, blue], "rejected": [user, green]}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(forms[i % 2]) + "\n" for i in range(20)))
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_checkpoint), "--objective", "dpo", "--data", str(data), "--steps", "2",
                 "--batch-size", "2", "--eval-examples", "2", "--max-length", "64", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_before"]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at the start
    assert "reward_accuracy" in metrics["eval_after"] and all(x == x for x in metrics["train_losses"])


def test_epochs_set_the_number_of_steps(tiny_checkpoint, tmp_path, capsys):
    """--epochs E: E passes over the training records (36 after 4 held out; 4 a step: 9 steps an epoch)."""
    from fastft.apps.training.config import ConfigError, TrainConfig, epochs_to_steps, validate

    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"Record number {i}."}) + "\n" for i in range(40)))
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_checkpoint), "--data", str(data), "--epochs", "0.5", "--batch-size",
                 "4", "--eval-examples", "4", "--max-length", "16", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["train_losses"]) == 4 and metrics["config"]["steps"] == 4
    printed = capsys.readouterr().out
    assert "--epochs 0.5: 4 steps of 4 records (9 a pass over the 36 training records)\n" in printed
    assert "note:" not in printed
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["steps"] == 40  # as given: --epochs decides
    # the run's config.yaml resumes as the same run, with no note about --steps
    assert main(["train", "--config", str(out / "config.yaml"), "--resume"]) == 0
    assert "is not used" not in capsys.readouterr().out
    main(["train", "--model", str(tiny_checkpoint), "--data", str(data), "--epochs", "0.5", "--steps", "7",
          "--batch-size", "4", "--eval-examples", "4", "--max-length", "16", "--output-dir", str(tmp_path / "b")])
    assert "; --steps 7 is not used" in capsys.readouterr().out
    assert epochs_to_steps(TrainConfig(epochs=3), 36, 8).steps == 12  # whole steps only: 4 an epoch
    assert epochs_to_steps(TrainConfig(epochs=0.01), 36, 8).steps == 1
    assert epochs_to_steps(TrainConfig(steps=7), 36, 8).steps == 7
    assert epochs_to_steps(TrainConfig(epochs=0.29), 400, 4).steps == 29  # not floor(28.999999999999996)
    # --epochs may change on --resume as --steps may (under a constant schedule): the steps it gives are compared
    from fastft.apps.training.config import to_yaml_dict
    from fastft.apps.training.resume_checks import check_resumed_settings

    constant = dict(schedule="constant", warmup_ratio=0.0)
    saved = to_yaml_dict(TrainConfig(epochs=1, steps=9, **constant))
    check_resumed_settings(TrainConfig(epochs=2, steps=18, **constant), saved, tmp_path)
    check_resumed_settings(TrainConfig(steps=8, **constant), saved, tmp_path)
    with pytest.raises(ConfigError, match="--steps 9 -> 18"):
        check_resumed_settings(TrainConfig(epochs=2, steps=18), to_yaml_dict(TrainConfig(epochs=1, steps=9)), tmp_path)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="--epochs must be"):
            validate(TrainConfig(epochs=bad))


def test_records_cut_by_max_length_are_counted(tiny_checkpoint, tmp_path, capsys):
    """A record longer than --max-length is cut silently no more: the run counts them (metrics.json, a note)."""
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": "word " * 30 if i % 2 else f"Record {i}."}) + "\n" for i in range(40)))
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_checkpoint), "--data", str(data), "--epochs", "1", "--batch-size", "4",
                 "--eval-examples", "4", "--max-length", "16", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["records_cut"] == {"cut": 18, "tokenized": 36}
    said = capsys.readouterr().out
    final = "note: 18 of the 36 training records the run tokenized were longer than --max-length 16"
    # said after the first step too, not only at the end (hours later on a real run); of the first step's records
    # (the second step's, built while the first ran, are not counted yet)
    early = "note: 2 of the 4 training records this process has tokenized so far were longer than --max-length 16"
    assert final in said and early in said and said.index(early) < said.index(final)
    # resumed: the whole run's records, not only those tokenized since (its checkpoint keeps the earlier part's)
    args = ["train", "--model", str(tiny_checkpoint), "--data", str(data), "--batch-size", "4", "--eval-examples", "4",
            "--max-length", "16", "--schedule", "constant", "--warmup-ratio", "0", "--save-every", "2",
            "--output-dir", str(tmp_path / "resumed")]
    assert main(args + ["--steps", "4"]) == 0
    assert main(args + ["--steps", "9", "--resume"]) == 0
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert resumed["resumed_from"] and resumed["records_cut"] == {"cut": 18, "tokenized": 36}


def _text_run(tiny_checkpoint, tmp_path, steps: str, save_every: str):
    """(output folder, `fastft train` argv) of a short run on 24 text records."""
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"Record {i} says something."}) + "\n" for i in range(24)))
    out = tmp_path / "run"
    return out, ["train", "--model", str(tiny_checkpoint), "--data", str(data), "--steps", steps, "--batch-size", "4",
                 "--eval-examples", "4", "--save-every", save_every, "--output-dir", str(out)]


@pytest.mark.parametrize("steps, save_every", [("2", "2"), ("3", "2")])
def test_resuming_a_finished_run_does_nothing(tiny_checkpoint, tmp_path, capsys, steps, save_every):
    """It evaluated and saved again, overwriting metrics.json with the new process's peak memory beside the first
    run's tokens/s; with --steps not a multiple of --save-every (the last checkpoint before the last step) it trained
    the last steps again too. --save-merged, which the finished run lacks, still runs its end."""
    out, args = _text_run(tiny_checkpoint, tmp_path, steps=steps, save_every=save_every)
    assert main(args) == 0
    before = (out / "metrics.json").read_bytes()
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    assert f"holds this run finished (step {steps} of {steps}, metrics.json); nothing to do" in capsys.readouterr().out
    assert (out / "metrics.json").read_bytes() == before
    assert main(args + ["--resume", "--save-merged"]) == 0
    assert (out / "merged" / "config.json").is_file() and json.loads((out / "metrics.json").read_text())["merged_model"]


def test_resume_where_no_checkpoint_was_written_yet_starts_at_step_0(tiny_checkpoint, tmp_path, capsys):
    """A requeued job killed before its first checkpoint: its folder exists (here empty), so --resume starts the run
    and says so (the README's "Resuming"); a folder that does not exist is refused (test_train_config)."""
    out, args = _text_run(tiny_checkpoint, tmp_path, steps="2", save_every="0")
    out.mkdir()
    assert main(args + ["--resume"]) == 0
    assert f"--resume: no checkpoint in {out / 'checkpoints'}; starting at step 0" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] is None


def test_a_run_stopped_while_writing_its_report_is_not_finished(tiny_checkpoint, tmp_path, monkeypatch):
    """metrics.json marks a run finished; it was written before report.md and losses.png, so a run killed between
    them resumed to "nothing to do" without its report."""
    from fastft.apps.training import report

    out, args = _text_run(tiny_checkpoint, tmp_path, steps="2", save_every="2")

    def killed(output_dir, metrics):
        raise OSError("killed while writing report.md")

    with monkeypatch.context() as patched:
        patched.setattr(report, "write_report", killed)  # loop.py imports it at the call
        assert main(args) != 0
    assert not (out / "metrics.json").exists()
    assert main(args + ["--resume"]) == 0
    assert (out / "metrics.json").is_file() and (out / "report.md").is_file()


def test_a_finished_run_without_checkpoints_is_not_overwritten(tiny_checkpoint, tmp_path, capsys):
    """--save-every 0: run again into its folder, a new run replaced adapter/ and metrics.json but left the old
    merged/ beside them; --resume found no checkpoint and trained from step 0. config.yaml holds the settings as
    given (an unset --dropout stays unset: reused with --objective dpo it was the sft default 0.05)."""
    import yaml

    out, args = _text_run(tiny_checkpoint, tmp_path, steps="1", save_every="0")
    assert main(args) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["dropout"] is None and saved["mixed_precision"] == "auto"
    before = (out / "metrics.json").read_bytes()
    for extra, refusal in (([], "holds a finished run (metrics.json) and no checkpoint of it"),
                           (["--resume", "--lr", "0.01"], "holds a finished run (metrics.json) without checkpoints, "
                                                          "written with other settings (--lr ")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main(args + extra)
        assert info.value.code == 2
        assert refusal in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0  # the same settings: the finished run stands
    said = capsys.readouterr().out
    assert "holds this run finished (metrics.json, its config.yaml's settings); nothing to do" in said
    assert (out / "metrics.json").read_bytes() == before


def test_distributed_asked_for_in_one_process_is_refused(tiny_checkpoint, tmp_path, capsys):
    """--distributed fsdp without torchrun trained one unsharded process, saying only 'distribution: NO'."""
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", str(tiny_checkpoint), "--distributed", "fsdp", "--output-dir", str(tmp_path)])
    assert info.value.code == 2
    assert "--distributed fsdp needs several processes, but this is one" in capsys.readouterr().err


def test_evaluation_flags_are_noted_when_the_data_is_too_small_to_hold_any_out(tiny_checkpoint, tmp_path, capsys):
    """9 records hold none out (10% at most): --eval-every was ignored with no note."""
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({"text": f"Record number {i}."}) + "\n" for i in range(9)))
    assert main(["train", "--model", str(tiny_checkpoint), "--data", str(data), "--steps", "1", "--batch-size", "2",
                 "--eval-every", "1", "--max-length", "16", "--output-dir", str(tmp_path / "run")]) == 0
    assert ("--eval-every (nothing is evaluated: --data holds under 10 records, too few to hold 10% out, and no "
            "--eval-data is given)") in capsys.readouterr().out
