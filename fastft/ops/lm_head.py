"""What the fused linear losses need to know of an lm_head: its weight (dense or NF4), bias, LoRA factors.

`head_of_module` reads an nn.Linear, a module whose `.weight` is an NF4Weight (fastft's NF4Linear), or a peft
LoRA Linear (peft's own, fastft's FusedLoraLinear / FusedQLoraLinear) around either, or peft's
ModulesToSaveWrapper (a trainable copy of lm_head) around any of them, by duck typing for fastft's own classes
(the ops layer does not import fastft.modules), or peft's trainable tokens over an nn.Linear (TrainableTokensWrapper:
`trainable_token_indices` with tied embeddings; its weight is the head's with the trainable rows swapped in).
Anything else is refused with the list of what is supported.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastft.ops.lora import stacked_adapters
from fastft.ops.shared import check as shared_check, computes_linear, forward_interceptor, hook_device
from fastft.quant.nf4_weight import NF4Weight

SUPPORTED = ("torch.nn.Linear (or a subclass whose forward is nn.Linear's)", "fastft NF4Linear (an NF4Weight .weight)",
             "peft LoRA Linear (peft.tuners.lora.Linear, fastft FusedLoraLinear / FusedQLoraLinear) over either",
             "peft ModulesToSaveWrapper (modules_to_save) around any of these",
             "peft TrainableTokensWrapper / TrainableTokensLayer (trainable_token_indices) over an nn.Linear")


@dataclass
class HeadArgs:
    """logits = h·Wᵀ + b + scaling·(dropout(h)·Aᵀ)·Bᵀ; W is `weight` (dense) or `nf4`."""
    weight: torch.Tensor | None = None
    nf4: NF4Weight | None = None
    bias: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float = 1.0
    dropout_p: float = 0.0

    @property
    def vocab(self) -> int:
        return (self.weight if self.weight is not None else self.nf4).shape[0]

    def validate(self, op: str, hidden: torch.Tensor, hidden_name: str = "hidden", weight_name: str = "weight") -> None:
        def check(cond, message):  # fastft.ops.shared.check (lazy messages), each prefixed with the op's name
            shared_check(cond, lambda: f"{op}: {message() if callable(message) else message}")

        w = self.weight if self.weight is not None else self.nf4
        check(hidden.dim() >= 1, lambda: f"`{hidden_name}` needs a last (hidden) dimension")
        check(len(w.shape) == 2, lambda: f"`{weight_name}` must be 2-D (vocab, hidden), got shape {tuple(w.shape)}")
        V, H = w.shape
        check(V >= 1, lambda: f"`{weight_name}` has no rows (vocab size 0)")
        check(hidden.shape[-1] == H, lambda: f"`{hidden_name}` has {hidden.shape[-1]} features in its last dimension "
                                             f"but `{weight_name}` {tuple(w.shape)} expects {H}")
        check(hidden.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64),
              lambda: f"`{hidden_name}` must be fp32, fp16, bf16 (or fp64), got {hidden.dtype}")
        if self.weight is not None:
            check(self.weight.dtype == hidden.dtype,
                  lambda: f"`{hidden_name}` is {hidden.dtype} but `{weight_name}` is {self.weight.dtype}; cast one of "
                          "them or run under torch.autocast")
        check(w.device == hidden.device,
              lambda: f"`{hidden_name}` is on {hidden.device} but `{weight_name}` on {w.device}")
        if self.bias is not None:
            check(isinstance(self.bias, torch.Tensor) and self.bias.is_floating_point()  # (any float dtype: cast below)
                  and tuple(self.bias.shape) == (V,),
                  lambda: f"`bias` must be a floating-point tensor of shape ({V},), got "
                          + (f"{self.bias.dtype} of shape {tuple(self.bias.shape)}"
                             if isinstance(self.bias, torch.Tensor) else type(self.bias).__name__))
            check(self.bias.device == hidden.device, lambda: f"`bias` is on {self.bias.device} but `{hidden_name}` on "
                                                     f"{hidden.device}")
            if self.bias.dtype != hidden.dtype:
                self.bias = self.bias.to(hidden.dtype)
        if self.lora_A is not None:
            r = self.lora_A.shape[0]
            check(tuple(self.lora_A.shape) == (r, H) and tuple(self.lora_B.shape) == (V, r),
                  lambda: f"LoRA factors must be A ({r}, {H}) and B ({V}, {r}), got {tuple(self.lora_A.shape)} and "
                  f"{tuple(self.lora_B.shape)}")


def _base_head(op: str, base: nn.Module, what: str) -> HeadArgs:
    weight = getattr(base, "weight", None)
    if isinstance(weight, NF4Weight):
        return HeadArgs(nf4=weight, bias=getattr(base, "bias", None))
    # the fused losses read the weight instead of calling the head: only where its forward is x·Wᵀ + b
    if type(base) is nn.Linear or (computes_linear(base) and type(weight) in (torch.Tensor, nn.Parameter)):
        return HeadArgs(weight=base.weight, bias=base.bias)
    raise TypeError(f"{op}: `lm_head` {what + ' ' if what else ''}is a {type(base).__module__}.{type(base).__name__}; "
                    "supported: "
                    + "; ".join(SUPPORTED))


def _is_trainable_tokens(module: nn.Module) -> bool:
    try:  # (peft >= 0.15)
        from peft.tuners.trainable_tokens import TrainableTokensLayer
        from peft.utils.other import TrainableTokensWrapper
    except ImportError:
        return False
    return isinstance(module, (TrainableTokensWrapper, TrainableTokensLayer))


def _trainable_tokens_head(op: str, lm_head: nn.Module, check_only: bool) -> HeadArgs | None:
    """peft's trainable tokens on lm_head, as its forward computes them: the base layer while the adapters are
    disabled, none is active or they are merged into its weight; else F.linear(h, W) with W the base weight whose
    trainable rows are replaced by their deltas (a differentiable copy, so the deltas get their gradients through
    it) and, as peft's forward has it, no bias."""
    layer = getattr(lm_head, "token_adapter", lm_head)  # the wrapper always runs its layer (active or not)
    base = layer.base_layer
    active = layer.active_adapters
    if layer.disable_adapters or not active:
        if layer.merged and not check_only:
            layer.unmerge()  # what peft's forward does here: the base weight without the merged rows
        return None if check_only else _base_head(op, base, "base layer")
    if layer.merged:
        return None if check_only else _base_head(op, base, "base layer")
    # peft's forward takes an nn.Linear only; its rows are swapped in a dense weight (not an NF4 one)
    if not isinstance(base, nn.Linear) or _base_head(op, base, "base layer").weight is None:
        raise TypeError(f"{op}: `lm_head` has trainable tokens over a {type(base).__module__}.{type(base).__name__}; "
                        "supported over a dense nn.Linear only")
    layer._check_overlapping_tokens(active)  # peft's ValueError for adapters sharing a token
    if check_only:
        return None
    return HeadArgs(weight=layer.get_merged_weights(active))


