"""QLoRA under --distributed fsdp with a process count that does not split the NF4 weights' rows evenly (round 24):
FSDP2 cuts dim 0 into ceil(rows/world)-row shards (the last shorter or empty) and pads them for the all-gather; NF4
weights now shard that way too (fastft/quant/nf4_tensor_ops.py), so the tiny Llama's 64-row projections over 3
processes, and a 7B-class model's 4096 rows over 3 or 6, train. Refused, by name and before any weight loads (a
meta-device skeleton of --model is checked), is only a count whose shards would cut through a quantization block.
Three processes training uneven NF4 shards: tests/test_nf4_uneven_shards.py (forward bit for bit, gradients, state
dicts); `fastft train --method qlora --distributed fsdp` end to end: tests/test_train_distributed.py."""
import pytest
import torch

import fastft
from fastft.apps.training.config import TrainConfig
from fastft.apps.training.run_setup import nf4_fsdp_problem
from fastft.integration.nf4_sharding import unshardable_nf4_layer
from fastft.quant.nf4_tensor_ops import check_shardable


def _llama(hidden=64, intermediate=128, heads=4, kv_heads=2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=True)


def test_uneven_counts_pass_and_a_cut_through_a_block_is_refused_by_name():
    qlora = TrainConfig(model="tiny", method="qlora", distributed="fsdp")
    for world in range(1, 9):  # 64 columns: any ceil(rows/world) rows hold whole 64-value blocks
        assert nf4_fsdp_problem(qlora, _llama(), world) is None
    for world in (3, 6, 7):  # a 7B-class shape: 4096 rows over 3 or 6 processes (1366 / 683 rows a shard)
        assert nf4_fsdp_problem(qlora, _llama(4096, 11008, 32, 32), world) is None
    # 96 columns: a shard needs an even number of rows; the 160-row gate_proj over 6 is 27 a shard (40.5 blocks)
    problem = nf4_fsdp_problem(qlora, _llama(96, 160), 6)
    assert problem.startswith("--method qlora --distributed fsdp with 6 processes: model.layers.0.mlp.gate_proj."
                              "weight: an NF4 weight of shape (160, 96) cannot be sharded over 6 ranks: a shard of 27 "
                              "rows (ceil(160/6)) holds 2592 values"), problem
    assert "cut through a quantization block" in problem
    assert "(of 2 to 16: 2, 3, 4, 5, 8, 12)" in problem and "--distributed ddp" in problem
    assert nf4_fsdp_problem(TrainConfig(model="tiny", method="qlora", distributed="ddp"), _llama(96, 160), 6) is None
    assert nf4_fsdp_problem(TrainConfig(model="tiny", method="lora", distributed="fsdp"), _llama(96, 160), 6) is None


@pytest.mark.parametrize("world", range(2, 9))
def test_the_skeleton_check_agrees_with_shard_models_own(world):
    """The check before loading says what shard_model's check of the quantized weights (check_shardable) would."""
    from transformers import AutoModelForCausalLM

    config = _llama(hidden=96, intermediate=160, heads=4, kv_heads=2)  # refused over 6 and 7, fits 2 – 5 and 8
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
    assert bool(problems) == (world in (6, 7))
    assert unshardable_nf4_layer(skeleton, world) == (problems[0] if problems else None)
