"""torch.save / pickle of a patched model failed with pickle's "Can't pickle <class LlamaForCausalLM>: it's not the
same object as ..." naming transformers' class; the error now says the model is patched and what to do. Deep copies
of patched models keep working (they do not look the class up by name)."""
import copy
import io
import pickle

import pytest
import torch
from peft import LoraConfig

import fastft
from tests.utils import tiny_llama


@pytest.mark.parametrize("wrapped", [False, True])
def test_pickling_a_patched_model_names_the_patch(wrapped):
    model = fastft.patch_model(tiny_llama())
    if wrapped:
        model = fastft.get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"cannot pickle a patched model .* fastft.unpatch_model\(model\)"):
        torch.save(model, io.BytesIO())
    with pytest.raises(TypeError, match=r"cannot pickle a patched model"):
        pickle.dumps(model)


def test_a_deep_copy_of_a_patched_model_is_patched_and_computes_the_same():
    model = fastft.patch_model(tiny_llama())
    twin = copy.deepcopy(model)
    assert type(twin.model.layers[0].mlp) is type(model.model.layers[0].mlp)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids).logits, model(input_ids=ids).logits)
    fastft.unpatch_model(twin)  # the copy unpatches on its own and then pickles
    buffer = io.BytesIO()
    torch.save(twin, buffer)
    assert type(model.model.layers[0].mlp) is not type(twin.model.layers[0].mlp)
