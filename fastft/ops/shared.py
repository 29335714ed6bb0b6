"""What the ops share: backend choice, autocast casting, the argument checks' wording, row views and padding.

Every op validates with `check` (ValueError naming the argument), picks its backend with `check_backend` (at the
start, before anything else is looked at) and `resolve_backend` (after validation), and casts its inputs with
`autocast_inputs` so it behaves like torch's own ops under torch.autocast. An eager autograd.Function whose backward
launches kernels marks it `first_order_only` (create_graph=True refused: the kernels record no graph).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import weakref

import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_module

from fastft.kernels.runtime import HAS_TRITON, triton_runs_on, under_func_transform
from fastft.ops.compiled import compiling

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton kernels compute in


def check(cond: bool, message) -> None:
    """ValueError(message) unless cond. `message` may be a callable that builds it, called only on failure: under
    torch.compile with dynamic shapes, formatting a symbolic size into a string on every call breaks the graph."""
    if not cond:
        raise ValueError(message() if callable(message) else message)


def finite(x) -> bool:
    """math.isfinite of a number, symbolic ones included: torch.compile(dynamic=True) makes float module attributes
    (LoRA's scaling, attention's scaling) SymFloats, on which math.isfinite breaks the graph; comparisons guard."""
    return bool(x == x and -math.inf < x < math.inf)


def check_tensor(op: str, name: str, t, dim: int | None = None) -> None:
    check(isinstance(t, torch.Tensor), lambda: f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    check(t.is_floating_point(), lambda: f"{op}: `{name}` must be a floating-point tensor, got {t.dtype}")
    if dim is not None:
        check(t.dim() >= dim, lambda: f"{op}: `{name}` needs at least {dim} dimension(s), got shape {tuple(t.shape)}")


# nn.Linear subclasses whose own forward computes x·Wᵀ + b as nn.Linear's does (up to rounding: Falcon adds the
# bias after the matmul), keyed by that forward's qualified name: the fused ops may stand in for them (quantize_model
# leaves them dense, as transformers + bitsandbytes do: fastft.integration.nf4_skip.plain_forward_layers)
LINEAR_FORWARDS = frozenset({"transformers.models.falcon.modeling_falcon.FalconLinear.forward"})


def computes_linear(module: torch.nn.Module) -> bool:
    """The layer's class computes x·Wᵀ + b: nn.Linear's own forward, or one listed in LINEAR_FORWARDS."""
    forward = type(module).forward
    return (isinstance(module, torch.nn.Linear) and
            (forward is torch.nn.Linear.forward or f"{forward.__module__}.{forward.__qualname__}" in LINEAR_FORWARDS))


def forward_interceptor(module: torch.nn.Module, device: torch.device | None = None) -> str | None:
    """What would run around `module`'s own forward if it were called (a fused op that reads its weights instead
    would skip it), or None: its forward or backward hooks (nn.Module's call runs both kinds), a forward replaced on
    the instance (accelerate's `_hf_hook`: device_map offload, cpu_offload), or torch's global module hooks.
    device: where the fused op runs; accelerate's hook that would only move inputs already there is no interceptor
    (see `device_hook_moves_nothing`)."""
    own = module.__dict__
    if module._forward_hooks or module._forward_pre_hooks:
        return "a forward hook"
    if module._backward_hooks or module._backward_pre_hooks:
        return "a backward hook"
    if "_hf_hook" in own:
        if not device_hook_moves_nothing(module, device):
            return REPLACED_FORWARD
    elif replaced_forward(module):
        return REPLACED_FORWARD
    if global_module_hooks():
        return "a global module hook"
    return None


REPLACED_FORWARD = "a forward replaced on the instance (e.g. accelerate's device_map / cpu_offload hook)"


def device_hook_moves_nothing(module: torch.nn.Module, device: torch.device | None) -> bool:
    """Whether calling `module` on `device` would run nothing but its own forward although accelerate hooked it.

    `dispatch_model` (a model spread over GPUs by `device_map="auto"`) puts an AlignDevicesHook on every module
    that holds tensors. Without offload, the hook's one effect is to move the call's inputs to its execution
    device: when the module's tensors and the fused op's operands (`device`) are already there, reading the
    weights is what the call would do. Any other hook (offload, a SequentialHook, io_same_device, no_grad), or a
    forward replaced again on top of accelerate's, still intercepts."""
    hook = module.__dict__["_hf_hook"]
    if type(hook) is not _align_devices_hook() or hook.offload or hook.io_same_device or hook.no_grad:
        return False
    if device is None or _as_device(hook.execution_device) != device:
        return False
    forward = module.__dict__.get("forward")
    if not (isinstance(forward, functools.partial) and forward.args == (module,)
            and getattr(forward.func, "__name__", None) == "new_forward"):
        return False
    if not bound_to(module.__dict__.get("_old_forward"), module, type(module).forward):
        return False
    return all(t.device == device for t in (*module._parameters.values(), *module._buffers.values())
               if t is not None)


def hook_device(module: torch.nn.Module) -> torch.device | None:
    """The execution device of accelerate's device_map hook on `module` (where calling it would move the inputs),
    or None where it has none."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:  # the usual module: no lru_cache call (_align_devices_hook) for dynamo to warn about when traced
        return None
    return _as_device(hook.execution_device) if type(hook) is _align_devices_hook() else None


@functools.lru_cache(maxsize=None)
def _align_devices_hook() -> type:
    try:
        from accelerate.hooks import AlignDevicesHook
    except ImportError:  # accelerate is a dependency; without it no module carries its hook
        return type("NoAlignDevicesHook", (), {})
    return AlignDevicesHook


def _as_device(device) -> torch.device | None:
    """accelerate's execution device (an int names a CUDA device; "cuda" the current one, where the hook would send
    the inputs) as a torch.device."""
    if device is None:
        return None
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def replaced_forward(module: torch.nn.Module) -> bool:
    """Whether the instance holds a forward other than its class's (accelerate's hook wraps one there; removing the
    hook leaves the class's own forward bound on the instance, which changes nothing)."""
    bound = module.__dict__.get("forward")
    return bound is not None and not bound_to(bound, module, type(module).forward)


def bound_to(method, module: torch.nn.Module, function) -> bool:
    """Whether `method` is `function` bound to `module` (a forward kept on the instance, as accelerate keeps them)."""
    return getattr(method, "__func__", None) is function and getattr(method, "__self__", None) is module


def global_module_hooks() -> bool:
    """Whether torch's global module hooks (register_module_forward_hook, ..._full_backward_hook) are set: every
    module call runs them."""
    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks)


