"""NF4 kernels on the GPU (skipped without CUDA): Triton dequant and GEMM, the CUDA decode GEMV, the ops.

Run on the GPU machine with `python3 -m pytest -m gpu tests/test_nf4_gpu.py`; with bitsandbytes importable
(PYTHONPATH=$PWD/.peers) the dequantized values are also checked against bitsandbytes' CUDA kernels.
"""
import pytest
import torch

from fastft.quant import quantize_nf4
from fastft.quant import nf4_format as fmt
from tests.utils import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_cuda_allocator")]

DEV = "cuda"
HALF = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _first_config(monkeypatch):
    # Each new problem kind would compile and time every config; the tests check configs one by one where
    # it matters (test_gemm_every_config, the dequant sweep) and otherwise run the first, to keep compiles few.
    monkeypatch.setenv("FASTFT_AUTOTUNE", "0")


def _nf4(shape, dtype=torch.bfloat16, blocksize=64, double_quant=True, scale=0.05):
    # quantized on the host (bit-exact with bitsandbytes), then moved
    return quantize_nf4(torch.randn(shape, dtype=dtype) * scale, blocksize, double_quant).to(DEV)


@pytest.mark.parametrize("dtype", (torch.float32, *HALF))
@pytest.mark.parametrize("blocksize,shape", [(64, (4096, 1000)), (32, (333, 96)), (4096, (5, 8191)), (64, (7,))])
@pytest.mark.parametrize("double_quant", [False, True])
def test_triton_dequant_is_bit_exact(poison_cuda_allocator, dtype, blocksize, shape, double_quant):
    from fastft.kernels.nf4_dequant import _configs, candidate_configs, nf4_dequantize
    w = _nf4(shape, dtype, blocksize, double_quant, scale=1.0)
    ref = fmt.dequantize_nf4_torch(w.packed, w.block_absmax(), w.numel(), blocksize, dtype).view(shape)
    sweep = dtype == torch.bfloat16 and blocksize == 64  # every config once; the first elsewhere
    for config in _configs() + candidate_configs() if sweep else _configs()[:1] + candidate_configs()[:1]:
        out = None  # the last config's output freed and poisoned: the next must not inherit its values
        poison_cuda_allocator()
        out = nf4_dequantize(w.packed, w.absmax, w.numel(), blocksize, dtype, w.code, absmax2=w.absmax2,
                             code2=w.code2, offset=w.offset, nested_blocksize=w.nested_blocksize, config=config)
        assert torch.equal(out.view(shape), ref), config
    assert torch.equal(w.dequantize(), ref)
    assert torch.equal(w.cpu().dequantize(), ref.cpu())


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequant_matches_bitsandbytes_cuda(double_quant):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(1024, 4096, dtype=torch.bfloat16, device=DEV)
    packed, state = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    sd = {f"w.{k}": v for k, v in state.as_dict(packed=True).items()}
    sd["w"] = packed
    from fastft.quant import NF4Weight
    w = NF4Weight.from_bnb_state_dict(sd, "w")
    assert torch.equal(w.dequantize(), bnbf.dequantize_4bit(packed, state))


