"""What the kernel families share that needs no triton, so the ops can import it on an install without triton (an
optional dependency: `pip install 'fastft[triton]'`); the kernels take these names from here too."""
from __future__ import annotations

from fastft.kernels.runtime import next_power_of_2

# attention's "no limit" for left/right (the ops clamp larger windows to it); sums with positions stay in int32
UNBOUNDED = 1 << 30


def bucket(n: int) -> int:
    """Tuning keys use powers of two so token counts that change every step do not re-tune every step."""
    return next_power_of_2(max(1, int(n)))
