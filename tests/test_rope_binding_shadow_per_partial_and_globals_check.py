"""fastft.integration.patching.rope_binding: one shadow module per modeling module, backend AND `partial` (a class
bound with partial rotary after another of its module was bound without must get the partial function, which passes
each head's dims past cos.shape[-1] through), and `calls_rope` only for a forward that reads the module-level
function (an attribute of the same name, e.g. `self.apply_rotary_pos_emb`, is not rebound by the shadow module)."""
import torch

from fastft.integration.patching.rope_binding import ROPE_NAME, calls_rope, forward_with_fastft_rope
from fastft.ops.rope import rope


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # this module's own: what a modeling module defines
    raise AssertionError("the shadow module's function must be called, not this one")


class FullRotary(torch.nn.Module):
    def forward(self, q, k, cos, sin):
        return apply_rotary_pos_emb(q, k, cos, sin)


class PartialRotary(torch.nn.Module):
    def forward(self, q, k, cos, sin):
        return apply_rotary_pos_emb(q, k, cos, sin)


# a modeling module without a module-level RoPE function, whose forward reads an attribute of that name
_OTHER_MODULE = {"__name__": "tests.fake_modeling_without_rope"}
exec("class ByAttribute:\n"
     "    def forward(self, q, k, cos, sin):\n"
     "        return self.apply_rotary_pos_emb(q, k, cos, sin)\n", _OTHER_MODULE)
ByAttribute = _OTHER_MODULE["ByAttribute"]


def test_calls_rope_needs_the_module_level_function():
    assert calls_rope(FullRotary)
    assert ROPE_NAME in ByAttribute.forward.__code__.co_names   # the name is there, as an attribute
    assert not calls_rope(ByAttribute)


def test_partial_and_full_bindings_of_one_module_are_kept_apart():
    full = forward_with_fastft_rope(FullRotary, "torch", False)
    partial = forward_with_fastft_rope(PartialRotary, "torch", True)
    assert full.__globals__[ROPE_NAME] is not partial.__globals__[ROPE_NAME]
    batch, heads, seq, head_dim, rotary = 1, 2, 4, 16, 8
    q, k = torch.randn(batch, heads, seq, head_dim), torch.randn(batch, heads, seq, head_dim)
    angle = torch.randn(batch, seq, rotary // 2)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    q_out, k_out = partial(None, q, k, cos, sin)                  # rotates the first `rotary` dims only
    assert torch.equal(q_out[..., rotary:], q[..., rotary:]) and torch.equal(k_out[..., rotary:], k[..., rotary:])
    assert not torch.allclose(q_out[..., :rotary], q[..., :rotary])
    q_rot, k_rot = rope(q[..., :rotary], k[..., :rotary], cos, sin, backend="torch")
    assert torch.equal(q_out[..., :rotary], q_rot) and torch.equal(k_out[..., :rotary], k_rot)
