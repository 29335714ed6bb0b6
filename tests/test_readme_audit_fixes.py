"""What the README audit of 2026-12-05 found (docs/cpu-results.md, "README audit"): every `fastft train` and
`fastft bench` flag and every FASTFT_* variable fastft reads is in the README; the CLI's help and errors print
nothing but themselves; fastft.load_adapter raises no warning the user cannot act on. No training run."""
import argparse
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

import fastft
from fastft.apps.cli import _parser

REPO = Path(__file__).parents[1]
README = (REPO / "README.md").read_text()


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    """The parser's long options, without the --no-X negations of boolean flags (documented with the flag)."""
    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    return [f for f in flags if not (f.startswith("--no-") and "--" + f[5:] in flags)]


def _subcommand(name: str) -> argparse.ArgumentParser:
    parser, _ = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", ["train", "bench"])
def test_every_flag_is_in_the_readme(command):
    """The README lists `fastft train`'s and `fastft bench`'s knobs (`--eval-data` and `--dpo-beta` were missing);
    `fastft study` points to its --help instead."""
    missing = [f for f in _flags(_subcommand(command))
               if f != "--version" and not re.search(re.escape(f) + r"(?![\w-])", README)]
    assert not missing, f"fastft {command} flags the README does not mention: {missing}"


def test_every_environment_variable_fastft_reads_is_in_the_readme():
    """FASTFT_CACHE, FASTFT_AUTOTUNE and FASTFT_DEBUG were read by the package and named nowhere in the README."""
    read = set()
    for path in (REPO / "fastft").rglob("*.py"):
        text = path.read_text()
        read |= set(re.findall(r"environ(?:\.get)?[\[(]\s*\"(FASTFT_\w+)\"", text))
        read |= set(re.findall(r"^ENV = \"(FASTFT_\w+)\"", text, re.M))
    assert {"FASTFT_LORA_BACKEND", "FASTFT_CACHE"} <= read  # the scan finds both spellings
    assert not sorted(v for v in read if v not in README)


@pytest.mark.parametrize("argv", [["train", "--help"], ["train", "--rank", "0"]])
def test_the_cli_prints_nothing_but_its_help_or_its_error(argv):
    """bitsandbytes (imported through peft) logged "Failed to load CPU gemm_4bit_forward from kernels-community ...
    pip install kernels" above every help text and one-line error on AVX512-BF16 CPUs without `kernels`."""
    done = subprocess.run([sys.executable, "-m", "fastft.apps.cli", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    if argv[-1] == "--help":
        assert done.returncode == 0 and done.stderr == "" and done.stdout.startswith("usage: fastft")
    else:
        assert done.returncode == 2 and done.stderr == "fastft train: error: --rank must be at least 1, got 0\n"


def _tiny():
    torch_config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(torch_config)


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_load_adapter_raises_no_deprecation_warning_of_peft(tmp_path, method):
    """peft's PeftModel reads transformers' deprecated `is_gradient_checkpointing`: fastft's get_peft_model hid the
    FutureWarning, but load_adapter (LoRA, IA3, prompt learning) showed it."""
    fastft.save_adapter(fastft.apply_method(_tiny(), method), tmp_path / method)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        fastft.load_adapter(_tiny(), tmp_path / method)
        fastft.load_adapter(_tiny(), tmp_path / method, is_trainable=True)


def test_a_compiled_fused_loss_raises_no_lru_cache_warning_of_dynamo():
    """`fastft train --compile default` printed dynamo's "Dynamo detected a call to a `functools.lru_cache`-wrapped
    function at 'shared.py:96' ... Silent incorrectness is only a *potential* risk": the fused loss asked an
    lru_cache'd helper for accelerate's hook class on every lm_head, hooked or not. In a fresh process, as dynamo
    warns once per process."""
    code = """
import warnings, torch
from fastft.ops import lm_head_cross_entropy
head = torch.nn.Linear(16, 32, bias=False)
loss = torch.compile(lambda h, y: lm_head_cross_entropy(h, head, y), backend="eager", fullgraph=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loss(torch.randn(8, 16), torch.randint(0, 32, (8,))).item()
print([str(w.message)[:80] for w in caught if "lru_cache" in str(w.message)])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_apply_method_with_peft_raises_no_deprecation_warning_of_peft(method):
    """`fastft study`'s peft anchors (apply_method(..., implementation="peft")) printed the same FutureWarning
    under the study's progress (`fastft study --quick`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        fastft.apply_method(_tiny(), method, implementation="peft")


@pytest.mark.parametrize("argv, error", [
    (["study", "--tasks", "foo"], "fastft study: error: argument --tasks: invalid choice: 'foo'"),
    (["study", "--seeds", "0", "--plan"], "fastft study: error: --seeds must be at least 1, got 0"),
    (["bench", "--shape", "huge"], "fastft bench: error: argument --shape: invalid choice: 'huge'"),
])
def test_study_and_bench_argument_errors_are_two_lines(argv, error, capsys):
    """As `fastft train`'s: a one-line usage, then the error; argparse printed study's and bench's whole synopsis
    (eight and twelve lines of every flag) above it."""
    from fastft.apps.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert info.value.code == 2 and len(lines) == 2
    assert lines[0].startswith(f"usage: fastft {argv[0]} ") and "--help" in lines[0] and lines[1].startswith(error)
