"""NF4Weight / NF4Linear edge cases found in review: an in-place copy_ of a double-quantized weight (the cached
offset), share_memory, loading an NF4Weight (or FSDP2's DTensor of one) into a layer, assigning a dense weight,
the device a loaded weight goes to, split sizes that do not add up, dtype casts (kept, or refused) and
requires_grad (refused).
More on loading: tests/test_nf4_loading.py."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fastft.modules.nf4_linear import NF4Linear
from fastft.quant import NF4Weight, quantize_nf4

ROOT = Path(__file__).resolve().parent.parent


def _pair(double_quant=True):
    """Two 37×64 weights whose nested offsets (the block scales' mean) differ: ×3 scales every absmax."""
    x = torch.randn(37, 64)
    return quantize_nf4(x, double_quant=double_quant), quantize_nf4(x * 3, double_quant=double_quant)


# ----------------------------------------------------------------------------------------------
# 1. copy_ refreshes the cached offset

@pytest.mark.parametrize("double_quant", [True, False])
def test_copy_into_a_weight_decodes_with_the_new_offset(double_quant):
    dst, src = _pair(double_quant)
    view = dst[0:37]  # taken before the copy: shares dst's nested_offset tensor and its cached float
    assert dst.offset == view.offset  # caches filled
    assert dst.copy_(src) is dst
    assert dst.offset == src.offset and view.offset == src.offset
    assert torch.equal(dst.dequantize(), src.dequantize()) and torch.equal(view.dequantize(), src.dequantize())
    assert torch.equal(dst.block_absmax(), src.block_absmax()) and dst.kernel_operand().offset == src.offset

    param = nn.Parameter(_pair(double_quant)[0], requires_grad=False)  # as load_state_dict copies into one
    with torch.no_grad():
        param.copy_(src)
    assert torch.equal(param.dequantize(), src.dequantize())


def test_copy_into_some_rows_of_a_double_quantized_weight_keeps_the_other_rows():
    # rows 0:4 hold one whole group of nested scales (they share the weight's offset); rows 0:2 are un-nested (their
    # decoded scales copied): a source quantized on its own shifted every other row's scales (max error 5.2), or
    # left the weight's old scales under the new codes
    torch.manual_seed(0)
    w = quantize_nf4(torch.randn(16, 4096), blocksize=64)
    before = w.dequantize(torch.float32).clone()
    with pytest.raises(ValueError, match="rows 0:4 .*another nested offset"):
        w[0:4].copy_(quantize_nf4(torch.randn(4, 4096) * 3, blocksize=64))
    with pytest.raises(ValueError, match="rows 0:4 .*another nested offset"):
        w[0:4].detach().view(-1).copy_(quantize_nf4(torch.randn(4 * 4096) * 3, blocksize=64))
    with pytest.raises(ValueError, match="rows 0:2 .*copy of their decoded scales"):
        w[0:2].copy_(quantize_nf4(torch.randn(2, 4096), blocksize=64, double_quant=False))
    assert torch.equal(w.dequantize(torch.float32), before)

    w[0:4].copy_(w[8:12])  # rows of the same weight share its offset: copied exactly
    assert torch.equal(w.dequantize(torch.float32)[0:4], before[8:12])
    assert torch.equal(w.dequantize(torch.float32)[4:], before[4:])
    plain = quantize_nf4(torch.randn(16, 4096), blocksize=64, double_quant=False)
    src = quantize_nf4(torch.randn(2, 4096), blocksize=64, double_quant=False)
    plain[0:2].copy_(src)  # without double quantization rows own their scales: any source
    assert torch.equal(plain.dequantize()[0:2], src.dequantize())


# ----------------------------------------------------------------------------------------------
# 2. share_memory acts on the inner tensors

def test_share_memory_moves_the_inner_tensors():
    # in a subprocess: before the fix torch read the wrapper's (absent) storage and the process segfaulted
    code = """if True:
        import torch
        from fastft.modules.nf4_linear import NF4Linear
        torch.manual_seed(0)
        layer = NF4Linear.from_linear(torch.nn.Linear(64, 32))
        w, x = layer.weight, torch.randn(2, 64)
        y = layer(x)
        assert not w.is_shared()
        assert layer.share_memory() is layer and layer.weight is w  # the same Parameter, moved in place
        assert w.is_shared() and w.nested_offset.is_shared() and layer.bias.is_shared()
        assert all(t.is_shared() for t in (w.packed, w.absmax, w.absmax2, w.code2, w.code))
        assert torch.equal(layer(x), y)
        print("ok")
    """
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-3000:])


