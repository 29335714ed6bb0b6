"""RoPE inside transformers' attention modules without rewriting their forward or mutating their module.

Each supported attention forward calls its modeling module's global `apply_rotary_pos_emb(q, k, cos, sin)`.
The patched attention class gets the *same* forward code (its innermost function, under transformers'
decorators) bound to a copy of that module's globals in which `apply_rotary_pos_emb` is fastft's RoPE kernel
(a shadow module, `fastft.integration.patching.rope_binding.bound.<module>.<backend>[_partial]`). A module whose
function rotates only each head's first cos.shape[-1] dims (Phi-3's partial_rotary_factor; the table's
`partial_rotary`) gets fastft's RoPE on those dims and the rest passed through, as its own function does.
Nothing global changes: unpatched models of the same architecture, in any thread, keep transformers' function;
the forward stays a plain function, so torch.compile traces it without graph breaks.

transformers' decorators around it (argument shims such as `deprecate_kwarg("past_key_values" -> "cache")`) are
put back around the rebuilt function: each wrapper copied with the closure cell that held the function it wraps
holding the rebuilt one (left out, an attention called with the old name ignored it: an unfilled KV cache).
"""
from __future__ import annotations

import functools
import inspect
import sys
import types

import torch

from fastft.ops.rope import rope

ROPE_NAME = "apply_rotary_pos_emb"


def _fastft_rope(backend: str, partial: bool):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        return rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, backend=backend)

    def apply_partial_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        rotary = cos.shape[-1]
        if rotary == q.shape[-1]:
            return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
        q_rot, k_rot = rope(q[..., :rotary], k[..., :rotary], cos, sin, unsqueeze_dim=unsqueeze_dim, backend=backend)
        return torch.cat([q_rot, q[..., rotary:]], dim=-1), torch.cat([k_rot, k[..., rotary:]], dim=-1)

    return apply_partial_rotary_pos_emb if partial else apply_rotary_pos_emb


def calls_rope(cls: type) -> bool:
    """Whether cls.forward's own code looks up the module-level RoPE function."""
    fn = inspect.unwrap(cls.forward)
    return ROPE_NAME in fn.__code__.co_names and ROPE_NAME in fn.__globals__


_OWN_NAMES = ("__name__", "__spec__", "__loader__", "__package__", ROPE_NAME)


def _shadow_module(fn, backend: str, partial: bool) -> types.ModuleType:
    """A module holding a copy of fn's module globals with fastft's RoPE in them, registered in sys.modules
    under its own name (torch.compile resolves a function's globals through its module name). The copy is brought
    up to date at every call (every patch_model): a global replaced since (another library's or a test's wrapper
    of eager_attention_forward) is seen by models patched from then on, and by those patched before."""
    name = f"{__name__}.bound.{fn.__module__.replace('.', '_')}.{backend}{'_partial' if partial else ''}"
    module = sys.modules.get(name)
    if module is None:
        module = types.ModuleType(name)
        module.__dict__[ROPE_NAME] = _fastft_rope(backend, partial)
        sys.modules[name] = module
    module.__dict__.update({k: v for k, v in fn.__globals__.items() if k not in _OWN_NAMES})
    return module


def forward_with_fastft_rope(cls: type, backend: str, partial: bool = False):
    """cls.forward's function with `apply_rotary_pos_emb` resolved to fastft's RoPE (one per class, backend and
    `partial`: rotate the leading cos.shape[-1] dims of each head only)."""
    _shadow_module(inspect.unwrap(cls.forward), backend, partial)
    return _bound_forward(cls, backend, partial)


@functools.lru_cache(maxsize=None)
def _bound_forward(cls: type, backend: str, partial: bool):
    fn = inspect.unwrap(cls.forward)
    scope = _shadow_module(fn, backend, partial).__dict__
    return _rewrapped(cls.forward, _copied(fn, scope, fn.__closure__))


def _copied(fn, scope: dict, closure):
    new = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ else None
    new.__qualname__, new.__doc__ = fn.__qualname__, fn.__doc__
    new.__dict__.update(fn.__dict__)
    return new


def _rewrapped(outer, rebuilt):
    """`outer`'s chain of functools.wraps wrappers around `rebuilt` (in place of the innermost function). A wrapper
    that does not hold the function it wraps in a closure cell cannot be copied: the chain stops there."""
    chain = []
    while hasattr(outer, "__wrapped__"):
        chain.append(outer)
        outer = outer.__wrapped__
    result = rebuilt
    for wrapper in reversed(chain):
        inner, cells = wrapper.__wrapped__, wrapper.__closure__ or ()
        held = [i for i, cell in enumerate(cells) if _contents(cell) is inner]
        if not held:
            return result
        closure = tuple(types.CellType(result) if i in held else cell for i, cell in enumerate(cells))
        outer_copy = _copied(wrapper, wrapper.__globals__, closure)
        outer_copy.__wrapped__ = result
        result = outer_copy
    return result


def _contents(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None
