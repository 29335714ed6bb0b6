"""The user-facing errors of the UX review: an output folder that cannot be written, module-name typos, YAML's bare
booleans for choice keys, save_adapter / get_peft_model misuse, the report commands, --offload-activations' help,
--rank above the hidden size and --data naming a directory. Each is one line naming the argument, not a
traceback; checked on argument checks and a tiny random Llama, no training run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

import fastft
from fastft.apps.cli import main
from fastft.apps.training import ConfigError, TrainConfig, validate
from fastft.apps.training.arguments import read_yaml_config
from fastft.apps.training.config import rank_problem
from fastft.apps.training.run_setup import apply_method_or_config_error
from fastft.files import output_dir_problem

from tests.train_utils import save_tiny_checkpoint

REPO = Path(__file__).parents[1]


def _tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), layers=1)


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(8)))
    return path


@pytest.fixture
def accelerator_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state()


# ----------------------------------------------------------------------------------- 1. an unwritable --output-dir

@pytest.fixture
def read_only_dir(tmp_path):
    """A folder no file can be created in: mode 0o500, or for root (whom modes do not stop) the immutable flag."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    immutable = False
    try:
        (folder / "probe").touch()
    except OSError:
        pass
    else:
        (folder / "probe").unlink()
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable:
            folder.chmod(0o700)
            pytest.skip("this process can write in a 0o500 folder (root) and `chattr +i` failed here: no folder "
                        "it cannot write in to test with")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o700)


def test_output_dir_problem_names_a_folder_that_cannot_be_written(read_only_dir, tmp_path):
    for given in (read_only_dir, read_only_dir / "run" / "sub"):
        problem = output_dir_problem(given)
        assert problem.startswith(f"--output-dir {given}: cannot create files in {read_only_dir}"), problem
    assert output_dir_problem(tmp_path / "new" / "run") is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fastft-write-test")]  # the probe is gone


@pytest.mark.parametrize("argv", [["train", "--data", "{data}"], ["study", "--quick"],
                                  ["bench", "--shape", "tiny", "--methods", "lora", "--peers", "none"]])
def test_commands_refuse_an_unwritable_output_dir_in_one_line(argv, read_only_dir, data_file, capsys):
    argv = [a.replace("{data}", str(data_file)) for a in argv] + ["--output-dir", str(read_only_dir / "out")]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--output-dir" in err[-1] and "cannot create files" in err[-1] and "Traceback" not in "".join(err)


# --------------------------------------------------------------------------------------- 2. module-name typos

@pytest.mark.parametrize("settings, flag, hint", [
    (dict(method="lora", target_modules=("q_prj",)), "--target-modules q_prj", "did you mean 'q_proj'?"),
    (dict(method="dora", target_modules=("o_prj", "vproj")), "--target-modules o_prj", "did you mean 'o_proj'?"),
    (dict(method="ia3", ia3_target_modules=("k_prj",), ia3_feedforward_modules=("k_prj",)),
     "--ia3-target-modules k_prj", "did you mean 'k_proj'?"),
    (dict(method="ia3", ia3_target_modules=("zzz",), ia3_feedforward_modules=("zzz",)),
     "--ia3-target-modules zzz", "'down_proj'"),  # no close name: the model's names are listed
    (dict(method="adapter", adapter_mlp_output_modules=("down_prj",)), "--adapter-mlp-output-modules down_prj",
     "did you mean 'down_proj'?"),
    (dict(method="adapter", adapter_placement="houlsby", adapter_attn_output_modules=("o_prj",)),
     "--adapter-attn-output-modules o_prj", "did you mean 'o_proj'?"),
])
def test_a_module_name_typo_is_a_config_error_naming_the_flag(settings, flag, hint):
    with pytest.raises(ConfigError) as info:
        apply_method_or_config_error(_tiny_llama(), TrainConfig(**settings))
    message = str(info.value)
    assert message.startswith(flag + ": matches no module of LlamaForCausalLM") and hint in message, message
    assert "\n" not in message


