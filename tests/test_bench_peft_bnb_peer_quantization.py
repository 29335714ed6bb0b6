"""The peft+bnb QLoRA peer quantizes as transformers' BitsAndBytesConfig(load_in_4bit=True) would: every decoder
linear becomes an NF4 Linear4bit with double quantization (compress_statistics) and blocks of 64, the output head
stays dense; and the peer's QLoRA rows, Liger's included, need bitsandbytes (a missing one is a "not installed"
row, not an error mid-run)."""
import importlib.util

import pytest
from torch import nn

from fastft.apps.bench import peers


def test_decoder_linears_are_nf4_with_double_quantization_and_the_head_stays_dense():
    bnb = pytest.importorskip("bitsandbytes")
    from fastft.apps.bench.shapes import build_model

    model = peers.quantize_with_bnb(build_model(shape="tiny", seq_len=16))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert type(linears.pop("lm_head")) is nn.Linear
    assert len(linears) == 2 * 7 and all(isinstance(m, bnb.nn.Linear4bit) for m in linears.values())
    for name, module in linears.items():
        weight = module.weight
        assert weight.quant_type == "nf4" and weight.blocksize == 64, name
        assert weight.compress_statistics and weight.quant_state.nested, name
    assert model.is_loaded_in_4bit


@pytest.mark.parametrize("implementation", ["peft", "liger"])
def test_the_peers_qlora_rows_need_bitsandbytes(monkeypatch, implementation):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        real(name, *a) if name != "liger_kernel" else object())
    assert peers.missing_package(implementation, "qlora") == "bitsandbytes"
    assert peers.missing_package(implementation, "lora") is None
    assert peers.missing_package("fastft", "qlora") is None
