"""A checkpoint holding a packed 4-bit weight under a layer's name but its quantization state (absmax, quant_state)
under another name (fastft saves of Laguna and Inkling2 before transformers' renamings were reversed on save): the
loader took the uint8 codes for a dense weight and stopped with torch's "Only Tensors of floating point ... can
require gradients". It now names the weight and what is missing."""
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastft
from tests.utils import tiny_llama


def test_a_packed_weight_whose_state_is_stored_under_another_name_is_named(tmp_path):
    fastft.save_nf4_model(fastft.quantize_model(tiny_llama()), str(tmp_path))
    file = tmp_path / "model.safetensors"
    layer = "model.layers.0.mlp.up_proj.weight"
    state = {(k.replace("up_proj.weight.", "up_proj_renamed.weight.") if k.startswith(layer + ".") else k): t
             for k, t in load_file(file).items()}
    assert state[layer].dtype == torch.uint8 and f"{layer}.absmax" not in state
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"'{layer}' is stored as torch.uint8 .* without its quantization state"):
        fastft.load_nf4_model(str(tmp_path), dtype=torch.float32)
