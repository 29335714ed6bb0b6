"""Runs tests/sm90_compile.py in a subprocess (without TRITON_INTERPRET: it compiles for a real sm_90 target) and
fails the calling test when any kernel fails to compile, spills or exceeds shared memory.

Under two tritons: the venv's own (CI's, 3.7) and the GPU machine's (3.6, installed by scripts/setup.sh into
.venv/gpu-triton), since a kernel that compiles clean under one can spill under the other."""
import atexit
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_TRITON = os.path.join(sys.prefix, "gpu-triton")  # pip install --target, see requirements/gpu-triton.txt

# pytest.mark.parametrize("triton_path", TRITONS): None = the venv's triton
TRITONS = [pytest.param(None, id="venv-triton"), pytest.param(GPU_TRITON, id="gpu-machine-triton")]


def run_sm90_compile(*family: str, triton_path: str | None = None, alone: bool = False) -> str:
    """The script's stdout; `family` selects a group ("lora", "attention", …), none the NF4 and loss-row kernels.
    triton_path: a folder holding another triton package, imported ahead of the venv's.

    The first call for a family starts the script under every triton of TRITONS at once (one subprocess each, both
    CPU cores busy); the call for the other triton then collects its already running or finished subprocess.
    alone: a family checked under one triton only: no sibling is started."""
    paths = [triton_path] if alone else [p.values[0] for p in TRITONS]
    for path in paths:
        if (family, path) not in _RUNS:
            _RUNS[(family, path)] = _start(family, path)
    started = _RUNS.pop((family, triton_path))
    if isinstance(started, str):
        pytest.fail(started)
    try:
        stdout, stderr = started.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        started.kill()
        raise
    assert started.returncode == 0, stdout[-4000:] + stderr[-4000:]
    if triton_path is not None:  # the folder's triton was the one imported
        assert f"triton {_version(triton_path)}" in stdout.splitlines()[0], stdout[:500]
    return stdout


_RUNS: dict[tuple, subprocess.Popen | str] = {}  # (family, triton_path) -> its running script, or why it cannot run


@atexit.register
def _stop_uncollected() -> None:  # a sibling whose test was deselected (-k) is not left running
    for run in _RUNS.values():
        if isinstance(run, subprocess.Popen):
            run.kill()


def _start(family: tuple, triton_path: str | None) -> subprocess.Popen | str:
    return start_compiled("tests.sm90_compile", *family, triton_path=triton_path)


def start_compiled(module: str, *args: str, triton_path: str | None) -> subprocess.Popen | str:
    """`python -m module args` without TRITON_INTERPRET (compiled, not interpreted), the triton under `triton_path`
    imported ahead of the venv's (None: the venv's); a string saying why not where that folder holds no triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_path is not None:
        if not os.path.isdir(os.path.join(triton_path, "triton")):
            return (f"no triton under {triton_path}: run scripts/setup.sh, or python -m pip install --no-deps "
                    f"--target {triton_path} -r requirements/gpu-triton.txt")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_path, ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _version(triton_path: str) -> str:
    dist = [d for d in os.listdir(triton_path) if d.startswith("triton-") and d.endswith(".dist-info")]
    return dist[0][len("triton-"):-len(".dist-info")]