def test_gpu_quantize_matches_host():
    x = torch.randn(512, 1000, dtype=torch.bfloat16)
    host = quantize_nf4(x, double_quant=False)
    gpu = quantize_nf4(x.to(DEV), double_quant=False)
    assert torch.equal(gpu.packed.cpu(), host.packed) and torch.equal(gpu.absmax.cpu(), host.absmax)
    nested = quantize_nf4(x.to(DEV))  # the mean offset may round differently on the GPU: compare values
    assert torch.allclose(nested.block_absmax().cpu(), quantize_nf4(x).block_absmax(), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("dtype,M,N,K,blocksize", [(torch.bfloat16, 1000, 1024, 1024, 64),
                                                    (torch.bfloat16, 257, 776, 512, 32),
                                                    (torch.float16, 64, 520, 4096, 64)])
def test_gemm_every_config(poison_cuda_allocator, dtype, M, N, K, blocksize):
    from fastft.kernels.nf4_gemm import gemm_configs, nf4_lora_gemm
    w = _nf4((N, K), dtype, blocksize)
    W = w.dequantize(torch.float32).double()
    x = torch.randn(M, K, dtype=dtype, device=DEV)
    dy = torch.randn(M, N, dtype=dtype, device=DEV)
    lo = torch.randn(M, 16, dtype=dtype, device=DEV) * 0.1
    B = torch.randn(N, 16, dtype=dtype, device=DEV) * 0.1
    A = torch.randn(16, K, dtype=dtype, device=DEV) * 0.1
    y_ref = x.double() @ W.T + lo.double() @ B.double().T
    dx_ref = dy.double() @ W + lo.double() @ A.double()
    for i, config in enumerate(gemm_configs(2)):
        y = dx = None  # the last config's outputs freed and poisoned: the next must not inherit their values
        poison_cuda_allocator()
        try:
            y = nf4_lora_gemm(x, w.kernel_operand(), lo, B, None, w_nk=True, config=config)
            dx = nf4_lora_gemm(dy, w.kernel_operand(), lo, A, None, w_nk=False, config=config)
        except Exception as err:
            if i > 0 and _not_compilable(err):  # skipped by the tuner too; the first, the untimed default, must run
                continue
            raise
        assert_close(y, y_ref, dtype, f"forward {config}")
        assert_close(dx, dx_ref, dtype, f"dx {config}")
    # dx with a dropout-masked tail has its own list (narrower tiles: the masked tail keeps a second fp32 tile)
    from fastft.kernels.rank_ops import dropout_mask
    keep = dropout_mask(1234, M, K, 0.1, DEV).double()
    dx_drop_ref = dy.double() @ W + (lo.double() @ A.double()) * keep
    for i, config in enumerate(gemm_configs(2, dropout=True)):
        dx = None
        poison_cuda_allocator()
        try:
            dx = nf4_lora_gemm(dy, w.kernel_operand(), lo, A, None, w_nk=False, p_drop=0.1, seed=1234, config=config)
        except Exception as err:
            if i > 0 and _not_compilable(err):
                continue
            raise
        assert_close(dx, dx_drop_ref, dtype, f"dx with dropout {config}")


def _not_compilable(err: Exception) -> bool:
    """A config this triton/GPU cannot compile (out of shared memory or registers, a compile error)."""
    return "out of resource" in str(err).lower() or "compil" in type(err).__name__.lower()


@pytest.mark.parametrize("dtype", (torch.float32, *HALF))
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_qlora_linear_forward_and_gradients(captured_seeds, dtype, p):
    from fastft.kernels.rank_ops import dropout_mask
    from fastft.ops import lora_linear_reference, qlora_linear
    M, K, N, r = 777, 1024, 1536, 16
    w = _nf4((N, K), dtype)
    x = torch.randn(M, K, dtype=dtype, device=DEV, requires_grad=True)
    A = (torch.randn(r, K, device=DEV) * 0.02).requires_grad_()
    B = (torch.randn(N, r, device=DEV) * 0.02).requires_grad_()
    bias = torch.randn(N, dtype=dtype, device=DEV, requires_grad=True)
    seeds = captured_seeds
    y = qlora_linear(x, w, bias, A, B, 2.0, p)
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = dropout_mask(seeds[0], M, K, p, DEV) if p > 0 else None
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B, bias)]
    y_ref = lora_linear_reference(leaves[0], w.dequantize(torch.float32).double(), leaves[3], leaves[1], leaves[2],
                                  2.0, p, keep_mask=keep)
    y_ref.backward(dy.double())
    assert_close(y, y_ref, dtype, "y")
    for name, got, leaf in (("dx", x.grad, leaves[0]), ("dA", A.grad, leaves[1]), ("dB", B.grad, leaves[2]),
                            ("db", bias.grad, leaves[3])):
        assert_close(got, leaf.grad, dtype, name)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("batch", [1, 2, 4, 8, 9, 16])
@pytest.mark.parametrize("N,K,blocksize,double_quant", [(4096, 4096, 64, True), (1000, 96, 32, False),
                                                        (520, 14336, 256, True), (1000, 320, 64, False),
                                                        (1000, 1024, 128, False)])
@pytest.mark.parametrize("variant", ["scaled", "table", "table_lean", "table_deep", "table_deep_k4", "table_deep_k2",
                                     "auto"])
