"""Triton kernels: pure functions on tensors, one op family per file. Import submodules directly.

triton is optional: runtime, autotune, host, nf4_codes and nf4_cpu import without it (the ops import them at module
level); the kernel families need it, so the ops import those inside the functions that launch them."""
