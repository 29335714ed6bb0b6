"""Test setup.

On a machine without CUDA, TRITON_INTERPRET=1 is set here, before triton is first imported, so the
Triton kernels run on the CPU through the interpreter. On a machine with CUDA the interpreter stays off:
`pytest -m gpu` runs the GPU tests natively, and interpreter-only tests skip.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
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


@pytest.fixture
def captured_seeds(monkeypatch):
    """The seeds the fused ops draw for dropout (fastft.ops.shared.draw_seed: every op family, eager and compiled),
    in order, so a test can regenerate the kernels' mask (fastft.kernels.rank_ops.dropout_mask) for its reference."""
    from fastft.ops import shared

    seeds = []
    draw = shared.draw_seed
    monkeypatch.setattr(shared, "draw_seed", lambda: seeds.append(draw()) or seeds[-1])
    return seeds


@pytest.fixture
def poison_cuda_allocator():
    """Fill the caching allocator's free blocks with NaN: a kernel that skips an element leaves NaN behind
    (GPU tests: `pytestmark = pytest.mark.usefixtures("poison_cuda_allocator")`)."""
    torch.cuda.empty_cache()
    blocks = [torch.full((64 << 20,), float("nan"), device="cuda") for _ in range(4)]
    del blocks
    yield


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
