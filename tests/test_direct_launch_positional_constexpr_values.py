"""DirectLaunchJIT keys a constexpr passed by position on its value, from the first constexpr on: two launches that
differ only in BLOCK=16 vs BLOCK=32 given positionally must not share a direct-launch class (mutation LA4:
`i >= first_constexpr` → `i > first_constexpr` survived: the first positional constexpr was classed as an int, so
16 and 32 shared a class and a repeat launch would run the kernel compiled for the other value). The fuzz in
tests/direct_launch_check.py keeps constexpr values fixed between the two launches it compares, so it cannot see this.
Runs the check module's faked driver in a subprocess without TRITON_INTERPRET, as tests/test_direct_launch.py does."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_CODE = """
import torch
from tests import direct_launch_check as c
x = c._pointer(torch.float32, 0)
base = [x, x, 5, 7, 0.5, True, None]
key = lambda block, even: c._every_kind_kernel._key(tuple(base + [block, even]), {})
assert key(16, True) != key(32, True), "BLOCK 16 and 32 by position share a class"
assert key(16, True) != key(16, False), "EVEN by position not keyed on its value"
print("ok")
"""


def test_positional_constexprs_are_keyed_on_their_values():
    root = os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["tests"].__file__))) \
        if "tests" in sys.modules else os.getcwd()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    p = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert p.returncode == 0 and "ok" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
