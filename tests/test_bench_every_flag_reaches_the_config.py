"""Every `fastft bench` methods flag reaches the BenchConfig the table is measured with: one command line sets each
field to a value other than its default (and seq-len / batch-size to values that tell them apart), and the config
holds exactly those values."""
import dataclasses

from fastft.apps import cli
from fastft.apps.bench import command as bench_command
from fastft.apps.bench.config import BenchConfig

ARGV = ["bench", "--shape", "tiny", "--model", "some/checkpoint", "--methods", "lora,dora", "--peers", "peft",
        "--seq-len", "96", "--batch-size", "3", "--steps", "5", "--warmup", "4", "--gradient-checkpointing",
        "--no-patch-model", "--dtype", "bf16", "--rank", "8", "--alpha", "12.5", "--num-virtual-tokens", "7",
        "--optimizer", "adamw-8bit", "--lr", "3e-4", "--seed", "11", "--formats", "json", "md",
        "--compile", "max-autotune", "--compile-backend", "aot_eager", "--output-dir", "elsewhere"]
EXPECTED = dict(shape="tiny", model="some/checkpoint", methods=("lora", "dora"), peers=("peft",), seq_len=96,
                batch_size=3, steps=5, warmup=4, gradient_checkpointing=True, patch_model=False, dtype="bf16", rank=8,
                alpha=12.5, num_virtual_tokens=7, optimizer="adamw-8bit", lr=3e-4, seed=11, formats=("json", "md"),
                compile="max-autotune", compile_backend="aot_eager", output_dir="elsewhere")


def test_every_flag_sets_its_field():
    assert set(EXPECTED) == {f.name for f in dataclasses.fields(BenchConfig)}
    default = BenchConfig()
    assert all(getattr(default, name) != value for name, value in EXPECTED.items())  # each value is a change
    parser, _ = cli._parser()
    cfg = bench_command.config_from_args(parser.parse_args(ARGV))
    assert dataclasses.asdict(cfg) == EXPECTED


def test_peers_none_is_fastft_alone():
    parser, _ = cli._parser()
    assert bench_command.config_from_args(parser.parse_args(["bench", "--peers", "none"])).peers == ()
