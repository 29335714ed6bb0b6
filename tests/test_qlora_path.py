"""fastft.ops.qlora_path: both QLoRA base-GEMM paths against fp64, the measured choice with a stubbed timer
(per key, cached, forced by FASTFT_QLORA_PATH), the shared dequant scratch, and (GPU) its peak-memory bound."""
import pytest
import torch

from fastft.kernels import autotune
from fastft.ops import lora_linear, lora_linear_reference, qlora_linear
from fastft.ops import qlora_path, qlora_prefetch
from fastft.quant import quantize_nf4
from tests.utils import assert_close, check_nf4_linear_fp64, interpreter_only


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    monkeypatch.delenv(qlora_path.ENV, raising=False)
    prefetch = qlora_prefetch.enabled()  # FASTFT_QLORA_PREFETCH=1 exported would hold two buffers, not one scratch
    qlora_prefetch.set_enabled(False)
    qlora_path.reset_path_choices()
    qlora_path.release_dequant_scratch()
    yield
    qlora_path.reset_path_choices()
    qlora_path.release_dequant_scratch()
    qlora_prefetch.set_enabled(prefetch)


def _problem(lead, K, N, r, dtype, blocksize=64, device="cpu"):
    w = quantize_nf4(torch.randn(N, K, dtype=dtype) * 0.05, blocksize=blocksize).to(device)
    x = torch.randn(*lead, K, dtype=dtype, device=device, requires_grad=True)
    A = (torch.randn(r, K, device=device) * 0.1).requires_grad_()
    B = (torch.randn(N, r, device=device) * 0.1).requires_grad_()
    bias = torch.randn(N, dtype=dtype, device=device, requires_grad=True)
    return w, x, A, B, bias


def _check_against_fp64(seeds, w, x, A, B, bias, p, dtype, backend="triton"):
    from fastft.kernels.rank_ops import dropout_mask
    y = qlora_linear(x, w, bias, A, B, 2.0, p, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = dropout_mask(seeds[-1], x[..., 0].numel(), x.shape[-1], p, x.device).view(x.shape) if p > 0 else None
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B, bias)]
    y_ref = lora_linear_reference(leaves[0], w.dequantize(torch.float32).double(), leaves[3], leaves[1], leaves[2],
                                  2.0, p, keep_mask=keep)
    y_ref.backward(dy.double())
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    for name, got, leaf in (("dx", x.grad, leaves[0]), ("dA", A.grad, leaves[1]), ("dB", B.grad, leaves[2]),
                            ("db", bias.grad, leaves[3])):
        assert_close(got, leaf.grad, dtype, name)


@interpreter_only
@pytest.mark.parametrize("path", qlora_path.PATHS)
@pytest.mark.parametrize("dtype,lead,K,N,r,p", [
    (torch.float32, (37,), 64, 48, 4, 0.1),
    (torch.bfloat16, (2, 25), 128, 70, 8, 0.25),
    (torch.float16, (19,), 64, 33, 16, 0.0),
])
def test_each_path_matches_fp64(monkeypatch, captured_seeds, path, dtype, lead, K, N, r, p):
    monkeypatch.setenv(qlora_path.ENV, path)
    used = []
    scratch = qlora_path.dequant_scratch
    monkeypatch.setattr(qlora_path, "dequant_scratch", lambda *a: used.append(1) or scratch(*a))
    _check_against_fp64(captured_seeds, *_problem(lead, K, N, r, dtype), p, dtype)
    # the dequant path decodes W in the forward and again for dx; the fused path never
    assert len(used) == (2 if path == "dequant" else 0)