def test_cuda_gemv(dtype, batch, N, K, blocksize, double_quant, variant):
    """The kernels (and the measured choice) against fp64; K=320 ends in a half step of 64 for the table kernel.
    TABLE_LEAN's own loop runs for batch <= 8 with K % 128 == 0: nested absmax at 4096x4096 and 520x14336 (whose last
    8 rows take the table kernel's loop), plain absmax at 1000x1024 (ragged too)."""
    from fastft.kernels import nf4_cuda
    if not nf4_cuda.available():
        pytest.skip("fastft._C was built without CUDA")
    w = _nf4((N, K), dtype, blocksize, double_quant)
    v = {"scaled": nf4_cuda.SCALED, "table": nf4_cuda.TABLE, "table_lean": nf4_cuda.TABLE_LEAN,
         "table_deep": nf4_cuda.TABLE_DEEP, "table_deep_k4": nf4_cuda.TABLE_DEEP_K4,
         "table_deep_k2": nf4_cuda.TABLE_DEEP_K2, "auto": None}[variant]
    if v not in (nf4_cuda.SCALED, None) and not nf4_cuda.table_supported(w.kernel_operand()):
        with pytest.raises(RuntimeError, match="variant"):
            nf4_cuda.nf4_gemv(torch.randn(batch, K, dtype=dtype, device=DEV), w.kernel_operand(), None, v)
        return
    x = torch.randn(batch, K, dtype=dtype, device=DEV)
    bias = torch.randn(N, dtype=dtype, device=DEV)
    assert nf4_cuda.supported(x, w.kernel_operand())
    y = nf4_cuda.nf4_gemv(x, w.kernel_operand(), bias, v)
    ref = x.double() @ w.dequantize(torch.float32).double().T + bias.double()
    assert_close(y, ref, dtype, f"gemv {variant} batch {batch}")
    y2 = nf4_cuda.nf4_gemv(torch.randn(K, batch, dtype=dtype, device=DEV).t(), w.kernel_operand(), None, v)
    assert y2.shape == (batch, N) and torch.isfinite(y2).all()
    # rows starting off a 16-byte boundary (a contiguous one-row view too): copied, not refused
    x3 = torch.randn(batch, K + 1, dtype=dtype, device=DEV)[:, 1:]
    y3 = nf4_cuda.nf4_gemv(x3, w.kernel_operand(), None, v)
    assert_close(y3, x3.double() @ w.dequantize(torch.float32).double().T, dtype, f"gemv {variant} offset rows")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("batch", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("N,K,blocksize,double_quant", [
    (4096, 4096, 64, True),    # the lean loop in every block, nested absmax
    (1000, 1024, 128, False),  # the lean loop, plain absmax; the last 8 rows take the table kernel's loop
    (520, 14336, 256, True),   # ragged and nested, 112 steps (14 a warp)
    (7, 512, 64, False),       # one ragged block: the table kernel's loop alone
    (64, 8192, 4096, True),    # an absmax block wider than a warp's stride (1024 columns)
    (48, 384, 64, True),       # 3 steps: warps 3-7 have none
    (1000, 320, 64, False),    # K % 128 == 64: the table kernel
])
@pytest.mark.parametrize("variant", ["table_lean", "table_deep", "table_deep_k4", "table_deep_k2"])
def test_cuda_gemv_lean_loops_match_table(dtype, batch, N, K, blocksize, double_quant, variant):
    """TABLE_LEAN and TABLE_DEEP run TABLE's arithmetic in the same order: the same y bit for bit, with and without
    bias, for x rows with a stride (ldx > K); batch > 8 and K % 128 != 0 launch the table kernel itself. TABLE_DEEP's
    ring of 4: 3 steps (48x384) leave slots unfilled, 14 a warp (520x14336) wrap it three times and end mid-ring.
    TABLE_DEEP_K4 / _K2 (K split over 4 or 2 warps: groups of 16 rows, 1000x1024's last block ragged and partly empty)
    add the warps' fp32 partial sums in another grouping: within one rounding of the output of TABLE's y."""
    from fastft.kernels import nf4_cuda
    if not nf4_cuda.available():
        pytest.skip("fastft._C was built without CUDA")
    w = _nf4((N, K), dtype, blocksize, double_quant)
    op = w.kernel_operand()
    assert nf4_cuda.table_supported(op)
    bias = torch.randn(N, dtype=dtype, device=DEV)
    for x in (torch.randn(batch, K, dtype=dtype, device=DEV), torch.randn(batch, K + 64, dtype=dtype, device=DEV)[:, :K]):
        for b in (None, bias):
            lean = nf4_cuda.nf4_gemv(x, op, b, getattr(nf4_cuda, variant.upper()))
            table = nf4_cuda.nf4_gemv(x, op, b, nf4_cuda.TABLE)
            assert torch.isfinite(lean).all()
            if variant.endswith(("_k4", "_k2")):
                torch.testing.assert_close(lean.float(), table.float(), rtol=2 * torch.finfo(dtype).eps,
                                           atol=1e-3 * table.float().abs().max().item())
            else:
                assert torch.equal(lean, table), (x.stride(), b is not None, (lean.float() - table.float()).abs().max())
    ref = x.double() @ w.dequantize(torch.float32).double().T + bias.double()
    assert_close(lean, ref, dtype, f"gemv {variant} batch {batch}")


@pytest.mark.parametrize("dtype", HALF)
def test_cuda_gemv_table_kernel_agrees_with_scaled(dtype):
    """The once-per-device check that lets the measured choice take the table kernel passes on this GPU."""
    from fastft.kernels import nf4_cuda
    if not nf4_cuda.available():
        pytest.skip("fastft._C was built without CUDA")
    assert nf4_cuda.table_agrees(torch.device(DEV, torch.cuda.current_device()), dtype)


def test_nf4_linear_module_on_gpu():
    from torch import nn
    from fastft.modules.nf4_linear import NF4Linear
    linear = nn.Linear(2048, 1024, dtype=torch.bfloat16)
    layer = NF4Linear.from_linear(linear).to(DEV)
    assert layer.weight.device.type == "cuda" and layer.bias.device.type == "cuda"
    W = layer.weight.dequantize(torch.float32).double()
    for tokens in (1, 3, 16, 300):  # the GEMV for decode, the GEMM beyond 16 tokens
        x = torch.randn(tokens, 2048, dtype=torch.bfloat16, device=DEV, requires_grad=True)
        y = layer(x)
        assert_close(y, x.detach().double() @ W.T + layer.bias.detach().double(), torch.bfloat16, f"{tokens}")
        y.sum().backward()
        assert_close(x.grad, torch.ones(tokens, 1024, device=DEV, dtype=torch.float64) @ W, torch.bfloat16, "dx")


@pytest.mark.parametrize("double_quant", [False, True])
def test_traced_dequantize_captures_in_a_cuda_graph_bit_exact(double_quant):
    """The custom op torch.compile traces (fastft::nf4_dequantize, the nested offset a device tensor) decodes the
    nested scales on the device: it read the offset on the host (float(offset)), a sync per call that a CUDA graph
    capture refuses. Replayed, it gives the eager dequantize bit for bit."""
    w = _nf4((333, 96), torch.bfloat16, 32, double_quant)

    def traced():
        return torch.ops.fastft.nf4_dequantize(w.packed, w.absmax, w.absmax2, w.code2, w.code, w.nested_offset,
                                               w.nested_blocksize, w.blocksize, w.numel(), torch.bfloat16)

    want = w.dequantize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the kernel compiled outside the capture
        traced()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = traced()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.view(w.shape), want)


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_bitsandbytes_cuda_model_trains_through_fastft_qlora(tmp_path, double_quant):
    """peft's QLoRA recipe on CUDA (transformers loads the model with a bitsandbytes NF4 config): fastft.get_peft_model
    takes bitsandbytes' layers as they are and runs its fused QLoRA, matching peft on the dequantized model."""
    pytest.importorskip("bitsandbytes")
    import peft

    import fastft
    from fastft.modules.qlora import FusedQLoraLinear
    from tests.bnb_utils import dequantized_twin, load_bnb
    from tests.methods_utils import assert_same_step, copy_trainables, ids, perturb_trainables, step
    from tests.utils import ALL_LINEAR, tiny_llama

    tiny_llama(tie_word_embeddings=False, intermediate_size=128).save_pretrained(tmp_path)
    lora = lambda: peft.LoraConfig(r=4, target_modules=ALL_LINEAR)  # noqa: E731
    ours = fastft.get_peft_model(load_bnb(tmp_path, double_quant=double_quant, device=DEV), lora())
    theirs = peft.get_peft_model(dequantized_twin(tmp_path, device=DEV, double_quant=double_quant), lora())
    assert sum(isinstance(m, FusedQLoraLinear) for m in ours.modules()) == 14
    perturb_trainables(ours)
    copy_trainables(ours, theirs)
    batch = ids().to(DEV)
    assert_same_step(step(ours, batch), step(theirs, batch), "bitsandbytes QLoRA", tol=1e-4)
