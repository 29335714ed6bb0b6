"""What the layer ops (rms_norm, rope, glu) share: backend choice and the argument checks' wording."""
from __future__ import annotations

import torch

from fastft.kernels.runtime import triton_runs_on

BACKENDS = ("auto", "triton", "torch")


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_tensor(op: str, name: str, t, dim: int | None = None) -> None:
    check(isinstance(t, torch.Tensor), f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    check(t.is_floating_point(), f"{op}: `{name}` must be a floating-point tensor, got {t.dtype}")
    if dim is not None:
        check(t.dim() >= dim, f"{op}: `{name}` needs at least {dim} dimension(s), got shape {tuple(t.shape)}")


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """"triton" or "torch": auto is Triton on CUDA (the interpreter is for tests, chosen explicitly)."""
    check(backend in BACKENDS, f"{op}: `backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_runs_on(device) else "torch"
    if backend == "triton":
        check(triton_runs_on(device), f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                                      f"the inputs are on {device}")
    return backend


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(…, F) → (M, F), a view where the strides allow, with a unit last stride."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()