@interpreter_only
@pytest.mark.parametrize("path", qlora_path.PATHS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_nf4_linear_each_path_matches_fp64(monkeypatch, path, dtype):
    monkeypatch.setenv(qlora_path.ENV, path)
    check_nf4_linear_fp64((2, 20), dtype)  # 40 tokens: the GEMM, not the decode GEMV
    assert (qlora_path.dequant_scratch_bytes() > 0) == (path == "dequant")


@interpreter_only
def test_rows_without_whole_blocks_take_the_dequant_path_even_when_fused_is_forced(monkeypatch, captured_seeds):
    monkeypatch.setenv(qlora_path.ENV, "fused")
    w, x, A, B, bias = _problem((9,), 100, 20, 4, torch.float32)  # 100 is not a multiple of the blocksize 64
    _check_against_fp64(captured_seeds, w, x, A, B, bias, 0.1, torch.float32)
    assert qlora_path.dequant_scratch_bytes() == 20 * 100 * 4


def _stub_timer(monkeypatch, ms):
    """autotune.bench replaced: runs fn once and reports ms[(path, direction)] of the path fn ran."""
    last = {}
    calls = []
    run_path = qlora_path.select

    def select(key, run, **kw):
        return run_path(key, lambda path: last.update(path=path, direction=key[-1]) or run(path), **kw)

    def bench(fn):
        fn()
        calls.append((last["path"], last["direction"]))
        return ms[(last["path"], last["direction"])]

    monkeypatch.setattr(qlora_path, "select", select)
    monkeypatch.setattr(autotune, "bench", bench)
    monkeypatch.setattr(qlora_path.TUNER, "timed", True)
    return calls


@interpreter_only
def test_the_faster_path_is_chosen_per_key_and_cached(monkeypatch, captured_seeds):
    ms = {("fused", "forward"): 2.0, ("dequant", "forward"): 1.0, ("fused", "dx"): 1.0, ("dequant", "dx"): 3.0}
    calls = _stub_timer(monkeypatch, ms)
    w, x, A, B, bias = _problem((40,), 64, 48, 4, torch.float32)
    _check_against_fp64(captured_seeds, w, x, A, B, bias, 0.1, torch.float32)
    assert sorted(calls) == sorted(ms)  # each path timed once per direction
    fwd = qlora_path.path_key(40, 48, 64, 16, torch.float32, "forward")
    dx = qlora_path.path_key(40, 64, 48, 16, torch.float32, "dx")
    assert qlora_path.chosen_path(fwd) == "dequant" and qlora_path.chosen_path(dx) == "fused"
    # 60 tokens fall in the same bucket (64): cached, nothing timed again, and the winners run
    calls.clear()
    used = []
    scratch = qlora_path.dequant_scratch
    monkeypatch.setattr(qlora_path, "dequant_scratch", lambda *a: used.append(1) or scratch(*a))
    w2, x2, A2, B2, b2 = _problem((60,), 64, 48, 4, torch.float32)
    qlora_linear(x2, w, b2, A2, B2, 2.0, 0.0, backend="triton").sum().backward()
    assert calls == [] and len(used) == 1  # dequant for the forward only
    # a new shape is timed afresh, and the other winner taken there
    ms.update({("fused", "forward"): 0.5})
    w3, x3, A3, B3, b3 = _problem((8,), 64, 48, 4, torch.float32)
    qlora_linear(x3, w3, b3, A3, B3, 2.0, 0.0, backend="triton")
    assert calls == [("fused", "forward"), ("dequant", "forward")]
    assert qlora_path.chosen_path(qlora_path.path_key(8, 48, 64, 16, torch.float32, "forward")) == "fused"


def test_selector_logic_with_a_stubbed_timer(monkeypatch):
    # select() alone, on any machine: the measured winner, the env var, an invalid value, a failing path
    ran = []
    ms = {"fused": 5.0, "dequant": 4.0}

    def run(path):
        ran.append(path)
        return path

    monkeypatch.setattr(autotune, "bench", lambda fn: (fn(), ms[ran[-1]])[1])
    monkeypatch.setattr(qlora_path.TUNER, "timed", True)
    key = qlora_path.path_key(1000, 8, 8, 16, torch.bfloat16, "forward")
    assert key[0] == 1024
    assert qlora_path.select(key, run) == "dequant" and qlora_path.chosen_path(key) == "dequant"
    ran.clear()
    assert qlora_path.select(key, run) == "dequant" and ran == ["dequant"]  # cached: one run, no timing
    monkeypatch.setenv(qlora_path.ENV, "fused")
    assert qlora_path.select(key, run) == "fused"
    assert qlora_path.select(key, run, fused_ok=False) == "dequant"
    monkeypatch.setenv(qlora_path.ENV, "fast")
    with pytest.raises(ValueError, match="FASTFT_QLORA_PATH"):
        qlora_path.select(key, run)
    monkeypatch.setenv(qlora_path.ENV, "auto")

    def broken(path):  # a path that cannot run here is skipped, never chosen
        if path == "dequant":
            raise torch.OutOfMemoryError("no room for the scratch")
        return run(path)

    other = qlora_path.path_key(8, 8, 8, 16, torch.bfloat16, "dx")
    assert qlora_path.select(other, broken) == "fused" and qlora_path.chosen_path(other) == "fused"


def test_untimed_default_is_the_fused_path(monkeypatch):
    monkeypatch.setattr(qlora_path.TUNER, "timed", False)
    monkeypatch.setattr(autotune, "bench", lambda fn: pytest.fail("untimed selection must not time"))
    key = qlora_path.path_key(16, 8, 8, 16, torch.float32, "forward")
    assert qlora_path.select(key, lambda path: path) == "fused"


@interpreter_only
def test_one_scratch_buffer_shared_by_all_layers():
    sizes = [(48, 64), (96, 128), (32, 64)]  # (N, K): the middle one is the largest
    weights = [quantize_nf4(torch.randn(n, k) * 0.05) for n, k in sizes]
    ptrs = []
    for w in weights:
        got = qlora_path.dequant_scratch(w, torch.float32)
        assert torch.equal(got, w.dequantize(torch.float32))  # bit-identical to the reference decode
        ptrs.append(got.data_ptr())
    assert qlora_path.dequant_scratch_bytes() == 96 * 128 * 4  # sized to the largest, grown once
    assert ptrs[2] == ptrs[1]  # the smaller weight after it reuses the buffer
    qlora_path.dequant_scratch(weights[0], torch.bfloat16)  # another dtype: its own buffer
    assert qlora_path.dequant_scratch_bytes() == 96 * 128 * 4 + 48 * 64 * 2
    qlora_path.release_dequant_scratch()
    assert qlora_path.dequant_scratch_bytes() == 0
    from fastft.ops.qlora import release_dequant_scratch
    assert release_dequant_scratch is qlora_path.release_dequant_scratch


@interpreter_only
def test_threads_never_read_each_others_weight_from_the_scratch(monkeypatch):
    """Two threads running QLoRA layers (a server with one model) launch onto one stream: thread A's decode, then
    a whole call of thread B's (its decode of W2 into the same scratch), then A's GEMM read W2 — A's output silently
    x1·W2ᵀ. A lock now spans each decode and the launches that read it: B waits for A. The order is forced with
    events (A is held after its decode until B finishes or 2 s pass), so no two kernels run at once here."""
    import threading

    monkeypatch.setenv(qlora_path.ENV, "dequant")
    g = torch.Generator().manual_seed(0)
    K = N = 64
    w1, w2 = quantize_nf4(torch.randn(N, K, generator=g)), quantize_nf4(torch.randn(N, K, generator=g) * 3)
    A, B = torch.randn(4, K, generator=g) * 0.1, torch.randn(N, 4, generator=g) * 0.1
    x1, x2 = torch.randn(16, K, generator=g), torch.randn(16, K, generator=g)
    a_decoded, b_done = threading.Event(), threading.Event()
    decode = qlora_path.dequant_scratch

    def held_after_a_decode(qweight, dtype):
        w = decode(qweight, dtype)
        if threading.current_thread().name == "A":
            a_decoded.set()
            b_done.wait(timeout=2.0)
        return w

    monkeypatch.setattr(qlora_path, "dequant_scratch", held_after_a_decode)
    out = {}

    def thread_a():
        with torch.no_grad():
            out["A"] = qlora_linear(x1, w1, None, A, B, 2.0, backend="triton")

    def thread_b():
        a_decoded.wait(timeout=30)
        with torch.no_grad():
            out["B"] = qlora_linear(x2, w2, None, A, B, 2.0, backend="triton")
        b_done.set()

    threads = [threading.Thread(target=thread_a, name="A"), threading.Thread(target=thread_b, name="B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for name, x, w in (("A", x1, w1), ("B", x2, w2)):
        assert_close(out[name], qlora_linear(x, w, None, A, B, 2.0, backend="torch"), torch.float32, name)


@pytest.mark.gpu
@pytest.mark.parametrize("path", qlora_path.PATHS)
def test_peak_memory_at_most_bf16_lora_plus_one_scratch(monkeypatch, path):
    """Three layers of different sizes, fwd+bwd: peak ≤ the bf16 LoRA stack's peak + one scratch buffer of the
    largest weight, and the scratch holds exactly that one buffer."""
    monkeypatch.setenv(qlora_path.ENV, path)
    dev, dtype, M, r = "cuda", torch.bfloat16, 2048, 16
    shapes = [(4096, 2048), (2048, 4096), (3072, 2048)]  # (N, K): layer i feeds layer i+1
    dense = [torch.randn(n, k, device=dev, dtype=dtype) * 0.02 for n, k in shapes]
    factors = [((torch.randn(r, k, device=dev) * 0.02).requires_grad_(), torch.zeros(n, r, device=dev,
                                                                                    requires_grad=True))
               for n, k in shapes]
    x0 = torch.randn(M, shapes[0][1], device=dev, dtype=dtype)

    def peak(layer, before_measuring=lambda: None):
        run(layer)  # warm-up: autotuning (and its timing buffers) outside the measured pass
        before_measuring()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run(layer)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    def run(layer):
        h = x0.clone().requires_grad_()
        for i in range(len(shapes)):
            h = layer(i, h)
        h.float().sum().backward()

    base = peak(lambda i, h: lora_linear(h, dense[i], None, *factors[i], 2.0))
    qweights = [quantize_nf4(w) for w in dense]
    dense_bytes = sum(w.numel() * w.element_size() for w in dense)
    dense.clear()  # the QLoRA stack holds NF4 weights only (the base lambda above has run)
    torch.cuda.empty_cache()
    # the scratch released after the warm-up, so the measured pass allocates it
    got = peak(lambda i, h: qlora_linear(h, qweights[i], None, *factors[i], 2.0), qlora_path.release_dequant_scratch)
    scratch = max(n * k for n, k in shapes) * 2
    expected_scratch = scratch if path == "dequant" else 0
    assert qlora_path.dequant_scratch_bytes() == expected_scratch
    # base was measured with the dense weights already resident (not in its delta); the NF4 weights likewise.
    # 1 MiB of slack: the launches' tensor-descriptor workspaces differ by a few KiB between the GEMMs.
    assert got <= base + expected_scratch + 2**20, (got, base, scratch, dense_bytes)


@pytest.mark.gpu
@pytest.mark.parametrize("path", qlora_path.PATHS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_each_path_matches_fp64_on_gpu(monkeypatch, captured_seeds, path, p):
    monkeypatch.setenv(qlora_path.ENV, path)
    _check_against_fp64(captured_seeds, *_problem((777,), 1024, 1536, 16, torch.bfloat16, device="cuda"), p,
                        torch.bfloat16, backend="auto")
