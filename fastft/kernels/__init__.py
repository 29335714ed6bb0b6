"""Triton kernels: pure functions on tensors, one op family per file. Import submodules directly."""
