"""Triton launches on the current CUDA device, not on the device its tensors live on. A model spread over GPUs
(`device_map="auto"`) keeps cuda:0 current while a layer's tensors sit on cuda:1: a kernel launched there fails
("Pointer argument cannot be accessed from Triton") or reads another GPU's memory. Every launcher therefore runs
with its operands' device current (`fastft.kernels.runtime.on_operand_device`).

No machine here has two GPUs: the device switch is checked with fake cuda:1 tensors and a stubbed current device,
and a scan of the kernel files checks that every function that launches a kernel wears the decorator."""
from __future__ import annotations

import ast
import contextlib
import pathlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastft.kernels import runtime
from fastft.kernels.runtime import on_operand_device

KERNELS = pathlib.Path(runtime.__file__).parent


class FakeCuda:
    """torch.cuda's current device, kept in Python: `device(d)` makes d current inside the block."""

    def __init__(self, current: int):
        self.current = current
        self.switches: list[int] = []

    def current_device(self) -> int:
        return self.current

    @contextlib.contextmanager
    def device(self, device):
        before, self.current = self.current, torch.device(device).index
        self.switches.append(self.current)
        try:
            yield
        finally:
            self.current = before


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda(current=0)
    monkeypatch.setattr(torch.cuda, "current_device", fake.current_device)
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    return fake


def cuda_tensor(index: int) -> torch.Tensor:
    with FakeTensorMode():
        return torch.empty(4, device=f"cuda:{index}")


def test_launcher_runs_on_its_operands_device(fake_cuda):
    seen = []

    @on_operand_device
    def launcher(kernel_name, x, y, *, scale):
        seen.append((fake_cuda.current_device(), scale))
        return "launched"

    # the first tensor among the positional arguments names the device, after non-tensor ones
    assert launcher("k", cuda_tensor(1), cuda_tensor(1), scale=2.0) == "launched"
    assert seen == [(1, 2.0)] and fake_cuda.current == 0   # switched for the launch, restored after
    launcher("k", cuda_tensor(0), None, scale=1.0)          # already current: no switch
    assert fake_cuda.switches == [1] and seen[-1] == (0, 1.0)


def test_a_device_argument_names_the_device(fake_cuda):
    @on_operand_device
    def launcher(seed, rows, device):
        return fake_cuda.current_device()

    assert launcher(3, 8, torch.device("cuda", 2)) == 2


def test_cpu_operands_never_touch_cuda(monkeypatch):
    def no_cuda(*args):
        raise AssertionError("the CPU path asked torch.cuda")

    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    assert on_operand_device(lambda x: x.sum())(torch.ones(3)) == 3


def _launching_functions(path: pathlib.Path):
    """(name, decorators) of each module-level function whose body (nested helpers included) launches a kernel:
    a call of a subscripted name, `kernel[grid](...)`."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and any(
                isinstance(call, ast.Call) and isinstance(call.func, ast.Subscript) for call in ast.walk(node)):
            yield node.name, [ast.unparse(d) for d in node.decorator_list]


def test_every_kernel_launcher_runs_on_its_operands_device():
    launchers = {f"{path.stem}.{name}": decorators for path in sorted(KERNELS.glob("*.py"))
                 for name, decorators in _launching_functions(path)}
    # the scan finds the launchers (a scan that found none would pass vacuously)
    assert {"lora_gemm._gemm", "nf4_gemm.nf4_lora_gemm", "attention_fwd.attention_forward",
            "attention_bwd.attention_backward", "cross_entropy._launch_rows", "rope.rope_rotate"} <= set(launchers)
    undecorated = sorted(name for name, decorators in launchers.items() if "on_operand_device" not in decorators)
    assert not undecorated, f"launchers without @on_operand_device: {undecorated}"


def test_path_choices_that_time_launches_run_on_the_operands_device():
    """The QLoRA base-GEMM path choice and the NF4 GEMV variant choice time their launches outside any kernel
    launcher: on cuda:0 while the layer sits on cuda:1, the timing events measured the wrong GPU."""
    from fastft.kernels import nf4_cuda
    from fastft.ops import qlora_path

    for chooser in (qlora_path.nf4_base_gemm, nf4_cuda.nf4_gemv):
        assert getattr(chooser, "__wrapped__", None) is not None, chooser.__qualname__  # wears on_operand_device


def test_an_execution_device_named_cuda_is_the_current_one(fake_cuda):
    from fastft.ops.shared import _as_device

    fake_cuda.current = 1
    assert _as_device("cuda") == torch.device("cuda", 1)   # where accelerate's hook would send the inputs
    assert _as_device(0) == torch.device("cuda", 0) and _as_device("cuda:0") == torch.device("cuda", 0)
    assert _as_device("cpu") == torch.device("cpu")
