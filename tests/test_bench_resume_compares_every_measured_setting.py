"""A resumed `fastft bench` table is refused when any setting that changes what is measured differs (steps,
warm-up, batch size, dtype, ...): only where the files go (--output-dir) and which are written (--formats) may
change between the killed run and its resume, and the compile backend where nothing is compiled (--compile off)."""
import dataclasses

import torch

from fastft.apps.bench.config import BenchConfig
from fastft.apps.bench.methods import table_config
from fastft.apps.bench.resume import config_differences

CHANGED = dict(shape="tiny", model="some/checkpoint", methods=("lora",), peers=(), seq_len=64, batch_size=2, steps=3,
               warmup=1, gradient_checkpointing=True, patch_model=False, dtype="fp32", rank=8, alpha=16.0,
               num_virtual_tokens=8, optimizer="sgd", lr=1e-3, seed=1, output_dir="elsewhere", formats=("json",),
               compile="reduce-overhead", compile_backend="eager")


def test_every_setting_but_where_and_how_the_files_are_written_is_compared():
    cpu = torch.device("cpu")
    compiled = BenchConfig(compile="default")   # the backend is compared where something is compiled
    base = table_config(compiled, cpu)
    fields = [f.name for f in dataclasses.fields(BenchConfig)]
    assert set(fields) == set(CHANGED), "a new BenchConfig field: add it here"
    for name in fields:
        other = table_config(dataclasses.replace(compiled, **{name: CHANGED[name]}), cpu)
        named = [d.split(":")[0] for d in config_differences(base, other)]
        if name in ("output_dir", "formats"):
            assert named == [], name
        else:
            assert name in named, name


def test_the_compile_backend_is_not_compared_when_nothing_is_compiled():
    """--compile off --compile-backend eager ran the same eager rows as inductor's, yet refused their resume."""
    cpu = torch.device("cpu")
    eager = table_config(BenchConfig(), cpu)
    assert config_differences(eager, table_config(BenchConfig(compile_backend="eager"), cpu)) == []
    named = [d.split(":")[0] for d in config_differences(eager, table_config(
        BenchConfig(compile="default", compile_backend="eager"), cpu))]
    assert named == ["compile", "compile_backend"]
