"""attn_implementation="fastft" on a model whose head_dim is above what the kernels take (260 > 256): the error named
264, the size the integration pads it to, not the model's 260, and said nothing of what to load instead."""
import pytest
import torch

import fastft
from tests.utils import tiny_llama


def test_a_head_dim_above_the_kernels_names_the_models_size_and_the_way_out():
    fastft.register_attention()
    model = tiny_llama(head_dim=260, num_attention_heads=2, num_key_value_heads=1)
    model.set_attn_implementation("fastft")
    with pytest.raises(ValueError, match=r"the model's head_dim is 260 .* up to 256: load the model with "
                                         r"attn_implementation='sdpa' or 'eager'"):
        model(input_ids=torch.randint(0, 128, (1, 5)))
