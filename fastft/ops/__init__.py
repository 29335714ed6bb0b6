"""Autograd ops with their pure-torch references beside them."""
from fastft.ops.lora import lora_linear, lora_linear_reference

__all__ = ["lora_linear", "lora_linear_reference"]