def check_backend(op: str, backend: str) -> None:
    check(backend in BACKENDS, lambda: f"{op}: `backend` must be one of {BACKENDS}, got {backend!r}")


def require_triton(setting: str, instead: str) -> None:
    """ValueError naming `setting` (what asked for the Triton backend) when triton is not installed: it is an optional
    dependency, and without it the torch backend runs everything. `instead`: how to run without it."""
    if not HAS_TRITON:
        raise ValueError(f"{setting} needs triton, which is not installed (pip install 'fastft[triton]'); {instead}")


def resolve_backend(op: str, backend: str, device: torch.device, *, arg: str | None = None,
                    dtype: torch.dtype | None = None) -> str:
    """"triton" or "torch": auto is Triton on CUDA when triton is installed (the interpreter is for tests, chosen
    explicitly). `arg` names the input a refusal points at (else "the inputs"). `dtype`: the dtype the op's kernels
    would compute in; one outside KERNEL_DTYPES (fp64) goes to torch on auto and is refused on "triton" (the kernels
    accumulate in fp32: fp64 inputs would silently get fp32 accuracy)."""
    check_backend(op, backend)
    kernel_dtype = dtype is None or dtype in KERNEL_DTYPES
    if backend == "auto":  # (the transform check last: only where the kernels would otherwise run)
        return "triton" if (kernel_dtype and device.type == "cuda" and triton_runs_on(device)
                            and not under_func_transform()) else "torch"
    what = "the inputs are" if arg is None else f"`{arg}` is"
    if backend == "triton" and under_func_transform():
        raise ValueError(f"{op}: backend='triton'{_set_by()} runs under no torch.func transform (grad, vmap, jacrev, "
                         "jvp) nor forward-mode AD: its kernels have no vmap or jvp rule; backend='auto' or 'torch' "
                         "runs plain torch ops there")
    if backend == "triton" and not triton_runs_on(device):
        require_triton(f"{op}: backend='triton'", "backend='auto' or 'torch' runs without it")
        where = "CUDA tensors" if arg is None else "a CUDA tensor"
        raise ValueError(f"{op}: backend='triton'{_set_by()} needs {where} (or TRITON_INTERPRET=1 on CPU); {what} on "
                         f"{device}")
    if backend == "triton" and not kernel_dtype:
        raise ValueError(f"{op}: backend='triton'{_set_by()} computes in float16, bfloat16 or float32; {what} {dtype} "
                         "(backend='torch' takes any float dtype)")
    return backend


