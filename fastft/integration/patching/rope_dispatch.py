"""RoPE inside transformers' attention modules without rewriting their forward.

Each supported attention forward calls its modeling module's global `apply_rotary_pos_emb(q, k, cos, sin)`.
While any model from that module is patched, that global is a dispatcher: inside the forward of a patched
attention instance (a context variable says so) it runs fastft's RoPE kernel on q and k together; everywhere
else, including unpatched models of the same architecture, it calls transformers' own function. The global is
put back when the last patched model of that module is unpatched.
"""
from __future__ import annotations

import contextvars
import importlib

from fastft.ops.rope import rope

_ACTIVE = contextvars.ContextVar("fastft_rope_backend", default=None)
_INSTALLED: dict[str, list] = {}  # modeling module name -> [original function, number of patched models]


def _dispatcher(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        backend = _ACTIVE.get()
        if backend is None:
            return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        return rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, backend=backend)

    apply_rotary_pos_emb.fastft_original = original
    return apply_rotary_pos_emb


def install(module_name: str) -> None:
    module = importlib.import_module(module_name)
    if module_name in _INSTALLED:
        _INSTALLED[module_name][1] += 1
        return
    original = module.apply_rotary_pos_emb
    _INSTALLED[module_name] = [original, 1]
    module.apply_rotary_pos_emb = _dispatcher(original)


def uninstall(module_name: str) -> None:
    entry = _INSTALLED.get(module_name)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        importlib.import_module(module_name).apply_rotary_pos_emb = entry[0]
        del _INSTALLED[module_name]


def has_rope_hook(module_name: str) -> bool:
    return callable(getattr(importlib.import_module(module_name), "apply_rotary_pos_emb", None))


class RoPEAttentionForward:
    """Attention mixin: the module's own forward, with its apply_rotary_pos_emb call going to fastft's kernel."""
    _fastft_backend = "auto"

    def forward(self, *args, **kwargs):
        token = _ACTIVE.set(self._fastft_backend)
        try:
            return super().forward(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)
