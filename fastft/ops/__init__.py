"""Autograd ops with their pure-torch references beside them."""
from fastft.ops.attention import attention_reference, flash_attention
from fastft.ops.dora import dora_linear, dora_linear_reference
from fastft.ops.glu import geglu, geglu_reference, swiglu, swiglu_reference
from fastft.ops.ia3 import ia3_linear, ia3_linear_reference
from fastft.ops.linear_losses import (linear_cross_entropy, linear_cross_entropy_reference, linear_distill_loss,
                                      linear_distill_loss_reference, linear_dpo_loss, linear_dpo_loss_reference,
                                      linear_kl_div, linear_kl_div_reference,
                                      linear_sequence_logprobs, linear_sequence_logprobs_reference,
                                      checked_on_host, lm_head_cross_entropy)
from fastft.ops.lora import lora_linear, lora_linear_reference
from fastft.ops.qlora import nf4_linear, nf4_linear_reference, qlora_linear, qlora_linear_reference
from fastft.ops.qlora_path import release_dequant_scratch
from fastft.ops.rms_norm import rms_norm, rms_norm_reference
from fastft.ops.rope import rope, rope_, rope_cos_sin, rope_reference

__all__ = ["attention_reference", "dora_linear", "dora_linear_reference", "flash_attention", "geglu", "geglu_reference",
           "ia3_linear", "ia3_linear_reference", "linear_cross_entropy", "linear_cross_entropy_reference",
           "linear_distill_loss", "linear_distill_loss_reference", "linear_dpo_loss", "linear_dpo_loss_reference", "linear_kl_div", "linear_kl_div_reference",
           "linear_sequence_logprobs", "linear_sequence_logprobs_reference", "checked_on_host",
           "lm_head_cross_entropy", "lora_linear",
           "lora_linear_reference", "nf4_linear", "nf4_linear_reference", "qlora_linear", "qlora_linear_reference",
           "release_dequant_scratch", "rms_norm", "rms_norm_reference", "rope", "rope_", "rope_cos_sin", "rope_reference", "swiglu",
           "swiglu_reference"]
