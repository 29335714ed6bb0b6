"""Autograd ops with their pure-torch references beside them."""
from fastft.ops.attention import attention_reference, flash_attention
from fastft.ops.lora import lora_linear, lora_linear_reference

__all__ = ["attention_reference", "flash_attention", "lora_linear", "lora_linear_reference"]
