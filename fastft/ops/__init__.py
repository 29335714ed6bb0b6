"""Autograd ops with their pure-torch references beside them."""
from fastft.ops.attention import attention_reference, flash_attention  # noqa: F401
from fastft.ops.lora import lora_linear, lora_linear_reference

__all__ = ["lora_linear", "lora_linear_reference"]
