"""Resuming a `fastft bench methods` table cut short (killed, a time limit): the results JSON in --output-dir
holds every finished row and `complete: false`; the same command again measures only the rest. A table of other
settings (or another card, other package versions) is refused rather than mixed in or overwritten: --fresh
replaces it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fastft.apps.bench.config import BenchConfig
from fastft.apps.bench.harness import environment
from fastft.apps.bench.methods import table_config
from fastft.apps.bench.report import FORMATS, STEM

IGNORED = ("output_dir", "formats")   # where and how a table is written, not what it measures


def previous_result(cfg: BenchConfig, device: torch.device, fresh: bool = False) -> dict | None:
    """The unfinished table of these settings in cfg.output_dir to resume, or None (nothing there, --fresh, or
    a complete table of these settings: measured again). Raises ValueError, naming --output-dir and --fresh, for a
    table of other settings or a file that is not one."""
    for fmt in FORMATS:  # a folder where a results file goes: its write (or the clearing of an old one) would fail
        taken = Path(cfg.output_dir) / f"{STEM}.{fmt}"
        if taken.is_dir():
            raise ValueError(f"--output-dir {cfg.output_dir}: {taken} is a folder, where the results' {fmt} file "
                             "goes; move it, or give another --output-dir")
    path = Path(cfg.output_dir) / f"{STEM}.json"
    if fresh or not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
        old_config, old_env = old["config"], old["environment"]
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
    """'name: old there, new now' for each setting that differs (tuples and lists compare alike)."""
    old, new = json.loads(json.dumps(old, default=str)), json.loads(json.dumps(new, default=str))
    names = [k for k in dict.fromkeys([*new, *old]) if k not in IGNORED]
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in names if old.get(k) != new.get(k)]


def _env_differences(old_env: dict) -> list[str]:
    env = environment()
    out = [f"{name}: {old_env.get(name)!r} there, {env[name]!r} now" for name in ("card", "git_commit", "torch_threads")
           if old_env.get(name) != env[name]]
    if old_env.get("kernel_env", {}) != env["kernel_env"]:  # a table written before they were recorded: none set
        out.append(f"kernel environment {old_env.get('kernel_env', {})} there, {env['kernel_env']} now")
    old_versions = old_env.get("versions") or {}
    return out + [f"{name} {old_versions.get(name)} there, {v} now" for name, v in env["versions"].items()
                  if old_versions.get(name) != v]


def clear_outputs(out_dir: str | Path, rewritten: tuple[str, ...] = ()) -> None:
    """Remove an earlier run's bench_methods files that this run does not replace with every row (`rewritten`:
    their formats, written atomically over the old ones): no old plot sits beside a new table, and the table a
    resume read (previous_result) stays on disk until the first row replaces it (deleting it first lost every
    measured row to a run stopped before its first row)."""
    for fmt in FORMATS:
        if fmt not in rewritten:
            Path(out_dir, f"{STEM}.{fmt}").unlink(missing_ok=True)