# ----------------------------------------------------------------------------------------------
# 3. an NF4Weight in a state dict is copied in (or assigned), never quantized again

def test_loading_an_nf4_weight_copies_it_into_the_layer():
    layer = NF4Linear.from_linear(nn.Linear(64, 37))
    before = layer.weight
    _, other = _pair()
    bias = torch.randn(37)
    assert not layer.load_state_dict({"weight": other, "bias": bias}).missing_keys
    assert layer.weight is before and before.packed.data_ptr() != other.packed.data_ptr()  # in place
    assert torch.equal(layer.weight.dequantize(), other.dequantize()) and torch.equal(layer.bias, bias)

    empty = NF4Linear(64, 37)  # no weight yet: takes the loaded one
    empty.load_state_dict({"weight": other, "bias": bias})
    assert isinstance(empty.weight, nn.Parameter) and torch.equal(empty.weight.dequantize(), other.dequantize())
    assigned = NF4Linear.from_linear(nn.Linear(64, 37))
    assigned.load_state_dict({"weight": other, "bias": bias}, assign=True)
    assert assigned.weight.packed.data_ptr() == other.packed.data_ptr()

    single = quantize_nf4(torch.randn(37, 64), double_quant=False)  # another layout: refused, naming the key
    with pytest.raises(RuntimeError, match=r"(?s)NF4 weight 'weight'.*layouts differ"):
        layer.load_state_dict({"weight": single, "bias": bias})
    with pytest.raises(TypeError, match=r"`w` is already an NF4Weight: copy it"):
        quantize_nf4(other, name="w")


def test_load_pre_hooks_run_once_before_the_weight_is_read():
    """As torch orders it: FSDP2's pre-hook reshards a layer left unsharded by a forward before the weight is
    copied into its shard (2 ranks: tests/nf4_fsdp_worker.py); here a hook that renames legacy keys."""
    source = NF4Linear.from_linear(nn.Linear(64, 37))
    layer = NF4Linear(64, 37)
    calls = []

    def rename(state_dict, prefix, *args):
        calls.append(prefix)
        for k in [k for k in state_dict if k.startswith(prefix + "legacy.")]:
            state_dict[prefix + k[len(prefix + "legacy."):]] = state_dict.pop(k)

    layer._register_load_state_dict_pre_hook(rename)
    layer.load_state_dict({f"legacy.{k}": v for k, v in source.state_dict().items()})
    assert calls == [""] and torch.equal(layer.weight.dequantize(), source.weight.dequantize())


