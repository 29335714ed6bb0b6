"""`fastft bench methods`' defaults are the reference table's (issue 8's targets and the anchors: llama-1b,
B4×S2048, the mean of 6 timed steps after 2 warm-ups, LoRA r=16 alpha=32, 32 virtual tokens, AdamW at 1e-5, patched
model, no checkpointing, no compile), and the CLI's flags default to them."""
from fastft.apps import cli
from fastft.apps.bench.config import BenchConfig
from fastft.apps.bench.targets import LLAMA_1B

REFERENCE = dict(shape="llama-1b", model=None, seq_len=2048, batch_size=4, steps=6, warmup=2,
                 gradient_checkpointing=False, patch_model=True, dtype="auto", rank=16, alpha=32.0,
                 num_virtual_tokens=32, optimizer="adamw", lr=1e-5, seed=0, compile="off")


def test_defaults_are_the_reference_table():
    d = BenchConfig()
    assert {k: getattr(d, k) for k in REFERENCE} == REFERENCE
    assert all(getattr(d, k) == v for k, v in LLAMA_1B.items())


def test_the_cli_flags_default_to_the_config():
    parser, _ = cli._parser()
    args = parser.parse_args(["bench"])
    for name, value in REFERENCE.items():
        assert getattr(args, name) == value, name
