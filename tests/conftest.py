"""Test setup.

On a machine without CUDA, TRITON_INTERPRET=1 is set here, before triton is first imported, so the
Triton kernels run on the CPU through the interpreter. On a machine with CUDA the interpreter stays off:
`pytest -m gpu` runs the GPU tests natively, and interpreter-only tests skip.
"""
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


# The longest files (~20 s to ~90 s each on CI's 2 cores), started first when pytest-xdist spreads whole files over
# workers (scripts/test.sh: -n 2 --dist loadfile), so no worker is left with one of them at the end alone.
LONG_FILES = ("test_study_quick.py", "test_methods_sm90_compile.py", "test_patch_step_benchmark.py",
              "test_nf4_sm90_compile.py", "test_train_distributed.py", "test_train_compile.py",
              "test_attention_sm90_compile.py", "test_train_objectives.py", "test_study.py", "test_bench_cli.py",
              "test_train_resume.py", "test_nf4_fsdp.py", "test_methods_smollm2.py", "test_smollm2.py",
              "test_train_compile_inductor_dropout.py", "test_compiled_sliding_window_model_compiles_once.py",
              "test_train_resume_finished_runs.py")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a stable sort: every worker must collect the same order
        rank = {name: i for i, name in enumerate(LONG_FILES)}
        items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_process_state():
    """Process-wide state a test leaves behind, reset after each (two xdist workers run files in changing company):
    accelerate's singleton state (an in-process `fastft train --mixed-precision bf16` left a later test's plain
    Accelerator(cpu=True) in bf16), and the training loop's once-per-process warnings."""
    yield
    state = sys.modules.get("accelerate.state")
    if state is not None:  # the device too (PartialState): a later Accelerator(cpu=...) would keep the first one's
        state.AcceleratorState._reset_state(reset_partial_state=True)
        state.GradientState._reset_state()
    objectives = sys.modules.get("fastft.apps.training.objectives")
    if objectives is not None:  # its once-per-process warning, given again in the next test that triggers it
        objectives._WARNED.clear()


@pytest.fixture
def captured_seeds(monkeypatch):
    """The seeds the fused ops draw for dropout (fastft.ops.shared.draw_seed: every op family, eager and compiled),
    in order, so a test can regenerate the kernels' mask (fastft.kernels.rank_ops.dropout_mask) for its reference."""
    from fastft.ops import shared

    seeds = []
    draw = shared.draw_seed
    monkeypatch.setattr(shared, "draw_seed", lambda: seeds.append(draw()) or seeds[-1])
    return seeds


class _DeviceBytes:
    """A span of CUDA memory seen as a uint8 tensor through torch.as_tensor (the CUDA array interface)."""

    def __init__(self, address: int, size: int):
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (address, False), "version": 2}


def free_cuda_blocks(snapshot: list[dict], device: int) -> list[tuple[int, int]]:
    """(address, bytes) of each free block of torch.cuda.memory_snapshot() on `device`: where the next allocations
    land. Expandable segments are left out (their free tail may be unmapped)."""
    return [(block["address"], block["size"]) for segment in snapshot
            if segment.get("device", device) == device and not segment.get("is_expandable")
            for block in segment["blocks"] if block["state"] == "inactive"]


def poison_free_cuda_memory() -> None:
    """Every free byte the caching allocator holds set to 0xFF: NaN in every float dtype. Both pools: outputs up to
    1 MiB come from the small pool's 2 MiB segments, larger ones from the large pool; room is reserved in each first,
    so outputs come from poisoned blocks rather than fresh cudaMalloc memory (which may hold an old output)."""
    reserved = [torch.empty(256 << 20, dtype=torch.uint8, device="cuda") for _ in range(4)]
    reserved += [torch.empty(1 << 20, dtype=torch.uint8, device="cuda") for _ in range(64)]  # small pool: ≤ 1 MiB
    del reserved
    for address, size in free_cuda_blocks(torch.cuda.memory_snapshot(), torch.cuda.current_device()):
        torch.as_tensor(_DeviceBytes(address, size), device="cuda").fill_(0xFF)


@pytest.fixture
def poison_cuda_allocator():
    """Every free block of the caching allocator filled with NaN: a kernel that skips an element leaves NaN behind
    (GPU tests: `pytestmark = pytest.mark.usefixtures("poison_cuda_allocator")`). Yields the poisoning function: a
    test that launches in a loop (one config after another) drops its outputs and calls it before each launch, or a
    block freed by an earlier launch, holding right values, is handed to the next."""
    poison_free_cuda_memory()
    yield poison_free_cuda_memory


@pytest.fixture
def one_rank_group():
    """A one-process gloo group and its CPU device mesh (FSDP2 / DTensor code paths on one rank)."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
