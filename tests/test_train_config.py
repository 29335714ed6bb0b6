"""`fastft train`'s settings: flags, YAML files, validation before anything loads, one-line errors."""
import math

import pytest
import torch
import yaml

from fastft.apps.cli import main
from fastft.apps.training import arguments, config as config_module
from fastft.apps.training.config import FIELDS, TrainConfig, flag


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if anything gets as far as loading a model or tokenizer."""
    import fastft.apps.training.loop as loop

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were validated")
    monkeypatch.setattr(loop, "load_models", refuse)
    monkeypatch.setattr(loop, "make_accelerator", refuse)


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.parametrize("argv,message", [
    (["--dropout", "1.5"], "--dropout must be a probability in [0, 1), got 1.5"),
    (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
    (["--lr", "-1e-3"], "--lr must be a positive number, got -0.001"),  # argparse took it for a flag
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1, got 0"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--max-length", "4"], "--max-length must be at least 8"),
    (["--model", "nonexistent"], "--model 'nonexistent': expected 'smollm2-135m' or a local checkpoint"),
    (["--data", "/no/such.jsonl"], "--data /no/such.jsonl: file not found"),
    (["--objective", "distill"], "--objective distill needs --teacher"),
    (["--teacher", "smollm2-135m"], "--teacher is only used by --objective distill"),
    (["--objective", "dpo", "--method", "full"], "it needs an adapter method, not --method full"),
    (["--quantize", "nf4", "--method", "full"], "--quantize nf4 is QLoRA"),
    (["--offload-activations"], "--offload-activations needs --gradient-checkpointing"),
    (["--resume", "--output-dir", "/no/such/run"], "nothing to resume"),
    (["--seed", "-1"], "--seed must be in [0, 2**32 - 1]"),
    (["--output-dir", "/etc/hostname"], "--output-dir /etc/hostname: exists and is not a folder"),
    (["--seed", str(2**32)], "--seed must be in [0, 2**32 - 1]"),
    (["--method", "full", "--dtype", "fp16"], "--method full with --dtype fp16 trains fp16 weights"),
    # inf passed the range checks: a traceback (--alpha) or "the loss is nan ... try a lower --lr" after loading
    (["--alpha", "inf"], "--alpha must be a finite number, got inf"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (["--loraplus-lr-ratio", "inf"], "--loraplus-lr-ratio must be a finite number"),
    (["--objective", "dpo", "--dpo-beta", "inf"], "--dpo-beta must be a finite number"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--ce-weight", "inf"], "--ce-weight must be a finite number"),
    (["--data", ""], "--data is an empty path; give a jsonl file"),
    # AdamW's fp32 step overflowed: "RuntimeError: value cannot be converted to type float without overflow"
    (["--lr", "1e39"], "--lr 1e+39 is above 1e+06, far past any learning rate that trains"),
    (["--lr", "1e5", "--loraplus-lr-ratio", "16"], "--lr 100000 times --loraplus-lr-ratio 16 is above 1e+06"),
    (["--config", ""], "--config .: file not found"),
    # was "matches no module ... they end in [... 'q_proj', 'v_proj' ...]": the very names meant
    (["--target-modules", "q_proj,v_proj"], "--target-modules 'q_proj,v_proj': module names are separated by "
                                            "spaces, not commas: --target-modules q_proj v_proj"),
    pytest.param(["--mixed-precision", "fp16"], "--mixed-precision fp16 needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast runs on a GPU")),
])
def test_bad_settings_fail_in_one_line_before_loading(argv, message, capsys, no_model_loads):
    assert message in _error(["train", *argv], capsys)


def test_malformed_jsonl_names_file_and_line(tmp_path, capsys, no_model_loads):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"messages": [{"role": "user", "content": "q"}]}\n')
    assert f"{data}:4: 'messages' has no assistant turn" in _error(["train", "--data", str(data)], capsys)
    data.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert f"{data}:2: not valid JSON" in _error(["train", "--data", str(data)], capsys)
    data.write_text('{"prompt": "p", "chosen": "a"}\n')
    assert f"{data}:1: a dpo record needs" in _error(["train", "--objective", "dpo", "--data", str(data)], capsys)


def test_yaml_config_flags_override_and_unknown_keys(tmp_path, capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr("fastft.apps.training.train", lambda cfg: seen.setdefault("cfg", cfg))
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"save_every": 10, "lr": 0.002, "target_modules": ["q_proj"], "rslora": True,
                                   "grad-accum": 3}))
    assert main(["train", "--config", str(run), "--lr", "0.005"]) == 0
    cfg = seen["cfg"]
    assert (cfg.save_every, cfg.lr, cfg.target_modules, cfg.rslora, cfg.grad_accum) == (10, 0.005, ("q_proj",), True, 3)
    seen.clear()
    assert main(["train", "--config", str(run), "--no-rslora"]) == 0 and seen["cfg"].rslora is False

    run.write_text("save_evry: 10\n")
    assert "unknown key 'save_evry' (keys are `fastft train` flag names with underscores; did you mean save_every?)" \
        in _error(["train", "--config", str(run)], capsys)
    run.write_text("save-every: 1\nsave_every: 0\n")
    assert "key 'save_every' is given twice" in _error(["train", "--config", str(run)], capsys)
    run.write_text("? [a, b]\n: 1\n")  # an unhashable key: PyYAML's own error, not a TypeError traceback
    assert "not valid YAML" in _error(["train", "--config", str(run)], capsys)
    run.write_text("lr: 1e-4\nrank: 8\nlr: 3e-4\n")  # the same spelling twice: PyYAML kept the last one silently
    assert "--config " + str(run) + ": key 'lr' is given twice (again at line 3); keep one" in \
        _error(["train", "--config", str(run)], capsys)
    for lone in ("0", "false", "[]", "''"):  # not an empty file: was read as no settings
        run.write_text(lone + "\n")
        assert "expected a mapping of settings" in _error(["train", "--config", str(run)], capsys), lone
    run.write_text("target_modules: {q_proj: 1}\n")  # a mapping's keys were taken as the module list
    assert "key 'target_modules' must be" in _error(["train", "--config", str(run)], capsys)
    run.write_text("steps: many\n")
    assert "key 'steps' must be int, got 'many'" in _error(["train", "--config", str(run)], capsys)
    run.write_text("dropout: 1.5\n")
    assert "--dropout must be a probability" in _error(["train", "--config", str(run)], capsys)
    run.write_text("lr: abc\n")
    assert "key 'lr' must be float, got 'abc'" in _error(["train", "--config", str(run)], capsys)
    run.write_text("lr: 2e-4\nsteps: 7\n")  # YAML 1.1 reads 2e-4 (no dot) as a string
    seen.clear()
    assert main(["train", "--config", str(run)]) == 0 and seen["cfg"].lr == 2e-4
    seen.clear()  # a flag value spelled like the subcommand is still a value
    assert main(["train", "--config", str(run), "--output-dir", "train"]) == 0
    assert (seen["cfg"].output_dir, seen["cfg"].steps) == ("train", 7)


def test_saved_config_reads_back_as_the_same_config(tmp_path):
    values = arguments.read_yaml_config(_write(tmp_path / "c.yaml", config_module.to_yaml_dict(TrainConfig())))
    assert TrainConfig(**values) == TrainConfig()


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_version_and_help_show_every_default(capsys, monkeypatch):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("fastft 0.")
    monkeypatch.setenv("COLUMNS", "10000")
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    entries, current = {}, None
    for line in out.splitlines():
        if line.startswith("  --"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += line
        else:
            current = None
    for name in FIELDS:
        assert "(default:" in entries[flag(name)], name
    for method in ("lora", "qlora", "dora", "prefix", "prompt", "ia3", "adapter", "full"):
        assert method in out
    assert "--num-virtual-tokens" in out and "--adapter-placement" in out


def test_readme_head_dim_range_agrees_with_the_op():
    from pathlib import Path

    import torch

    from fastft.ops.attention import MAX_HEAD_DIM, flash_attention
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"head_dim a multiple of 8 from 16 to {MAX_HEAD_DIM}" in readme and "multiple of 8 up to" not in readme
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="head_dim must be a multiple of 8 in \\[16"):
        flash_attention(q, q, q)


@pytest.mark.parametrize("steps,ratio,schedule", [(10, 0.5, "cosine"), (10, 0.5, "linear"), (10, 1.0, "cosine"),
                                                  (40, 0.1, "cosine"), (100, 0.29, "linear"), (10, 0.3, "cosine"),
                                                  (5, 0.0, "constant")])
def test_lr_schedule_warms_up_to_the_peak_then_decays(steps, ratio, schedule):
    from fastft.apps.training.loop import lr_factor

    factor = lr_factor(TrainConfig(steps=steps, warmup_ratio=ratio, schedule=schedule))
    values = [factor(s) for s in range(steps)]
    warm = max(1, round(steps * ratio))  # 29 warm-up steps for 100 x 0.29, 3 for 10 x 0.3
    assert values[:warm] == pytest.approx([(s + 1) / warm for s in range(warm)])  # linear, the last at the peak
    assert max(values) == pytest.approx(1.0)
    decay = values[warm - 1:]
    assert all(a >= b for a, b in zip(decay, decay[1:])) and values[-1] > 0  # the last step still trains
    if schedule == "constant":
        assert decay == pytest.approx([1.0] * len(decay))
    elif len(decay) > 1:
        p = 1 / (steps - warm + 1)  # the first step after the peak
        assert decay[1] == pytest.approx(1 - p if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * p)))


def test_settings_the_run_does_not_read_are_named():
    from fastft.apps.training.config import unused_settings

    assert unused_settings(TrainConfig()) is None
    assert unused_settings(TrainConfig(method="ia3", ia3_target_modules=("q_proj",))) is None
    note = unused_settings(TrainConfig(method="adapter", dropout=0.5, rank=2, num_virtual_tokens=2, dpo_beta=5.0,
                                       temperature=3.0, data="d.jsonl", task="trec"))
    assert note.startswith("note: not used by --method adapter --objective sft: --rank (read by --method "
                           "lora/qlora/dora)")
    for name in ("--dropout", "--num-virtual-tokens (read by --method prefix/prompt)", "--dpo-beta (read by "
                 "--objective dpo)", "--temperature (read by --objective distill)", "--task (built-in data"):
        assert name in note
    # pfeiffer adapters read the MLP modules only: the attention list was dropped unannounced
    note = unused_settings(TrainConfig(method="adapter", adapter_attn_output_modules=("self_attn.dense",)))
    assert note.endswith("--adapter-attn-output-modules (read by --adapter-placement houlsby)"), note
    assert unused_settings(TrainConfig(method="adapter", adapter_placement="houlsby",
                                       adapter_attn_output_modules=("self_attn.dense",))) is None


def test_compile_and_evaluation_settings_nothing_reads_are_named():
    """--compile-backend without --compile, and --eval-every / --eval-batch-size when nothing is evaluated
    (--eval-examples 0, or a --data too small to hold 10% out), were accepted and ignored with no note."""
    from fastft.apps.training.config import unused_settings

    note = unused_settings(TrainConfig(compile_backend="eager"))
    assert note.endswith(": --compile-backend (read by --compile, which is off)"), note
    assert unused_settings(TrainConfig(compile="default", compile_backend="eager")) is None
    note = unused_settings(TrainConfig(eval_examples=0, eval_every=5, eval_batch_size=4))
    assert note.endswith(": --eval-every (nothing is evaluated: --eval-examples 0), --eval-batch-size (nothing is "
                         "evaluated: --eval-examples 0)"), note
    note = unused_settings(TrainConfig(data="d.jsonl", eval_every=5), eval_records=0)
    assert note.endswith(": --eval-every (nothing is evaluated: --data holds under 10 records, too few to hold 10% "
                         "out, and no --eval-data is given)"), note
    assert unused_settings(TrainConfig(data="d.jsonl", eval_every=5), eval_records=3) is None
    assert unused_settings(TrainConfig(eval_examples=0)) is None


def test_batch_size_help_says_dpo_counts_pairs():
    """Under --objective dpo a batch holds pairs (2 documents each); the help said "documents" only."""
    from fastft.apps.training.config import HELP

    for name in ("batch_size", "eval_batch_size"):
        assert "under --objective dpo, preference pairs (2 documents each" in HELP[name]


def test_ia3_module_lists_are_checked_under_ia3_only():
    """One YAML file may hold an IA3 run's knobs: a LoRA run with them was refused ("--ia3-feedforward-modules
    down_proj: not among --ia3-target-modules q_proj"); it notes them as unused."""
    from fastft.apps.training.config import ConfigError, unused_settings, validate

    ia3_knobs = dict(ia3_target_modules=("q_proj",), ia3_feedforward_modules=("up_proj",))
    cfg = validate(TrainConfig(method="lora", **ia3_knobs))
    assert "--ia3-target-modules (read by --method ia3)" in unused_settings(cfg)
    with pytest.raises(ConfigError, match="--ia3-feedforward-modules up_proj: not among --ia3-target-modules q_proj"):
        validate(TrainConfig(method="ia3", **ia3_knobs))