def head_of_module(op: str, lm_head: nn.Module, *, check_only: bool = False) -> HeadArgs | None:
    """The fused losses' view of `lm_head` (HeadArgs), or TypeError/ValueError for a head they do not take.
    check_only: the checks alone, for a caller that wants the verdict every step (several adapters' factors are
    concatenated only when the loss runs)."""
    if not isinstance(lm_head, nn.Module):
        raise TypeError(f"{op}: `lm_head` must be an nn.Module, got {type(lm_head).__name__}")
    device = hook_device(lm_head)  # calling the head runs there (a model spread over GPUs by device_map)
    for name, module in lm_head.named_modules():
        why = forward_interceptor(module, device)
        if why is not None:  # the fused loss reads the weights; calling the head runs what intercepts it
            raise ValueError(f"{op}: `lm_head`{'.' + name if name else ''} has {why}, which the fused loss would "
                             "skip (it reads the weights instead of calling the module)")
    try:
        from peft.tuners.lora import Linear as PeftLoraLinear
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # peft is a dependency; without it there is no LoRA head to recognise
        PeftLoraLinear = ModulesToSaveWrapper = ()
    if _is_trainable_tokens(lm_head):
        return _trainable_tokens_head(op, lm_head, check_only)
    if isinstance(lm_head, ModulesToSaveWrapper):  # modules_to_save=["lm_head"]: the copy peft would run
        active = lm_head.active_adapters
        passthrough = lm_head.disable_adapters or not active or any(a not in lm_head.modules_to_save for a in active)
        return head_of_module(op, lm_head.original_module if passthrough else lm_head.modules_to_save[active[0]],
                              check_only=check_only)
    if not isinstance(lm_head, PeftLoraLinear):
        return _base_head(op, lm_head, "")
    if lm_head.disable_adapters and lm_head.merged and not check_only:
        lm_head.unmerge()  # what peft's forward does here: the base weight without the merged delta
    base = _base_head(op, lm_head.get_base_layer(), "base layer")
    names = [a for a in lm_head.active_adapters if a in lm_head.lora_A]
    if lm_head.disable_adapters or lm_head.merged or not names:
        return base  # merged adapters live in the base weight; disabled ones do nothing
    if lm_head.fan_in_fan_out:
        raise ValueError(f"{op}: `lm_head` LoRA with fan_in_fan_out=True is not supported")
    dropouts = set()
    for name in names:
        if name in getattr(lm_head, "lora_variant", {}):
            raise ValueError(f"{op}: `lm_head` adapter {name!r} is a LoRA variant "
                             f"({type(lm_head.lora_variant[name]).__name__}, e.g. DoRA): not supported by the fused loss")
        if lm_head.lora_bias.get(name, False):
            raise ValueError(f"{op}: `lm_head` adapter {name!r} has lora_bias=True: not supported by the fused loss")
        dropout = lm_head.lora_dropout[name]
        if isinstance(dropout, nn.Identity):
            dropouts.add(0.0)
        elif type(dropout) is nn.Dropout:
            dropouts.add(float(dropout.p) if dropout.training else 0.0)
        else:
            raise ValueError(f"{op}: `lm_head` adapter {name!r} has a {type(dropout).__name__} as lora_dropout; only "
                             "nn.Dropout / nn.Identity are supported")
    if len(names) > 1 and dropouts != {0.0}:  # peft draws each adapter's mask on its own (as FusedLoraBase says)
        raise ValueError(f"{op}: `lm_head` active adapters {names} have dropout (rates {sorted(dropouts)}); peft draws "
                         "a mask per adapter, the fused loss would draw one for all of them")
    if check_only:  # the verdict only (a fused loss takes this head): no concatenated factors built
        return None
    dropout_p = dropouts.pop()
    if len(names) == 1:
        name = names[0]
        A, B, scaling = lm_head.lora_A[name].weight, lm_head.lora_B[name].weight, float(lm_head.scaling[name])
    else:  # several active adapters are one LoRA of summed rank
        A, B, scaling = stacked_adapters(lm_head.lora_A, lm_head.lora_B, lm_head.scaling, names)
    return HeadArgs(weight=base.weight, nf4=base.nf4, bias=base.bias, lora_A=A, lora_B=B, scaling=scaling,
                    dropout_p=dropout_p)
