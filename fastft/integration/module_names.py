"""Module-name entries as peft matches them (`names_module`), and for one that matches nothing (a typo in
target_modules, exclude_modules, modules_to_save, a quantization skip list) the suggestion every such error ends
with (`name_hint`)."""
from __future__ import annotations

import difflib


def names_module(entry: str, name: str) -> bool:
    """Whether a list entry of peft's target_modules (exclude_modules, ...) names module `name`: the whole name or
    a dotted suffix of it."""
    return name == entry or name.endswith("." + entry)


def name_hint(entry: str, names: list[str], cutoff: float = 0.6) -> str:
    """'did you mean ...?' from the last parts of the model's module `names`, closest to the last part of `entry`
    (a dotted entry such as "mlp.downproj" is compared by "downproj"); `cutoff`: difflib's, the least similarity."""
    parts = sorted({n.rsplit(".", 1)[-1] for n in names})
    close = difflib.get_close_matches(entry.rsplit(".", 1)[-1], parts, n=1, cutoff=cutoff)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"name a module of the model (or the last part of its name; they end in {parts[:20]})"
