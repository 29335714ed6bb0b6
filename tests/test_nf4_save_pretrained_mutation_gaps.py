"""Mutation gaps in fastft/integration/nf4_model.py's save_pretrained / finish_nf4_model (audit round 11).
Run from the repository root (imports tests.bnb_utils, tests.utils)."""
import peft
import pytest
from torch import nn

import fastft
from tests.bnb_utils import load_bnb
from tests.utils import tiny_llama


def nf4_llama():
    return fastft.quantize_model(tiny_llama(tie_word_embeddings=False, intermediate_size=128))


def test_save_pretrained_on_a_process_that_is_not_main_writes_nothing(tmp_path):
    """Trainer passes is_main_process=False on every rank but 0: not refused, and nothing written (kills
    is_main_process treated as an option to check)."""
    nf4_llama().save_pretrained(tmp_path / "out", is_main_process=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_save_pretrained_refuses_positional_options(tmp_path):
    """(kills `if args or unsupported` -> `if unsupported`)"""
    with pytest.raises(TypeError, match="which takes no positional options"):
        nf4_llama().save_pretrained(tmp_path / "out", True)


def test_a_merged_dense_model_saves_with_transformers_options(tmp_path):
    """A model without NF4 layers saves through transformers with the options given (kills the fallback dropping
    *args / **kwargs)."""
    lora = peft.LoraConfig(r=4, target_modules="all-linear")
    dense = fastft.merge_and_unload(fastft.get_peft_model(nf4_llama(), lora))
    dense.save_pretrained(tmp_path / "dense", max_shard_size=40_000)
    assert len(list((tmp_path / "dense").glob("*.safetensors"))) > 1


def test_a_model_without_save_pretrained_does_not_get_one():
    """A plain torch module quantized: no transformers save_pretrained / get_memory_footprint to replace, none added
    (kills the hasattr guard in finish_nf4_model dropped)."""
    model = fastft.quantize_model(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)),
                                  use_default_skip=False)
    assert any(type(m).__name__ == "NF4Linear" for m in model.modules())
    assert not hasattr(model, "save_pretrained") and not hasattr(model, "get_memory_footprint")


def test_a_refused_call_puts_back_an_instances_own_save_pretrained(tmp_path):
    """A save_pretrained set on the instance before (a user's wrapper) is the one put back when a call is refused
    (kills the undo popping it regardless)."""
    path = tmp_path / "tiny"
    tiny_llama(tie_word_embeddings=False, intermediate_size=128).save_pretrained(path)
    model = load_bnb(path)
    own = lambda *a, **k: "own"  # noqa: E731
    model.save_pretrained = own
    with pytest.raises(ValueError, match="nonexistent"):
        fastft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["nonexistent"]))
    assert model.save_pretrained is own
    assert "get_memory_footprint" not in vars(model)


def test_save_pretrained_refuses_an_unknown_option_given_as_none(tmp_path):
    """An option transformers' save_pretrained does not have is refused whatever its value (kills `k not in
    defaults` dropped, where an unknown option given as None passed as a 'default')."""
    with pytest.raises(TypeError, match=r"which takes no \['not_an_option'\]"):
        nf4_llama().save_pretrained(tmp_path / "out", not_an_option=None)


def test_quantize_model_again_takes_the_blocksize_the_model_holds():
    """A model quantized before with blocksize=128 (some layers skipped): quantizing the rest without options takes
    blocksize 128, not the 64 default refused as another layout (kills the held blocksize ignored)."""
    model = fastft.quantize_model(tiny_llama(tie_word_embeddings=False, intermediate_size=128), blocksize=128,
                                  skip=["down_proj"])
    fastft.quantize_model(model)
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "NF4Linear" and layer.weight.blocksize == 128
