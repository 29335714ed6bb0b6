"""Resuming a `fastft bench methods` table cut short (killed, a time limit): the results JSON in --output-dir
holds every finished row and `complete: false`; the same command again measures only the rest. A table of other
settings (or another card or CPU model, CPU count, other package versions) is refused rather than mixed in or
overwritten: --fresh replaces it. The JSON is written while a table is unfinished whatever --formats asks (it is the
only record a resume reads), and removed once the table is complete if --formats left it out.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fastft.apps.bench.config import PROMPT_METHODS, RANKED_METHODS, BenchConfig
from fastft.apps.bench.harness import environment
from fastft.apps.bench.methods import table_config
from fastft.apps.bench.report import FORMATS, STEM
from fastft.files import output_names_problem

IGNORED = ("output_dir", "formats")   # where and how a table is written, not what it measures


def previous_result(cfg: BenchConfig, device: torch.device, fresh: bool = False) -> dict | None:
    """The unfinished table of these settings in cfg.output_dir to resume, or None (nothing there, --fresh, or
    a complete table of these settings: measured again). Raises ValueError, naming --output-dir and --fresh, for a
    table of other settings or a file that is not one."""
    # a folder where a results file goes: its write (or the clearing of an old one) would fail
    problem = output_names_problem(cfg.output_dir, files=[f"{STEM}.{fmt}" for fmt in FORMATS])
    if problem:
        raise ValueError(problem)
    path = Path(cfg.output_dir) / f"{STEM}.json"
    if fresh or not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
        old_config, old_env = old["config"], old["environment"]
        for name, value, kind in (("config", old_config, dict), ("environment", old_env, dict),
                                  ("rows", old.get("rows", []), list)):
            if not isinstance(value, kind):
                raise TypeError(f"its {name} is a {type(value).__name__}, not a {kind.__name__}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--output-dir {cfg.output_dir}: {path} is not a fastft bench results file ({err}); pass "
                         "--fresh to replace it, or give another --output-dir") from None
    differences = config_differences(old_config, table_config(cfg, device)) + _env_differences(old_env)
    if differences:
        raise ValueError(f"--output-dir {cfg.output_dir} holds a table of other settings "
                         f"({'; '.join(differences[:4])}); pass --fresh to measure anew and replace it, or give "
                         "another --output-dir")
    return None if old.get("complete") is True else old


def config_differences(old: dict, new: dict) -> list[str]:
    """'name: old there, new now' for each setting that differs (tuples and lists compare alike; the compile backend
    only where something was compiled, --rank / --alpha and --num-virtual-tokens only where a method of either table
    reads them)."""
    old, new = json.loads(json.dumps(old, default=str)), json.loads(json.dumps(new, default=str))
    ignored = IGNORED + (("compile_backend",) if old.get("compile") == new.get("compile") == "off" else ())
    for methods, settings in ((RANKED_METHODS, ("rank", "alpha")), (PROMPT_METHODS, ("num_virtual_tokens",))):
        if not set(methods) & {*(old.get("methods") or ()), *(new.get("methods") or ())}:
            ignored += settings
    names = [k for k in dict.fromkeys([*new, *old]) if k not in ignored]
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in names if old.get(k) != new.get(k)]


def _env_differences(old_env: dict) -> list[str]:
    env = environment()
    compared = ("card", "cpu_count", "git_commit", "torch_threads")   # card: the GPU, or the CPU's model
    out = [f"{name}: {old_env.get(name)!r} there, {env[name]!r} now" for name in compared
           if old_env.get(name) != env[name]]
    if old_env.get("kernel_env", {}) != env["kernel_env"]:  # a table written before they were recorded: none set
        out.append(f"kernel environment {old_env.get('kernel_env', {})} there, {env['kernel_env']} now")
    old_versions = old_env.get("versions") or {}
    return out + [f"{name} {old_versions.get(name)} there, {v} now" for name, v in env["versions"].items()
                  if old_versions.get(name) != v]


def formats_per_row(formats: tuple[str, ...]) -> tuple[str, ...]:
    """The files rewritten after every row: the JSON whatever --formats asks (the only record a resume reads: an
    unfinished table without it could not be resumed, and a resume with `--formats md` deleted the one it read), the
    markdown when asked; the plot is drawn once, at the end."""
    return ("json", *(f for f in formats if f == "md"))


def clear_outputs(out_dir: str | Path, rewritten: tuple[str, ...] = ()) -> None:
    """Remove an earlier run's bench_methods files that this run does not replace with every row (`rewritten`:
    their formats, written atomically over the old ones): no old plot sits beside a new table, and the table a
    resume read (previous_result) stays on disk until the first row replaces it (deleting it first lost every
    measured row to a run stopped before its first row)."""
    for fmt in FORMATS:
        if fmt not in rewritten:
            Path(out_dir, f"{STEM}.{fmt}").unlink(missing_ok=True)


def drop_unasked_json(out_dir: str | Path, formats: tuple[str, ...]) -> None:
    """Once the table is complete, remove the JSON that formats_per_row kept for a resume if --formats left it
    out."""
    if "json" not in formats:
        Path(out_dir, f"{STEM}.json").unlink(missing_ok=True)
