"""Items the last audits left: a list flag given twice (argparse kept the last list, dropping the first's values),
memory cells of tiny CPU rows (0.00 GiB), the bench table's learning rate and seed, and a folder named README.md
in an adapter folder (the save replaced it by peft's model card)."""
import pytest
import torch

import fastft
from fastft.apps import cli
from fastft.apps.bench import report
from fastft.apps.bench.config import BenchConfig
from fastft.apps.bench.harness import fmt_gib


@pytest.mark.parametrize("argv, flag", [
    (["bench", "--methods", "lora", "--methods", "qlora"], "--methods"),
    (["bench", "--peers", "peft", "--peers=liger"], "--peers"),
    (["bench", "--formats", "json", "--formats", "md"], "--formats"),
    (["study", "--tasks", "subj", "--tasks", "mr"], "--tasks"),
    (["study", "--methods", "lora", "--methods", "full"], "--methods"),
    (["study", "--lr", "lora=1e-4", "--lr", "full=1e-5"], "--lr"),
    (["train", "--target-modules", "q_proj", "--target-modules", "v_proj"], "--target-modules"),
])
def test_a_list_flag_given_twice_is_refused_naming_it(argv, flag, capsys):
    # --steps 0 as well: where the twice is not refused, the run stops at that (no model is loaded), and the
    # message tells which
    with pytest.raises(SystemExit) as stop:
        cli.main(argv + ["--steps", "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"fastft {argv[0]}: error: argument {flag}: given twice") and err.endswith(flag)


def test_a_list_flag_once_keeps_all_its_values():
    parser, _ = cli._parser()
    args = parser.parse_args(["bench", "--methods", "lora", "qlora", "--peers", "peft,liger"])
    assert args.methods == ["lora", "qlora"] and args.peers == ["peft,liger"]
    args = parser.parse_args(["train", "--target-modules", "q_proj", "v_proj"])
    assert args.target_modules == ["q_proj", "v_proj"]
    again = parser.parse_args(["train"])   # the default list itself, not an earlier parse's values
    assert again.target_modules == parser.parse_args(["train"]).target_modules


@pytest.mark.parametrize("value, cell", [(0.0043, "0.0043"), (0.000126, "0.00013"), (0.0, "0.00"), (0.01, "0.01"),
                                         (1.234, "1.23"), (15.0, "15.00"), (None, "—")])
def test_memory_cells_show_tiny_rows(value, cell):
    assert fmt_gib(value) == cell


def _result(**config):
    row = {"method": "lora", "implementation": "fastft", "peer": "fastft", "status": "ok", "tokens_per_s": 900.0,
           "step_ms": 8.0, "peak_gib": 0.0031, "trainable_params": 10, "memory_kind": "cpu peak RSS"}
    cfg = dict(vars(BenchConfig(shape="tiny")), dtype_resolved="fp32", **config)
    return {"environment": {"card": "cpu", "versions": {}}, "rows": [row], "config": cfg}


def test_the_bench_table_says_its_learning_rate_and_seed():
    text = report.markdown(_result(lr=3e-4, seed=7))
    assert "optimizer adamw for every row (lr 0.0003, seed 7)." in text
    assert "| 0.0031 |" in text
    old = _result()
    del old["config"]["lr"], old["config"]["seed"]   # a results file written before they were recorded
    assert "optimizer adamw for every row." in report.markdown(old)


def _lora_model():
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    return fastft.get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))


def test_a_folder_named_readme_in_an_adapter_folder_is_not_replaced(tmp_path):
    model = _lora_model()
    (tmp_path / "README.md").mkdir()
    (tmp_path / "README.md" / "notes.txt").write_text("mine")
    with pytest.raises(IsADirectoryError, match="README.md is not a file"):
        fastft.save_adapter(model, tmp_path)
    assert (tmp_path / "README.md" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "adapter_config.json").exists()
    (tmp_path / "README.md" / "notes.txt").unlink()
    (tmp_path / "README.md").rmdir()
    (tmp_path / "README.md").write_text("my card\n")   # a card file is kept and updated, as peft does
    fastft.save_adapter(model, tmp_path)
    assert "my card" in (tmp_path / "README.md").read_text()
    assert (tmp_path / "adapter_config.json").is_file()
