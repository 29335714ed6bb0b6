"""parameter_counts' trainable count is what requires grad, as peft's get_nb_trainable_parameters counts it, on a
LoRA model whose base is frozen. Mutation run 18: counting every parameter as trainable passed every test (the
existing one checks totals). Against peft."""
import peft
from peft import LoraConfig

from fastft.integration.parameter_count import parameter_counts
from tests.utils import tiny_llama


def test_trainable_and_total_match_peft():
    model = peft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, total = parameter_counts(model)
    assert (trainable, total) == model.get_nb_trainable_parameters() and trainable < total
