"""An NF4 weight written in place (copy_, a model's load_state_dict) and then copied (clone, a move, a dtype cast
of the model: .half() / .bfloat16()) before its offset was read again: the copy paired its new tensor with the
old cached float, so it decoded other weights (logits 1.2 off at scale 0.7; single weights up to 6 off)."""
import copy

import pytest
import torch

import fastft
from fastft.modules.nf4_linear import NF4Linear
from fastft.quant import quantize_nf4
from tests.utils import tiny_llama


@pytest.mark.parametrize("copy_of", [lambda w: w.clone(), lambda w: w.detach(),
                                     lambda w: w.to("cpu", copy=True)], ids=["clone", "detach", "to_copy"])
def test_a_copy_after_copy_into_the_weight_decodes_the_new_values(copy_of):
    g = torch.Generator().manual_seed(0)
    a = quantize_nf4(torch.randn(64, 256, generator=g) + 0.5)
    b = quantize_nf4(torch.randn(64, 256, generator=g) * 3.0 - 2.0)
    assert a.offset != b.offset  # read: a's float is cached
    a.copy_(b)
    assert torch.equal(copy_of(a).dequantize(), b.dequantize())


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_a_quantized_model_loaded_then_cast_matches_its_source(cast):
    source = fastft.quantize_model(tiny_llama(seed=1), "nf4")
    with torch.no_grad():  # another offset than the target's
        for module in source.modules():
            if isinstance(module, NF4Linear):
                module.weight.copy_(quantize_nf4(module.weight.dequantize() * 5 + 0.3))
    target = fastft.quantize_model(tiny_llama(seed=2), "nf4")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        target(input_ids=ids)  # every offset read and cached
        target.load_state_dict(source.state_dict())
        source, target = getattr(copy.deepcopy(source), cast)(), getattr(target, cast)()
        assert torch.equal(target(input_ids=ids).logits, source(input_ids=ids).logits)
