"""QLoRA under --distributed fsdp with a process count that does not split the NF4 weights (round 24): FSDP2 shards
an NF4 weight by whole rows and quantization blocks only, so the tiny Llama's 64-row projections cannot shard over 3
processes (nor a 7B-class model's 4096 rows over 3 or 6). fastft train loaded and quantized the model, evaluated it,
then stopped in shard_model with a ValueError traceback on every process; it now refuses the setting by name, with the
process counts that do split the weights, before any weight loads (a meta-device skeleton of --model is checked)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastft
from fastft.apps.training.config import TrainConfig
from fastft.apps.training.run_setup import nf4_fsdp_problem
from fastft.integration.nf4_sharding import unshardable_nf4_layer
from fastft.quant.nf4_tensor_ops import check_shardable
from tests.train_utils import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _llama(hidden=64, intermediate=128, heads=4, kv_heads=2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=True)


def test_the_check_names_the_weight_and_the_process_counts_that_fit():
    config = _llama()
    qlora = TrainConfig(model="tiny", method="qlora", distributed="fsdp")
    for world in (1, 2, 4, 8):
        assert nf4_fsdp_problem(qlora, config, world) is None
    problem = nf4_fsdp_problem(qlora, config, 3)
    assert problem.startswith("--method qlora --distributed fsdp with 3 processes: model.layers.0.self_attn.q_proj."
                              "weight: an NF4 weight of shape (64, 64) cannot be sharded over 3 ranks")
    assert "(of 2 to 16: 2, 4, 8, 16)" in problem and "--distributed ddp" in problem
    assert nf4_fsdp_problem(TrainConfig(model="tiny", method="qlora", distributed="ddp"), config, 3) is None
    assert nf4_fsdp_problem(TrainConfig(model="tiny", method="lora", distributed="fsdp"), config, 3) is None
    # a 7B-class shape: 4096 rows split over 2, 4, 8 and 16 processes only
    seven_b = nf4_fsdp_problem(qlora, _llama(4096, 11008, 32, 32), 6)
    assert "(4096, 4096)" in seven_b and "(of 2 to 16: 2, 4, 8, 16)" in seven_b


@pytest.mark.parametrize("world", range(2, 9))
def test_the_skeleton_check_agrees_with_shard_models_own(world):
    """The check before loading says what shard_model's check of the quantized weights (check_shardable) would."""
    from transformers import AutoModelForCausalLM

    config = _llama(hidden=96, intermediate=160, heads=4, kv_heads=2)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    torch.manual_seed(0)
    model = fastft.quantize_model(AutoModelForCausalLM.from_config(config), "nf4")
    problems = []
    for name, p in model.named_parameters():
        if isinstance(p, fastft.quant.NF4Weight):
            try:
                check_shardable(p, world, name)
            except ValueError as e:
                problems.append(str(e))
    assert unshardable_nf4_layer(skeleton, world) == (problems[0] if problems else None)


@pytest.mark.slow
def test_fastft_train_refuses_qlora_fsdp_over_three_processes_by_name(tmp_path):
    tiny = save_tiny_checkpoint(tmp_path / "tiny")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"text": "record {i} of a few words"}}\n' for i in range(20)))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
           "-m", "fastft.apps.cli", "train", "--model", str(tiny), "--data", str(data), "--method", "qlora",
           "--distributed", "fsdp", "--steps", "1", "--batch-size", "2", "--eval-examples", "2", "--rank", "4",
           "--output-dir", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "fastft train: error: --method qlora --distributed fsdp with 3 processes: " in done.stderr, \
        done.stderr[-3000:]
    assert "(of 2 to 16: 2, 4, 8, 16)" in done.stderr
    # (torchrun prints a ChildFailedError traceback of its own for workers that exit 2)
    assert "ValueError" not in done.stderr and "shard_model" not in done.stderr, done.stderr[-3000:]
    assert not (out / "config.yaml").exists()  # refused before the run wrote anything, or loaded a weight
