"""Shared test helpers."""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Triton kernels on CPU tensors need the interpreter (set by conftest when there is no GPU).
interpreter_only = pytest.mark.skipif(not INTERPRET, reason="runs Triton kernels on the CPU via TRITON_INTERPRET=1")

# Relative error bounds per dtype (‖out − ref‖ / ‖ref‖ against an fp64 reference).
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output has NaN/Inf"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out, ref, dtype, what=""):
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3e} > {TOL[dtype]:.1e} ({dtype})"


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def assert_repeats_bit_identical(step, want, times: int) -> None:
    """step() run `times` times on the GPU (synchronized after each: a stream race shows as a difference), each time
    returning tensors equal bit for bit to `want`."""
    for _ in range(times):
        got = step()
        torch.cuda.synchronize()
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)


def tiny_llama(seed: int = 0, **overrides):
    """A small random Llama (GQA, 2 layers) for integration tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def randomize_lora_B(model, std: float = 0.1, seed: int = 1):
    """peft initialises B to zero (LoRA starts as a no-op); make the adapters do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def check_nf4_linear_fp64(tokens: tuple, dtype):
    """nf4_linear (Triton backend) on a 33×96 NF4 weight with bias: y, dx and db against fp64 on the dequantized W."""
    from fastft.ops import nf4_linear
    from fastft.quant import quantize_nf4

    w = quantize_nf4(torch.randn(33, 96, dtype=dtype) * 0.05, blocksize=32)
    x = torch.randn(*tokens, 96, dtype=dtype, requires_grad=True)
    bias = torch.randn(33, dtype=dtype, requires_grad=True)
    y = nf4_linear(x, w, bias, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    W = w.dequantize(torch.float32).double()
    lead = tuple(range(len(tokens)))
    assert_close(y, x.detach().double() @ W.T + bias.detach().double(), dtype, "y")
    assert_close(x.grad, dy.double() @ W, dtype, "dx")
    assert_close(bias.grad, dy.double().sum(lead), dtype, "db")


def first_layers(model, n: int = 6):
    """The real model cut to its first n decoder layers: its real weights, head layout and tied head, at a fraction
    of the CPU time (the other layers repeat the same shapes and code)."""
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = n
    return model


def cache_kwarg(cache, of=None) -> dict:
    """A decoding step's cache argument to `of` (default LlamaModel.forward): `cache` since transformers 5.2x (which
    still takes past_key_values, with a warning), `past_key_values` before (5.17, the GPU machine's, puts an unknown
    `cache` into **kwargs: no cache; its create_causal_mask refuses it)."""
    import inspect

    from transformers import LlamaModel

    name = "cache" if "cache" in inspect.signature(of or LlamaModel.forward).parameters else "past_key_values"
    return {name: cache}


def known_model_types(*names) -> list:
    """pytest parameters: each model type, skipped (saying so) where the installed transformers has no such type
    (the GPU machine's 5.17 predates EXAONE, InternLM3 and IQuestCoder)."""
    import pytest
    import transformers
    from transformers import CONFIG_MAPPING

    return [pytest.param(name, marks=pytest.mark.skipif(
        name not in CONFIG_MAPPING, reason=f"transformers {transformers.__version__} has no model type {name!r}"))
        for name in names]


def first_inf_loss_scale(model, ids, exponents: range) -> int:
    """The first k in `exponents` whose loss scale 2^k gives a trainable parameter an inf/nan gradient (GradScaler's
    found_inf) in one scaled backward of the causal-LM loss on `ids`; exponents.stop when none does."""
    params = [p for p in model.parameters() if p.requires_grad]
    for k in exponents:
        model.zero_grad(set_to_none=True)
        (model(input_ids=ids, labels=ids).loss * 2.0**k).backward()
        if not all(torch.isfinite(p.grad).all() for p in params):
            return k
    return exponents.stop


def graphs_per_training_call(compiled, ids, calls: int = 3) -> list[int]:
    """How many graphs dynamo compiled at each of `calls` forward + backward calls of `compiled` on `ids`."""
    from torch._dynamo.utils import counters

    graphs = []
    for _ in range(calls):
        before = counters["stats"]["unique_graphs"]
        compiled(input_ids=ids, labels=ids).loss.backward()
        graphs.append(counters["stats"]["unique_graphs"] - before)
    return graphs
