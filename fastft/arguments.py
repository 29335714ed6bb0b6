"""Type checks of the public entry points' arguments, so a slip fails at the call, naming the argument, instead of as
an AttributeError deep inside (None where a model belongs) or silently (the string "no" is truthy: it switched an
option on). Standard library and torch only, so every layer may use it."""
from __future__ import annotations

import os

import torch

MODEL = "a torch nn.Module (a transformers model, e.g. from AutoModelForCausalLM.from_pretrained)"


def check_model(model, what: str, name: str = "model", expected: str = MODEL) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{what}: `{name}` must be {expected}, got {type(model).__name__}")


def check_path(path, what: str, name: str = "path") -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what}: `{name}` must be a folder path (a str or os.PathLike), got {type(path).__name__}")


def check_flag(value, what: str, name: str, *, none_ok: bool = False) -> None:
    """True or False (0 / 1 and numpy's bools compare equal to them and pass); a string never does: "no" and "False"
    are truthy. none_ok: None too (an option whose default is decided later)."""
    if none_ok and value is None:
        return
    if isinstance(value, (str, bytes)) or not _is_true_or_false(value):
        allowed = "True, False or None" if none_ok else "True or False"
        raise TypeError(f"{what}: `{name}` must be {allowed}, got {value!r}")


def _is_true_or_false(value) -> bool:
    try:
        return bool(value in (True, False))
    except (TypeError, ValueError, RuntimeError):  # a tensor of several elements, an object whose == raises
        return False


def check_float_dtype(dtype, what: str, name: str = "dtype", *, none_ok: bool = False) -> torch.dtype | None:
    """A floating torch.dtype; also the names transformers takes for one ("bfloat16", "torch.float16"). Returns the
    dtype."""
    if none_ok and dtype is None:
        return None
    if isinstance(dtype, str):
        named = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(named, torch.dtype):
            dtype = named
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{what}: `{name}` must be a floating torch.dtype (torch.bfloat16, torch.float16, "
                        f"torch.float32 or its name, e.g. 'bfloat16'), got {dtype!r}")
    return dtype