@pytest.mark.parametrize("settings, message", [
    (dict(method="adapter", adapter_mlp_output_modules=("mlp",)),
     "--adapter-mlp-output-modules mlp: names model.layers.0.mlp (LlamaMLP), a block of layers, not a layer; name "
     "layers inside it (its own: down_proj, gate_proj, up_proj)"),
    (dict(method="adapter", adapter_placement="houlsby", adapter_attn_output_modules=("o_proj", "down_proj")),
     "--adapter-attn-output-modules and --adapter-mlp-output-modules both name model.layers.0.mlp.down_proj"),
    (dict(method="lora", target_modules=("q_proj", "mlp")), "--target-modules mlp: names model.layers.0.mlp"),
    (dict(method="ia3", ia3_target_modules=("self_attn",), ia3_feedforward_modules=()),
     "--ia3-target-modules self_attn: names model.layers.0.self_attn (LlamaAttention)"),
])
def test_a_module_no_method_can_take_is_a_config_error(settings, message):
    """A name that matches a block of layers (`mlp`), or houlsby lists naming one module, was a traceback after the
    model loaded (the method's own ValueError); it is a one-line ConfigError naming the flag."""
    with pytest.raises(ConfigError) as info:
        apply_method_or_config_error(_tiny_llama(), TrainConfig(**settings))
    assert str(info.value).startswith(message), str(info.value)


def test_a_typo_beside_names_that_match_is_noted():
    """peft adapts the names that match and ignores the typo: the run says so (for names the user gave)."""
    notes = []
    model = apply_method_or_config_error(_tiny_llama(), TrainConfig(method="lora", target_modules=("q_prj", "v_proj")),
                                         notes.append)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert len(notes) == 1 and notes[0].startswith("note: --target-modules q_prj: matches no module")
    assert "did you mean 'q_proj'?" in notes[0]
    notes.clear()
    apply_method_or_config_error(_tiny_llama(), TrainConfig(method="lora"), notes.append)  # the default list
    assert notes == []


def test_other_method_errors_are_not_relabelled(monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError("something else")

    monkeypatch.setattr("fastft.integration.methods.apply_method", refuse)
    with pytest.raises(ValueError, match="something else") as info:
        apply_method_or_config_error(_tiny_llama(), TrainConfig())
    assert not isinstance(info.value, ConfigError)


def test_train_cli_reports_a_target_modules_typo_in_one_line(tiny_checkpoint, data_file, tmp_path, capsys,
                                                             accelerator_state):
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", str(tiny_checkpoint), "--data", str(data_file), "--eval-examples", "0",
              "--steps", "1", "--target-modules", "q_prj", "--output-dir", str(tmp_path / "run")])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fastft train: error: --target-modules q_prj: matches no module of LlamaForCausalLM (module names or dotted "
        "suffixes of them); did you mean 'q_proj'?")


# ------------------------------------------------------------------------------------ 3. YAML's bare booleans

