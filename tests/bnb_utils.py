"""Models transformers loads with bitsandbytes 4-bit configs, and their dense references, for the tests of fastft's
taking of such models (tests/test_bitsandbytes_nf4_model_runs_fastft_kernels.py, its FSDP worker, the CUDA test in
tests/test_nf4_gpu.py)."""
import bitsandbytes as bnb
import torch
import transformers

from fastft.modules.nf4_linear import is_conv1d


def load_bnb(path, quant_type="nf4", double_quant=True, dtype=torch.float32, compute_dtype=torch.float32, device=None,
             **options):
    """`options`: more BitsAndBytesConfig fields (bnb_4bit_quant_storage=...); device: transformers' device_map."""
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                             bnb_4bit_use_double_quant=double_quant,
                                             bnb_4bit_compute_dtype=compute_dtype, **options)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=config,
                                                             device_map=device)


def bnb_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def dequantized_twin(path, device=None, **quantization):
    """The fp32 dense model holding bitsandbytes' dequantized weights (a Conv1D's transposed back): the reference
    (bitsandbytes' own CPU 4-bit layer is ~2e-3 off x·Wᵀ of its dequantized W in fp32, so not one)."""
    quantized = load_bnb(path, device=device, **quantization)
    dense = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device or "cpu")
    with torch.no_grad():
        for name, layer in bnb_layers(quantized).items():
            w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            target = dense.get_submodule(name)
            target.weight.copy_(w.t() if is_conv1d(target) else w)
    return dense