def test_dropout_defaults_to_0_under_dpo_as_trl():
    """TRL's DPOTrainer disables dropout: the policy's log-probs differ from the reference's by the adapters alone.
    Unset, --dropout is 0.05 (0 under dpo); a value given is kept; an ia3 run gets no note for the unset default."""
    from fastft.apps.training.config import unused_settings, validate

    assert validate(TrainConfig()).dropout == 0.05
    assert validate(TrainConfig(objective="dpo", task="mr")).dropout == 0.0
    assert validate(TrainConfig(objective="dpo", task="mr", dropout=0.1)).dropout == 0.1
    for objective in ("sft", "dpo"):
        assert unused_settings(validate(TrainConfig(method="ia3", objective=objective, task="mr"))) is None
    assert "--dropout" in unused_settings(validate(TrainConfig(method="ia3", dropout=0.2)))


def test_max_length_past_the_models_positions():
    """Learned position embeddings have no row past their limit: an IndexError at the first long batch (hours in);
    refused before the weights load. Rotary positions extrapolate: a warning. Virtual tokens count."""
    from transformers import GPT2Config, LlamaConfig

    from fastft.apps.training.config import length_problem

    gpt2, llama = GPT2Config(n_positions=32), LlamaConfig(max_position_embeddings=32)
    assert length_problem(TrainConfig(max_length=32), gpt2) == (None, None)
    error, warning = length_problem(TrainConfig(max_length=128, method="full"), gpt2)
    assert warning is None and error.startswith("--max-length 128 is more than --model smollm2-135m's 32 positions")
    assert error.endswith("give --max-length 32 or less")
    error, _ = length_problem(TrainConfig(max_length=30, method="prompt", num_virtual_tokens=8), gpt2)
    assert "--max-length 30 + --num-virtual-tokens 8" in error and error.endswith("give --max-length 24 or less")
    assert length_problem(TrainConfig(max_length=30, method="lora", num_virtual_tokens=8), gpt2) == (None, None)
    error, warning = length_problem(TrainConfig(max_length=64), llama)
    assert error is None and warning.startswith("warning: --max-length 64 is more than")


def test_max_length_past_a_rotary_table_is_refused():
    """GPT-J and CodeGen look sin/cos up in a table of n_positions rows built once (rotary, but no extrapolation):
    past it the first long batch raised an IndexError after a warning. Refused as learned positions are."""
    import torch
    from transformers import CodeGenConfig, CodeGenForCausalLM, GPTJConfig, GPTJForCausalLM

    from fastft.apps.training.config import length_problem

    for config, model_cls in ((GPTJConfig(n_positions=64, n_embd=32, n_layer=1, n_head=4, rotary_dim=4,
                                          vocab_size=128), GPTJForCausalLM),
                              (CodeGenConfig(n_positions=64, n_ctx=64, n_embd=32, n_layer=1, n_head=4, rotary_dim=4,
                                             vocab_size=128), CodeGenForCausalLM)):
        with pytest.raises((IndexError, RuntimeError)):  # what the warning let through (RuntimeError: 5.17)
            model_cls(config)(torch.zeros(1, 96, dtype=torch.long))
        error, warning = length_problem(TrainConfig(max_length=96), config)
        assert warning is None and "its rotary table has no row for position 64" in error
        assert length_problem(TrainConfig(max_length=64), config) == (None, None)
