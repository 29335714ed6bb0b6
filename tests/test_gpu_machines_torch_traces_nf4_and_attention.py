"""What torch 2.11's dynamo (the GPU machine's) does differently, found by running the suite there on the CPU
(scripts/test-gpu-stack.sh), kept here as checks CI's torch 2.13 can run.

- torch 2.11 puts `w.dequantize()` of an NF4Weight in the graph as a tensor method and runs it on fake inner tensors
  outside is_compiling(): the eager branch read the nested offset on the host, and every QLoRA path on the torch
  backend stopped its trace ("Could not guard on data-dependent expression"; `fastft train --compile --method qlora`,
  a compiled QLoRA DPO step). Fake inner tensors now take the traced branch, as under is_compiling().
- torch 2.11 cannot trace id() of a constant: the attention's mask notes keyed a module without a config by id(None).
"""
import builtins
import threading

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastft.quant import quantize_nf4


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_nf4_weight_of_fake_tensors_dequantizes_without_reading_its_offset(double_quant, dtype):
    torch.manual_seed(0)
    w = quantize_nf4(torch.randn(48, 64), blocksize=64, double_quant=double_quant)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = mode.from_tensor(w)
        assert type(fake) is type(w) and mode.is_our_fake(fake.packed)
        out = fake.dequantize(dtype)
        scales = fake.block_absmax()
    assert out.shape == (48, 64) and out.dtype == dtype and mode.is_our_fake(out)
    assert scales.shape == w.block_absmax().shape and scales.dtype == torch.float32


def test_a_rows_slice_of_fake_tensors_dequantizes_too():
    torch.manual_seed(0)
    w = quantize_nf4(torch.randn(64, 64), blocksize=64, double_quant=True)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = mode.from_tensor(w)[16:48].dequantize(torch.float32)
    assert out.shape == (32, 64)


class _Layer(torch.nn.Module):  # an attention module without a config (as in tests/test_compile_attention.py)
    is_causal = True
    layer_idx = 0


def test_the_attention_keys_a_module_without_a_config_without_id_of_none(monkeypatch):
    import fastft.integration.attention as integration
    import fastft.integration.attention_masks as masks

    def traceable_id(obj):  # as torch 2.11's dynamo: id() of a constant cannot be traced
        assert obj is not None, "id(None)"
        return builtins.id(obj)
    monkeypatch.setattr(masks, "id", traceable_id, raising=False)
    monkeypatch.setattr(integration, "_backend", "torch")
    # a module without a config reads the notes of the last mask built without one (its window, its documents): an
    # earlier test's, in the same worker, would apply here (a window of 4 did: 43% of the output off)
    for book in ("_mask_reach", "_packing_seen", "_recompute_notes"):
        monkeypatch.setattr(masks, book, {})
    monkeypatch.setattr(masks, "_thread_note", threading.local())
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    out = integration.fastft_attention_forward(_Layer(), q, k, v, None, scaling=0.25)[0]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25,
                                                                enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