def _set_by() -> str:
    """Where a backend='triton' refusal may come from besides the argument: fastft's LoRA layers read it from the
    environment (fastft.modules.lora)."""
    return " (FASTFT_LORA_BACKEND=triton, for fastft's LoRA layers)" if os.environ.get(
        "FASTFT_LORA_BACKEND", "").strip() == "triton" else ""


# What torch.autocast casts: float64 is not autocast-eligible (torch's own ops stay fp64 under it), nor are ints.
AUTOCAST_CASTS = frozenset((torch.float32, torch.float16, torch.bfloat16))


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled, False on meta tensors (torch's check raises there: no autocast for meta)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def autocast_inputs(*tensors):
    """The inputs cast to torch.autocast's dtype when autocast is on for the first one's device, as torch's ops cast
    theirs: fp32/fp16/bf16 tensors only (fp64 ones stay fp64; an NF4Weight stays as it is: it is quantized);
    non-tensors (None, wrong types left for validation) pass unchanged."""
    lead = tensors[0]
    if not (isinstance(lead, torch.Tensor) and autocast_enabled(lead.device.type)):
        return tensors
    dtype = torch.get_autocast_dtype(lead.device.type)
    return tuple(to_dtype(t, dtype) if isinstance(t, torch.Tensor) and t.dtype in AUTOCAST_CASTS else t
                 for t in tensors)


def first_order_only(backward=None, *, instead: str = "use backend='torch' for higher-order gradients"):
    """For an eager Function's backward that launches kernels (they record no graph, so its gradients are not
    differentiable): refuse create_graph=True (the one case where autograd runs a backward with grad mode on)
    instead of returning gradients that silently miss their second-order terms. Refused up front, not when the
    gradients are differentiated (torch.autograd.function.once_differentiable's DelayedError): its error node hangs
    off detached copies, so autograd.grad(..., inputs=params) prunes it away and drops the terms silently, and it
    marks nothing when the incoming gradient is a constant (a scalar loss's). Costs one check per backward.
    `instead`: what the error tells the user to do (`@first_order_only(instead=...)`)."""
    if backward is None:
        return functools.partial(first_order_only, instead=instead)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(f"fastft: {type(ctx).__name__.removesuffix('Backward')} cannot be differentiated "
                               "twice: its backward runs Triton kernels, which record no autograd graph, so "
                               "create_graph=True (double backward, gradient penalties, Hessians) would miss the "
                               f"second-order terms; {instead}")
        return backward(ctx, *grads)
    return wrapper


_NO_CONTEXT = contextlib.nullcontext()


def autocast_off(device_type: str):
    """`torch.autocast(device_type, enabled=False)`, the context the ops run their kernels in; a no-op context when
    autocast is off there already (eager only): entering torch.autocast costs ~8 µs of host time a call."""
    if (compiling() and device_type != "meta") or autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NO_CONTEXT


def to_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), skipped when t has that dtype already (the call alone costs ~1 µs of host time)."""
    return t if t.dtype == dtype else t.to(dtype)


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den is 0 (a gradient through a scale that is exactly 0: IA3's vector, DoRA's magnitude)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, 1.0), 0.0)


def power_of_two_scales(top: torch.Tensor, exponent: int, *, at_least_one: bool = False) -> torch.Tensor:
    """Per-entry powers of two c with top·c in [2^(exponent-1), 2^exponent) (fp16 operands scaled by them keep their
    11 bits clear of subnormals and the products stay exact, so an fp32 sum can divide c out): 1 where top is 0 or
    not finite, at most 2^126 (finite in fp32), at least 1 with at_least_one (only scaling up). On the device: no
    host sync."""
    e = torch.frexp(top).exponent
    shift = exponent - e.clamp(min=exponent - 126)
    if at_least_one:
        shift = shift.clamp(min=0)
    shift = torch.where(torch.isfinite(top) & (top > 0), shift, torch.zeros_like(shift))
    return torch.ldexp(torch.ones_like(top), shift)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(…, F) → (M, F), a view where the strides allow, with a unit last stride (t itself when it is such rows
    already: a reshape costs ~1 µs of host time)."""
    if t.dim() == 2 and t.stride(-1) == 1:
        return t
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rows_to(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An op's (M, N) rows in `like`'s leading shape, (..., N). Applied outside the eager autograd.Function: a view
    a Function makes of its own result is one autograd refuses to change in place (`ReLU(inplace=True)` after a
    layer, Mixtral's `hidden_states *= ...`), where torch's own ops allow it. y itself when like is rows already."""
    if like.dim() == 2:
        return y
    return y.view(*like.shape[:-1], y.shape[-1])


def padded(t: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """t zero-padded to (rows, cols), contiguous, in dtype; t itself when nothing changes. One device op for a cast
    or a pad alone (a launch costs host time on small layers), two for both."""
    if tuple(t.shape) == (rows, cols):  # (`.to(memory_format=)` returns t itself, strided or not, when the dtype matches)
        return t.contiguous() if t.dtype == dtype else t.to(dtype, memory_format=torch.contiguous_format)
    return F.pad(t.to(dtype), (0, cols - t.shape[1], 0, rows - t.shape[0])).contiguous()


def draw_seed() -> int:
    """A dropout seed from torch's CPU generator: reproducible under torch.manual_seed, restored by activation
    checkpointing's RNG-state handling, and no device synchronisation."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64).item())


def compute_input(x: torch.Tensor, weight) -> torch.Tensor:
    """x as an NF4 layer computes with it: as it is, but an fp32 x on a weight quantized from bf16 (peft's
    prepare_model_for_kbit_training upcasts the residual stream to fp32) in bf16, as bitsandbytes computes in a
    bnb_4bit_compute_dtype of bf16 (the QLoRA recipe's): fp32 GEMMs would run without tensor cores (10× slower) and
    save fp32 activations. Not fp16: without a GradScaler (none runs where nothing autocasts) small gradients would
    underflow. Under autocast the op casts x to autocast's dtype itself."""
    if (x.dtype == torch.float32 and weight.dtype == torch.bfloat16
            and not autocast_enabled(x.device.type)):
        return _shared_cast(x, weight.dtype)
    return x


_LAST_CAST = threading.local()  # per thread: nn.DataParallel runs replicas in threads


def _shared_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.to(dtype), its storage shared with the next layers fed the same x: q, k and v (gate and up) read one
    residual stream, and each layer's op saves its input for backward; a cast each kept three bf16 copies of it
    (autograd's saved storages are counted once). Each layer still gets its own cast node, so its gradient reaches x
    in fp32 and the layers' gradients sum in fp32, as separate casts sum them. Reused only while x is unchanged (its
    version), the shared cast is alive (held by the graph: weakly referenced here, never kept beyond it) and
    unchanged. Plain tensors in eager mode only: dynamo, fake and functional tensors and torch.func's wrappers cast
    afresh (a compiled graph shares the cast itself)."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor or x.is_inference() or under_func_transform():
        return x.to(dtype)
    last = last_shared_cast()
    cast = last[1] if last is not None and last[0] is x and last[1].dtype == dtype else None
    if cast is None:
        with torch.no_grad():
            cast = x.to(dtype)
    if x.requires_grad and torch.is_grad_enabled():
        cast = _CastNode.apply(x, cast.detach())
    elif cast.requires_grad:  # made under grad mode: the history is not this call's
        cast = cast.detach()
    # the tensor the layer's op gets (and saves): the one alive while the graph holds it
    _LAST_CAST.value = (weakref.ref(x), x._version, weakref.ref(cast), cast._version)
    return cast


def last_shared_cast() -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x, its cast) of the last cast `_shared_cast` made on this thread, while both are alive and unchanged."""
    last = getattr(_LAST_CAST, "value", None)
    if last is None:
        return None
    source_ref, version, cast_ref, cast_version = last
    source, cast = source_ref(), cast_ref()
    if source is None or cast is None or source._version != version or cast._version != cast_version:
        return None
    return source, cast


class _CastNode(torch.autograd.Function):
    """x's cast (made already: `cast`, no history) as x.to(cast.dtype) gives it: the gradient goes back cast to x's
    dtype."""

    @staticmethod
    def forward(ctx, x, cast):
        ctx.dtype = x.dtype
        return cast.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


def in_compute_dtype(op, x: torch.Tensor, weight, *args, **kwargs) -> torch.Tensor:
    """op(x, weight, *args, **kwargs) with x as compute_input gives it, the result in x's own dtype."""
    computed = compute_input(x, weight)
    y = op(computed, weight, *args, **kwargs)
    return y if computed is x else y.to(x.dtype)


def nf4_fused_ok(qweight) -> bool:
    """Whether the fused NF4 GEMM (fastft.kernels.nf4_gemm) takes this NF4Weight's layout. The rule needs only the
    shape, blocksize and byte count, so the nested offset is not read (a device read, which torch.compile cannot
    trace)."""
    from fastft.kernels.nf4_gemm import NF4Operand, fused_supported

    rows, cols = qweight.shape
    return fused_supported(NF4Operand(qweight.packed, qweight.absmax, qweight.absmax2, qweight.code2, 0.0,
                                      qweight.nested_blocksize, qweight.code, qweight.blocksize, rows, cols))
