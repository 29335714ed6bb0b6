"""An IA3 layer whose base layer carries a hook (a user's forward hook, accelerate's offload) calls that base layer,
so the hook runs, as peft's IA3 layer does: the fused op, which reads the weight itself, stands in for plain layers
only. Nothing tested it (a mutation run dropped the check: the hook was skipped silently)."""
import torch
from peft import IA3Config

import fastft.integration.methods.ia3 as ia3_layer
from tests.methods_utils import assert_same_step, fastft_and_peft, ids, step


def _config():
    return IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])


def _hook_every_base(model, name: str):
    for module_name, module in model.named_modules():
        if module_name.endswith(name) and hasattr(module, "get_base_layer"):
            module.get_base_layer().register_forward_hook(lambda mod, args, out: out * 1.5 + 0.25)


def test_hooked_base_layers_run_their_hooks_as_in_peft(monkeypatch):
    ours, theirs = fastft_and_peft(_config)
    for model in (ours, theirs):
        _hook_every_base(model, "q_proj")     # output-scaled IA3
        _hook_every_base(model, "down_proj")  # input-scaled (feed-forward) IA3
    calls = []
    fused = ia3_layer.ia3_linear
    monkeypatch.setattr(ia3_layer, "ia3_linear", lambda *a, **k: (calls.append(1), fused(*a, **k))[1])
    batch = ids()
    assert_same_step(step(ours, batch), step(theirs, batch), "IA3 with hooked base layers")
    layers = ours.get_base_model().model.layers
    assert len(calls) == len(layers)  # the unhooked v_proj layers stay fused: one a decoder layer
    with torch.no_grad():  # the hooks change the model: without them the outputs differ
        hooked = ours(input_ids=batch).logits
    for layer in layers:
        for module in (layer.self_attn.q_proj, layer.mlp.down_proj):
            module.get_base_layer()._forward_hooks.clear()
    with torch.no_grad():
        assert not torch.allclose(ours(input_ids=batch).logits, hooked)
