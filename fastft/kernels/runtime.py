"""What the Triton kernels need to know about where they run.

`TRITON_INTERPRET=1` must be set before triton is first imported; tests do that in conftest.py.
"""
from __future__ import annotations

import functools
import os
import threading

import torch

try:
    import triton
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # CPU-only installs may lack triton: the torch reference path still works.
    triton = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpret_descriptor_reduce() -> None:
    """Triton's interpreter (3.6, 3.7) has no descriptor reduce (`desc.atomic_add`, a TMA reduce-add on Hopper): an
    atomic add through the descriptor's element pointers stands in, those outside its shape masked off as TMA clips
    them (as the interpreter's own descriptor store does)."""
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if hasattr(builder, "create_descriptor_reduce"):
        return

    def create_descriptor_reduce(self, kind, desc, value, indices):
        if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
            raise NotImplementedError(f"descriptor reduce {kind} in the interpreter (fastft emulates ADD only)")
        ptrs, mask = desc.materialize_pointers(indices)
        return self.create_atomic_rmw(ir.ATOMIC_OP.FADD, ptrs, value, mask, ir.MEM_SEMANTIC.RELAXED,
                                      ir.MEM_SYNC_SCOPE.GPU)

    builder.create_descriptor_reduce = create_descriptor_reduce


def _interpret_one_launch_at_a_time() -> None:
    """Triton's interpreter runs a launch through process-wide state: it patches triton.language's builtins for the
    launch and restores them after, and keeps the grid position in one builder. Two threads launching at once (a
    server generating from one model in threads, on the CPU) unpatched each other's builtins mid-kernel ("Did you
    forget to add @triton.jit ?") or could read each other's program ids: launches take turns."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run
    if getattr(run, "_fastft_one_at_a_time", False):
        return
    lock = threading.RLock()  # reentrant: a launch made within one (a grid function's, a hook's) must not wait on it

    @functools.wraps(run)
    def one_at_a_time(self, *args, **kwargs):
        with lock:
            return run(self, *args, **kwargs)

    one_at_a_time._fastft_one_at_a_time = True
    InterpretedFunction.run = one_at_a_time


if INTERPRET and HAS_TRITON:
    _interpret_descriptor_reduce()
    _interpret_one_launch_at_a_time()


def under_func_transform() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, jvp, functional differentiation) or forward-mode AD is
    active: fastft's autograd Functions (the Triton kernels, the NF4 torch matmul) have no vmap or jvp rule, and the
    CPU extension reads data pointers, which the transforms' wrapped tensors have none of; plain torch ops do (what
    peft's layers run). Not while compiling: dynamo handles the transforms itself."""
    return not torch.compiler.is_compiling() and (torch._C._functorch.maybe_current_level() is not None
                                                  or torch.autograd.forward_ad._current_level >= 0)


def raw_pointers_ok(*tensors: torch.Tensor) -> bool:
    """Whether the compiled extension (which takes data pointers) may run on `tensors`: plain tensors, no torch.func
    transform, no tracer or fake mode watching. Else the torch reference runs: a FakeTensor's pointer is 0 (a
    segfault), make_fx recorded only the output's torch.empty (its graph replayed uninitialized memory), and
    torch.jit.trace handed numel over as a tensor."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (not under_func_transform() and not torch.jit.is_tracing() and _get_current_dispatch_mode() is None
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors))


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, and on the CPU under the interpreter."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


def on_operand_device(launcher):
    """Runs a kernel launcher with its operands' CUDA device current.

    Triton launches on the *current* device, not on the one its tensors live on. A model spread over GPUs
    (`device_map="auto"`, pipeline stages) keeps cuda:0 current while a layer's tensors sit on cuda:1: the launch
    then fails ("cannot be accessed from Triton") or reads another GPU's memory. The operands' device is that of
    the first tensor (or torch.device) among the positional arguments; ops check that all are on one device.
    The autotuner's timing and the descriptor scratch allocation run inside the launcher, so on that device too.
    """
    @functools.wraps(launcher)
    def run(*args, **kwargs):
        device = _operand_device(args)
        if device is None or device.index == torch.cuda.current_device():
            return launcher(*args, **kwargs)
        with torch.cuda.device(device):
            return launcher(*args, **kwargs)

    return run


def _operand_device(args) -> torch.device | None:
    """The CUDA device of the first tensor or device in args; None for the CPU (interpreter) or none found."""
    for a in args:
        if isinstance(a, torch.Tensor):
            device = a.device
        elif isinstance(a, torch.device):
            device = a
        else:
            continue
        return device if device.type == "cuda" else None
    return None


def deterministic() -> bool:
    """Whether kernels must give the same bits every run: torch.use_deterministic_algorithms(True) or
    FASTFT_DETERMINISTIC=1, read on every call. Configs that add in a run-dependent order (atomics) are left out, and
    the autotuner takes each kernel's first config untimed (timing could pick another reduction order next run)."""
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("FASTFT_DETERMINISTIC", "0") == "1"


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int | None) -> int:
    if INTERPRET or not torch.cuda.is_available():
        return 4  # small, so the interpreter still walks several tiles per persistent program
    return torch.cuda.get_device_properties(device_index or 0).multi_processor_count


def device_sms(device: torch.device) -> int:
    return num_sms(device.index if device.type == "cuda" else None)


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def has_tma(device: torch.device) -> bool:
    """Tensor descriptors (TMA on Hopper+); the interpreter emulates them."""
    if device.type == "cpu":
        return INTERPRET
    return device.type == "cuda" and _capability(device.index or 0)[0] >= 9


def tma_compatible(t: torch.Tensor) -> bool:
    """A 2-D tensor a descriptor can address: unit last stride, 16-byte aligned base and row stride, and no rows
    `expand`ed from one (a zero row stride: not something the interpreter's pointer emulation can vouch for)."""
    if t.dim() != 2:
        return False
    row, col = t.stride()  # one call for both (host time: launchers check several operands per call)
    return (col == 1 and t.data_ptr() % 16 == 0 and (row * t.element_size()) % 16 == 0
            and (row != 0 or t.shape[0] <= 1))


def _descriptor_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


def ensure_descriptor_allocator() -> None:
    """Device-side tensor descriptors need a scratch allocator registered with triton.

    triton keeps it in a ContextVar, i.e. per thread: autograd runs backward on its own thread, so this
    is called before every launch that may need it, not once.
    """
    triton.set_allocator(_descriptor_scratch)


def wide_offsets(*tensors: torch.Tensor) -> bool:
    """Whether an element offset of any of `tensors` (Σ (size - 1) · stride) passes int32: kernels that keep int32
    offsets where they can (int64 ones cost registers) take this as a constexpr and go int64 then."""
    return any(sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()) if n) >= 2**31 for t in tensors)


def wide_columns(*tensors: torch.Tensor) -> bool:
    """Whether a 2-D operand's column index times its column stride may pass int32: a column stride other than 1 on an
    operand whose offsets pass 2**31 (wide_offsets). The launchers that take any strides pass it as their WIDE
    constexpr; the ops give unit column strides (as_rows), so the first test decides it for them at no cost."""
    return any(t.stride(1) != 1 and wide_offsets(t) for t in tensors)


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host. (triton.cdiv is a jit-able function whose Python call costs ~7 µs,
    which adds up on a launcher's hot path.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
