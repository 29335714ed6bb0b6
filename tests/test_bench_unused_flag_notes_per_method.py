"""`fastft bench` notes a flag only when no benchmarked method reads it: --rank and --alpha are read by
lora/qlora/dora, --num-virtual-tokens by prefix/prompt; a prompt-learning table notes --rank and --alpha, a LoRA
table notes --num-virtual-tokens, and a table holding both kinds notes none; --compile-backend is noted without
--compile (it was ignored silently)."""
import pytest

from fastft.apps import cli
from fastft.apps.bench import command as bench_command

KNOBS = ["--rank", "8", "--alpha", "3", "--num-virtual-tokens", "4"]


def _noted(methods):
    argv = ["bench", "--methods", methods, *KNOBS]
    parser, _ = cli._parser()
    args = parser.parse_args(argv)
    notes = bench_command._unused_flags(args, argv, bench_command.config_from_args(args))
    return sorted(note.split()[1] for note in notes)


@pytest.mark.parametrize("methods, noted", [
    ("prefix", ["--alpha", "--rank"]),
    ("prompt,ia3", ["--alpha", "--rank"]),
    ("lora", ["--num-virtual-tokens"]),
    ("dora,qlora", ["--num-virtual-tokens"]),
    ("lora,prefix", []),
    ("full", ["--alpha", "--num-virtual-tokens", "--rank"]),
])
def test_each_knob_is_noted_by_the_methods_that_read_it(methods, noted):
    assert _noted(methods) == noted


def test_a_compile_backend_without_compile_is_noted():
    argv = ["bench", "--shape", "tiny", "--compile-backend", "eager"]
    parser, _ = cli._parser()
    args = parser.parse_args(argv)
    assert bench_command._unused_flags(args, argv, bench_command.config_from_args(args)) == [
        "note: --compile-backend is not used (--compile is off: nothing is compiled)"]
    argv += ["--compile", "default"]
    args = parser.parse_args(argv)
    assert bench_command._unused_flags(args, argv, bench_command.config_from_args(args)) == []
