"""Forwards for transformers' RMSNorm and gated-MLP modules through fastft's layer ops, and the attention forward's
wrapper: the projections in a patched attention or MLP save recipes for the norm and GLU outputs they read, made
again in backward (fastft.ops.recompute), not copies.

These are mixins, not modules with state of their own: `fastft.patch_model` puts one in front of a model's own
class (a subclass per original class, same name), so parameters, state dict, hooks and `isinstance` stay as
they were and `unpatch_model` only has to put the original class back. Class attributes set by the patcher:

- RMSNorm: `_fastft_offset` (0 Llama, 1 Gemma), `_fastft_cast` (fastft.ops.rms_norm's rounding: "input" Llama,
  "fp32" Gemma and OLMo2; None its default for the offset), `_fastft_eps_attr` (where the module keeps eps);
- MLP: `_fastft_gelu` (GeGLU instead of SwiGLU), `_fastft_gate_up` (one fused `gate_up_proj`, Phi-3),
  `_fastft_act_type` (the class of the activation module the config gives, which the fused op computes) and
  `_fastft_act_attr` (where the module keeps it: `act_fn`, Phi-3's `activation_fn`);
- both: `_fastft_backend` ("auto" | "triton" | "torch", as the ops take it).
"""
from __future__ import annotations

import functools

import torch

from fastft.ops.compiled import compiling
from fastft.ops.glu import geglu, swiglu
from fastft.ops.recompute import recomputed_outputs, remember
from fastft.ops.rms_norm import rms_norm
from fastft.ops.shared import forward_interceptor, resolve_backend


class FusedRMSNormForward:
    _fastft_offset = 0.0
    _fastft_cast = None  # None: rms_norm's default for the offset
    _fastft_eps_attr = "variance_epsilon"
    _fastft_backend = "auto"

    def forward(self, hidden_states):
        # the weight as this call reads it: made again in backward, `self.weight` may be another tensor by then
        # (accelerate's offload hooks put it back on the meta device after the forward)
        weight = self.weight

        def norm():
            return rms_norm(hidden_states, weight, getattr(self, self._fastft_eps_attr),
                            offset=self._fastft_offset, cast=self._fastft_cast, backend=self._fastft_backend)

        y = norm()
        # the projections reading y (in a patched attention or gated MLP) make it again in backward
        if y.requires_grad and not compiling() and self._keeps_input(hidden_states):
            remember(y, norm, (hidden_states, weight))
        return y

    def _keeps_input(self, x) -> bool:
        """Whether the norm's backward keeps x itself: the fused op does; the torch reference keeps its fp32 copy
        (x itself only when x is fp32)."""
        return x.dtype == torch.float32 or resolve_backend("rms_norm", self._fastft_backend, x.device, arg="x",
                                                           dtype=x.dtype) == "triton"


class FusedGLUMLPForward:
    """down_proj(act(gate_proj(x)) · up_proj(x)) with the activation and product in one op (the projections stay
    the model's own modules: plain, LoRA or NF4). With `_fastft_gate_up`, gate and up are the two halves of one
    `gate_up_proj(x)` (views: the op reads them in place)."""
    _fastft_gelu = False
    _fastft_gate_up = False
    _fastft_act_type = None
    _fastft_act_attr = "act_fn"
    _fastft_backend = "auto"

    def forward(self, x):
        act = self._modules.get(self._fastft_act_attr)
        if type(act) is not self._fastft_act_type or forward_interceptor(act) is not None:
            # act_fn replaced since patching (another activation) or hooked: the fused op would skip it
            return super().forward(x)
        glu = geglu if self._fastft_gelu else swiglu
        # the projections' saved inputs, x (a patched norm's output) and the GLU output, made again in backward
        with recomputed_outputs():
            if self._fastft_gate_up:
                gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            else:
                gate, up = self.gate_proj(x), self.up_proj(x)
            out = glu(gate, up, backend=self._fastft_backend)
            if gate.requires_grad and up.requires_grad:  # else the GLU's backward would not keep them
                remember(out, lambda: glu(gate, up, backend=self._fastft_backend), (gate, up))
            return self.down_proj(out)


@functools.lru_cache(maxsize=None)
def with_saved_inputs_made_again(forward):
    """An attention's forward inside recomputed_outputs(): its projections' saved copies of the patched input
    norm's output (q, k and v read it) are made again in backward from what the norm keeps. One wrapper per
    forward: a new one at every patch_model made a new attention class, so each patched model compiled afresh
    and past dynamo's recompile limit the next one ran eagerly."""
    @functools.wraps(forward)
    def attention_forward(self, *args, **kwargs):
        with recomputed_outputs():
            return forward(self, *args, **kwargs)

    return attention_forward