def test_bare_yaml_words_for_choices_read_as_the_choice(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("compile: off\nmixed_precision: no\npatch_model: on\n")
    assert read_yaml_config(path) == {"compile": "off", "mixed_precision": "no", "patch_model": "on"}
    path.write_text("task: yes\n")  # no choice spelled so: say to quote it
    with pytest.raises(ConfigError, match=r"key 'task' must be one of mr, .*got the boolean True.*quote the value"):
        read_yaml_config(path)
    path.write_text("rslora: on\n")  # a boolean setting stays a boolean
    assert read_yaml_config(path) == {"rslora": True}


# --------------------------------------------------------------------------- 5. save_adapter / get_peft_model misuse

def test_save_adapter_refuses_a_model_without_adapters(tmp_path):
    with pytest.raises(TypeError, match=r"save_adapter: model is a LlamaForCausalLM, which holds no adapter.*"
                                        r"save_pretrained"):
        fastft.save_adapter(_tiny_llama(), tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_get_peft_model_names_model_when_it_is_not_a_module():
    from peft import LoraConfig

    with pytest.raises(TypeError, match=r"get_peft_model: `model` must be a torch nn.Module .*got str"):
        fastft.get_peft_model("smollm2", LoraConfig(target_modules=["q_proj"]))


# -------------------------------------------------------------------------------------------- 6. report commands

def test_training_report_runs_as_a_module_without_a_warning(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"config": {"method": "lora"}, "train_losses": [2.0, 1.0]}))
    done = subprocess.run([sys.executable, "-m", "fastft.apps.training.report", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "RuntimeWarning" not in done.stderr and "found in sys.modules" not in done.stderr, done.stderr
    assert (tmp_path / "report.md").is_file()


def test_training_report_errors_are_one_line(tmp_path, capsys):
    from fastft.apps.training import report

    for folder, why in ((tmp_path / "typo", "no such folder"), (tmp_path, "no metrics.json in it")):
        with pytest.raises(SystemExit) as info:
            report.main([str(folder)])
        assert info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"python -m fastft.apps.training.report: error: {folder}: {why}" + (
                " (not a finished fastft train run)" if folder == tmp_path else ""))


def test_bench_report_has_help_and_one_line_errors(tmp_path, capsys):
    from fastft.apps.bench import report

    with pytest.raises(SystemExit) as info:
        report.main(["--help"])
    assert info.value.code == 0 and "RESULTS.json [OUT_DIR]" in capsys.readouterr().out
    for argv in ([str(tmp_path / "bench_methods.json")], [str(tmp_path)]):
        with pytest.raises(SystemExit) as info:
            report.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"python -m fastft.apps.bench.report: error: {argv[0]}: "), err
    # valid JSON of another shape, rows without their fields, an OUT_DIR that is a file: tracebacks before
    stray, not_a_folder = tmp_path / "other.json", tmp_path / "file"
    not_a_folder.write_text("")
    base = {"config": {}, "environment": {}, "rows": [{}]}
    for payload, out, said in (([1, 2], None, "not a fastft bench results file"),
                               ({"rows": []}, None, "not a fastft bench results file"),
                               (base, None, "not a fastft bench results file (KeyError"),
                               ({**base, "rows": []}, not_a_folder, "exists and is not a folder")):
        stray.write_text(json.dumps(payload))
        with pytest.raises(SystemExit) as info:
            report.main([str(stray)] + ([str(out)] if out else []))
        assert info.value.code == 2
        assert said in capsys.readouterr().err.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------- 7. --offload-activations' help

def test_offload_activations_help_says_it_needs_gradient_checkpointing(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-offload-activations needs --gradient-checkpointing:" in text


# ---------------------------------------------------------------------------------- 8. --rank, --data a directory

def test_rank_above_the_hidden_size_is_refused():
    hidden64 = LlamaConfig(hidden_size=64)
    assert rank_problem(TrainConfig(model="m", rank=65), hidden64) == (
        "--rank 65 is larger than --model m's hidden size 64 (used by --method lora); give --rank 64 or less")
    assert rank_problem(TrainConfig(rank=64), hidden64) is None
    assert rank_problem(TrainConfig(rank=65, method="ia3"), hidden64) is None  # ia3 has no rank


def test_train_refuses_a_rank_above_the_hidden_size_before_the_weights_load(tiny_checkpoint, data_file, tmp_path,
                                                                            monkeypatch, accelerator_state):
    from transformers import AutoModelForCausalLM

    from fastft.apps.training import loop

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_load)
    cfg = TrainConfig(model=str(tiny_checkpoint), data=str(data_file), rank=100000, eval_examples=0, steps=1,
                      output_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"--rank 100000 is larger than --model .*'s hidden size 64"):
        loop.train(cfg)


def test_data_naming_a_directory_says_so(tmp_path):
    with pytest.raises(ConfigError, match=rf"^--data {tmp_path}: is a directory; give a jsonl file$"):
        validate(TrainConfig(data=str(tmp_path), output_dir=str(tmp_path / "run")))