def test_loading_into_an_fsdp2_sharded_layer(one_rank_group):
    """FSDP2's state dict holds DTensors of NF4Weights: loaded by copying shard into shard. One rank here (torch's
    one-rank FSDP2 path copies only a subclass's first all-gather input: the scales travel as metadata), the
    forward twice (the second reuses the unsharded buffers); 2 ranks: tests/nf4_fsdp_worker.py."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    layer, other = (NF4Linear.from_linear(nn.Linear(128, 64)) for _ in range(2))
    expected, expected_other = layer.weight.dequantize(), other.weight.dequantize()
    bias_other = other.bias.detach().clone()
    for m in (layer, other):
        fully_shard(m, mesh=one_rank_group)
    shard = layer.weight._local_tensor
    with pytest.raises(TypeError, match="sharded as a DTensor"):
        quantize_nf4(layer.weight)
    layer.load_state_dict(layer.state_dict())
    set_model_state_dict(layer, get_model_state_dict(layer))
    assert layer.weight._local_tensor is shard and torch.equal(shard.dequantize(), expected)
    set_model_state_dict(layer, get_model_state_dict(other))  # another offset
    assert layer.weight._local_tensor is shard and shard.offset == other.weight._local_tensor.offset
    assert torch.equal(shard.dequantize(), expected_other)
    x = torch.randn(3, 128, requires_grad=True)
    for _ in range(2):
        y = layer(x)
        assert torch.allclose(y, x @ expected_other.t() + bias_other, atol=1e-5)
        y.sum().backward()


# ----------------------------------------------------------------------------------------------
# 4. a dense weight is refused

def test_assigning_a_dense_weight_is_refused():
    layer = NF4Linear.from_linear(nn.Linear(64, 37))
    embedding = nn.Embedding(37, 64)  # what `tie_weights()` assigns to a quantized lm_head
    with pytest.raises(TypeError, match=r"`weight` must be an NF4Weight.*got Parameter of torch\.float32"):
        layer.weight = embedding.weight
    with pytest.raises(TypeError, match="must be an NF4Weight"):
        NF4Linear(64, 37, weight=torch.randn(37, 64))
    assert isinstance(layer.weight, NF4Weight)
    with pytest.raises(ValueError, match=r"weight has shape \(64, 64\)"):
        layer.weight = quantize_nf4(torch.randn(64, 64))
    # what legitimately sets it still does: an NF4Weight (wrapped), a frozen Parameter of one, None, meta, loads
    layer.weight = quantize_nf4(torch.randn(37, 64))
    assert isinstance(layer.weight, nn.Parameter) and not layer.weight.requires_grad
    layer.weight = nn.Parameter(quantize_nf4(torch.randn(37, 64)), requires_grad=False)
    meta = NF4Linear(64, 37, device="meta")  # as load_nf4_model builds layers before reading the checkpoint
    meta.load_state_dict(layer.state_dict(), assign=True)
    assert meta.weight.device.type == "cpu" and torch.equal(meta.weight.dequantize(), layer.weight.dequantize())
    assert isinstance(copy.deepcopy(layer).to("meta").weight, NF4Weight)  # _apply swaps, no setattr
    assert isinstance(copy.deepcopy(layer).to_empty(device="cpu").weight, NF4Weight)
    NF4Linear(64, 37).load_state_dict({"weight": torch.randn(37, 64), "bias": torch.zeros(37)})  # dense: quantized
    layer.weight = None
    assert layer.weight is None


# ----------------------------------------------------------------------------------------------
# 5. a loaded weight goes where the layer's weight is, even without a bias
# (CUDA is not needed to see the choice: the device handed to the checkpoint reader is recorded)

@pytest.mark.parametrize("where, bias, expected", [("cpu", False, "cpu"), ("cpu", True, "cpu"),
                                                   ("meta", True, "cpu"), ("meta", False, None)])
def test_a_loaded_weight_goes_to_the_layers_device(monkeypatch, where, bias, expected):
    state = NF4Linear.from_linear(nn.Linear(64, 37, bias=bias)).state_dict()
    layer = NF4Linear.from_linear(nn.Linear(64, 37, bias=bias))
    layer.weight = layer.weight.to(where)
    asked = []
    read = NF4Weight.from_bnb_state_dict.__func__

    def recording(cls, state, prefix="weight", device=None):
        asked.append(device)
        return read(cls, state, prefix, device=device)

    monkeypatch.setattr(NF4Weight, "from_bnb_state_dict", classmethod(recording))
    layer.load_state_dict(state)
    assert asked == [None if expected is None else torch.device(expected)]
    assert layer.weight.device.type == "cpu"


# ----------------------------------------------------------------------------------------------
# 6. split sizes must add up to the rows

def test_split_sizes_must_sum_to_the_rows():
    w = quantize_nf4(torch.randn(37, 64))  # one block a row: every row split holds whole blocks
    with pytest.raises(RuntimeError, match=r"sum exactly to 37 .*split_sizes=\[5, 10\]"):
        torch.split(w, [5, 10])
    with pytest.raises(RuntimeError, match=r"sum exactly to 37 .*split_sizes=\[5, 100\]"):
        w.split([5, 100])
    with pytest.raises(RuntimeError, match="non-negative"):
        w.split([40, -3])
    top, bottom = torch.split(w, [5, 32])
    assert torch.equal(torch.cat([top.dequantize(), bottom.dequantize()]), w.dequantize())


def test_quantize_and_use_under_inference_mode():
    """Inference tensors have no version counter: the offset is read instead of cached (it failed to quantize)."""
    w = torch.randn(64, 128)
    with torch.inference_mode():
        q = quantize_nf4(w)
        assert torch.equal(q.dequantize(), quantize_nf4(w.clone()).dequantize())
    assert q.offset == quantize_nf4(w).offset


# ----------------------------------------------------------------------------------------------
# 7. casts: `copy=True` copies; a floating-point dtype leaves the weight (as bitsandbytes'), any other is refused

def test_casts_copy_keep_the_dtype_or_refuse():
    torch.manual_seed(0)
    w = quantize_nf4(torch.randn(32, 64))
    for copied in (w.to(copy=True), w.to("cpu", copy=True), w.to(torch.float16, copy=True)):
        assert copied is not w and copied.packed.data_ptr() != w.packed.data_ptr() and copied.dtype == w.dtype
        copied.copy_(quantize_nf4(torch.randn(32, 64) * 5))
        assert not torch.equal(copied.dequantize(), w.dequantize())
    assert w.to("cpu") is w and w.to(torch.bfloat16) is w and w.to(torch.float64) is w
    for cast in (w.half(), w.double(), w.to("cpu", torch.float16), w.type(torch.bfloat16)):
        assert isinstance(cast, NF4Weight) and cast.dtype == torch.float32 and torch.equal(cast.packed, w.packed)
    for refused in (lambda: w.to(torch.int8), lambda: w.int(), lambda: w.long(),
                    lambda: w.new_zeros((32, 64), dtype=torch.uint8)):
        with pytest.raises(TypeError, match=r"is not a floating-point dtype.*dequantize\(dtype\)"):
            refused()

    layer = NF4Linear.from_linear(nn.Linear(64, 32))
    weight, codes = layer.weight, layer.weight.packed.clone()
    assert layer.to(torch.bfloat16).weight is weight and weight.dtype == torch.float32  # as bitsandbytes'
    for cast in ("half", "double", "float", "bfloat16"):
        getattr(layer, cast)()
        assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight.packed, codes)
    assert layer.bias.dtype == torch.bfloat16


def test_peft_kbit_preparation_leaves_nf4_weights_as_bitsandbytes_ones():
    """prepare_model_for_kbit_training casts every half-precision parameter to fp32 but bitsandbytes' Params4bit:
    an NF4 weight keeps the dtype it dequantizes to (the QLoRA compute dtype), as a Params4bit does."""
    from peft import prepare_model_for_kbit_training

    model = nn.Sequential(NF4Linear.from_linear(nn.Linear(64, 32).to(torch.bfloat16)))
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert model[0].weight.dtype == torch.bfloat16 and model[0].bias.dtype == torch.float32


def test_nf4_weights_refuse_to_require_grad():
    layer = NF4Linear.from_linear(nn.Linear(64, 32))
    w = quantize_nf4(torch.randn(32, 64))
    message = r"shape \(32, 64\) is frozen.*Train adapters.*weight\.dequantize\(dtype\)"

    def set_flag(t):  # a full fine-tuning loop: `for p in model.parameters(): p.requires_grad = True`
        t.requires_grad = True

    for attempt in (lambda: w.requires_grad_(), lambda: nn.Parameter(w), lambda: layer.requires_grad_(True),
                    lambda: set_flag(w), lambda: set_flag(layer.weight)):
        with pytest.raises(RuntimeError, match=message):
            attempt()
    w.requires_grad = False
    assert not w.requires_grad and not layer.weight.requires_grad and w.requires_grad_(False) is w
    assert not nn.Parameter(w, requires_grad=False).requires_grad and layer.requires_grad_(False) is layer


@pytest.mark.parametrize("scale", [2e-38, 1e-40, 1e38])
def test_double_quant_of_scales_at_fp32_limits_is_refused(scale):
    """Finite weights whose block scales sit at fp32's limits overflow the nested 8-bit code (1/scale or the scales'
    mean): a ValueError saying what to do, not an IndexError from a garbage code (or bitsandbytes' NaN scales)."""
    w = (torch.rand(4, 64, generator=torch.Generator().manual_seed(0)) + 0.5) * scale
    with pytest.raises(ValueError, match="double_quant=False"):
        quantize_nf4(w, blocksize=64, double_quant=True)
    assert torch.isfinite(quantize_nf4(w, blocksize=64, double_quant=False).dequantize(torch.float32)).all()


@pytest.mark.parametrize("shape", [(130, 129), (1000, 33)])
def test_an_all_zero_weight_with_a_short_tail_block_double_quantizes(shape):
    """Over 256 blocks, the tail block's scale at bitsandbytes' 1e-38 floor made a group's nested scale tiny and
    its reciprocal inf: refused as "beyond what the 8-bit nested code holds", where bitsandbytes quantizes it exactly
    (a zero-initialized nn.Linear could not be quantized)."""
    w = quantize_nf4(torch.zeros(shape), blocksize=64, double_quant=True)
    assert torch.equal(w.dequantize(torch.float32), torch.zeros(shape))
    layer = nn.Linear(shape[1], shape[0], bias=False)
    nn.init.zeros_(layer.weight)
    assert torch.equal(NF4Linear.from_linear(layer).dequantize_weight(torch.float32), torch.zeros(shape))


def test_the_cuda_gemv_is_used_only_where_it_runs(monkeypatch):
    """The compiled decode GEMV was chosen on any CUDA device and raised at every QLoRA decode step where it cannot
    run (sm < 80: no kernel image; a driver older than its CUDA runtime), instead of leaving it to the Triton GEMM.
    Checked once per device (stubs: no GPU here; the meta device stands in for one)."""
    from types import SimpleNamespace

    from fastft.kernels import nf4_cuda, nf4_gemm

    device = torch.device("meta")
    launches = []
    monkeypatch.setattr(nf4_gemm, "random_nf4_operand", lambda rows, cols, dev, gen: SimpleNamespace(cols=cols))

    def launch(fails):
        def nf4_gemv(x, w, bias, variant):
            launches.append(variant)
            if fails:
                raise RuntimeError("nf4_gemv_cuda: the kernel launch failed: CUDA driver version is insufficient")
            return torch.zeros(1, 16)
        return nf4_gemv

    for capability, fails, runs, launched in (((7, 5), False, False, []), ((9, 0), True, False, [nf4_cuda.SCALED]),
                                              ((9, 0), False, True, [nf4_cuda.SCALED])):
        monkeypatch.setattr(nf4_cuda, "_RUNS_ON", {})
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
        monkeypatch.setattr(nf4_cuda, "nf4_gemv", launch(fails))
        launches.clear()
        if fails:
            with pytest.warns(UserWarning, match="does not run on meta .*driver version is insufficient.*Triton"):
                assert nf4_cuda.runs_on(device) is runs
        else:
            assert nf4_cuda.runs_on(device) is runs
        assert nf4_cuda.runs_on(device) is runs and launches == launched  # once per device


def test_the_cpu_extension_checks_sizes_before_its_raw_pointers():
    """nf4_cpu.dequantize trusted `numel`: 65,536 values from a 32-byte buffer read past it, with no error."""
    from fastft.kernels import nf4_cpu

    if not nf4_cpu.available():
        pytest.skip("the compiled extension is not built")
    packed, absmax = torch.full((32,), 0xFF, dtype=torch.uint8), torch.ones(1)
    with pytest.raises(ValueError, match="65536 values in blocks of 64 need 32768 packed bytes and 1024 absmax"):
        nf4_cpu.dequantize(packed, absmax, 1 << 16, 64, torch.float32)
    with pytest.raises(ValueError, match="`blocksize` must be a positive even int up to 2\\^31, got 63"):
        nf4_cpu.dequantize(packed, absmax, 63, 63, torch.float32)
    with pytest.raises(ValueError, match="`blocksize` must be a positive even int"):
        nf4_cpu.quantize(torch.randn(64), 0)
    assert nf4_cpu.dequantize(packed, absmax, 64, 64, torch.float32).shape == (64,)


def test_an_nf4_weight_with_another_code_table_is_refused():
    """The CPU paths decode with NF4's table whatever `code` says, the GPU kernels read `code`: another table gave
    path-dependent weights (0.33 apart)."""
    from fastft.quant.nf4_weight import NF4Weight, quantize_nf4

    w = quantize_nf4(torch.randn(8, 64), 64, double_quant=False)
    with pytest.raises(ValueError, match="the code table is not NF4's"):
        NF4Weight(w.packed, w.absmax, w.shape, w.dtype, 64, code=-w.code.flip(0).contiguous())
    NF4Weight(w.packed, w.absmax, w.shape, w.dtype, 64, code=w.code.clone())
