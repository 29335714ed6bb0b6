"""Review fixes in the prompt-learning rooms: generate inside peft's disable_adapter() is the base model's, and
prefix tuning refuses reentrant gradient checkpointing up front."""
import pytest
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

import fastft
from tests.methods_utils import assert_same_step, ids, perturb_trainables, step
from tests.utils import tiny_llama

CONFIGS = {
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "ptuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
}
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")


def _generate(model, x):
    with torch.no_grad():
        return model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_generate_inside_disable_adapter_is_the_base_models(method):
    """peft's disable_adapter() for prompt learning swaps forward and prepare_inputs_for_generation only; fastft's
    generate put the virtual tokens / prefix in regardless."""
    x = ids(seq=5)
    want = _generate(tiny_llama(), x)
    model = fastft.get_peft_model(tiny_llama(), CONFIGS[method]())
    perturb_trainables(model, std=1.0)
    model.eval()
    with model.disable_adapter():
        disabled = _generate(model, x)
    assert torch.equal(disabled, want), f"{method}: generate inside disable_adapter() differs from the base model"
    assert not torch.equal(_generate(model, x), want), f"{method}: the adapter no longer changes generate"


def _prefix_model(proj: bool):
    model = fastft.get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                                   prefix_projection=proj, encoder_hidden_size=16))
    perturb_trainables(model, std=0.5)
    return model.train()


@pytest.mark.parametrize("kwargs", [{"use_reentrant": True}, {}, None])
def test_prefix_refuses_reentrant_checkpointing(kwargs):
    """Reentrant checkpointing cannot route gradients to the prefix each layer takes by keyword (backward failed with
    "Trying to backward through the graph a second time"): a ValueError naming the way out, before any compute.
    {} leaves use_reentrant to torch's default (True); None is transformers' default (non-reentrant)."""
    model = _prefix_model(proj=True)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if kwargs is None:
        model(input_ids=ids(), labels=ids()).loss.backward()
        return
    with pytest.raises(ValueError, match=r'gradient_checkpointing_kwargs=\{"use_reentrant": False\}'):
        model(input_ids=ids(), labels=ids())
    with torch.no_grad():  # no gradients, nothing recomputed: the forward still runs
        model(input_ids=ids())
    model.eval()
    model(input_ids=ids())


@pytest.mark.parametrize("proj", [False, True])
def test_prefix_non_reentrant_checkpointing_equals_none(proj):
    want = step(_prefix_model(proj), ids())
    model = _prefix_model(proj)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same_step(step(model, ids()), want, f"prefix tuning (projection={proj}) with non-reentrant checkpointing")
