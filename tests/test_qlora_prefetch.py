"""FASTFT_QLORA_PREFETCH (fastft.ops.qlora_prefetch): the dequant path decodes the next layer's weight into a second
buffer while this layer's GEMM runs. On the CPU (the interpreter; the side stream's work runs in line) the same
outputs and gradients bit for bit as without it, every decode of a steady training step made ahead of its call,
and never a stale buffer: a weight written in place, or a new weight that takes a dead one's id, is decoded again.
On the GPU: the same with a real side stream, and the single-scratch path under CUDA-graph capture."""
import pytest
import torch

from fastft.ops import qlora_linear, qlora_path, qlora_prefetch
from fastft.quant import quantize_nf4
from tests.utils import assert_repeats_bit_identical, interpreter_only


@pytest.fixture(autouse=True)
def _dequant_path(monkeypatch):
    monkeypatch.setenv(qlora_path.ENV, "dequant")
    qlora_path.release_dequant_scratch()
    yield
    qlora_prefetch.set_enabled(False)
    qlora_path.release_dequant_scratch()


def _chain(n_layers=5, K=64, device="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    weights = [quantize_nf4((torch.randn(K, K) * 0.1).to(dtype)).to(device) for _ in range(n_layers)]
    A = [(torch.randn(4, K, device=device) * 0.1).requires_grad_() for _ in range(n_layers)]
    B = [(torch.randn(K, 4, device=device) * 0.1).requires_grad_() for _ in range(n_layers)]
    x = torch.randn(5, K, device=device, dtype=dtype, requires_grad=True)

    def step():
        h = x
        for w, a, b in zip(weights, A, B):
            h = qlora_linear(h, w, None, a, b, 2.0, backend="triton")
        return (h, *torch.autograd.grad(h.float().square().sum(), [x, *A, *B]))
    return weights, step


def _prefetcher(device="cpu", dtype=torch.float32):
    return qlora_prefetch._PREFETCHERS[(torch.device(device), dtype)]


@interpreter_only
def test_a_prefetched_chain_matches_and_decodes_ahead_of_every_call(monkeypatch):
    weights, step = _chain()
    want = step()
    qlora_path.release_dequant_scratch()  # (the single scratch of the run without prefetch)
    qlora_prefetch.set_enabled(True)
    for _ in range(2):  # the first step learns the order
        for g, w in zip(step(), want):
            assert torch.equal(g, w)
    p = _prefetcher()
    fills, decodes = [], p.decodes
    real_fill = p._fill
    monkeypatch.setattr(p, "_fill", lambda *args: fills.append(args[0]) or real_fill(*args))
    for g, w in zip(step(), want):
        assert torch.equal(g, w)
    assert fills == []  # 10 GEMMs, none waited for its own decode
    # 5 forward + 5 dx calls; at each turn the two buffers still hold the two layers the next calls want (layers 4
    # and 5 from the forward into the backward, 2 and 1 from the backward into the next forward): 10 - 4 decodes
    assert p.decodes - decodes == 2 * len(weights) - 4
    assert qlora_path.dequant_scratch_bytes() == 2 * 64 * 64 * 4  # two buffers, the single scratch unused


@interpreter_only
def test_a_weight_written_in_place_is_decoded_again():
    weights, step = _chain(n_layers=3)
    qlora_prefetch.set_enabled(True)
    step(), step()
    weights[1].copy_(quantize_nf4(torch.randn(64, 64) * 0.1))  # below autograd: fastft.quant bumps the versions
    got = step()
    qlora_prefetch.set_enabled(False)
    for g, w in zip(got, step()):
        assert torch.equal(g, w)


@interpreter_only
def test_a_buffer_is_never_taken_for_another_weight_with_the_same_tag(monkeypatch):
    """An id is reused once its object dies (a weight gathered afresh each step): the buffer must also belong to the
    very object asking, alive. Forced here: every weight gets the same tag."""
    monkeypatch.setattr(qlora_prefetch, "weight_tag", lambda qweight, dtype: ("one tag for all",))
    qlora_prefetch.set_enabled(True)
    for seed in range(3):
        torch.manual_seed(seed)
        w = quantize_nf4(torch.randn(32, 64) * 0.1)
        got = qlora_path.on_dequantized(w, torch.float32, lambda W: W.clone())
        assert torch.equal(got, w.dequantize(torch.float32))
        del w


def test_off_by_default_and_released_with_the_scratch(monkeypatch):
    import importlib
    import os
    import subprocess
    import sys

    monkeypatch.delenv(qlora_prefetch.ENV, raising=False)
    assert not importlib.reload(qlora_prefetch).enabled()
    code = "from fastft.ops import qlora_prefetch; print(qlora_prefetch.enabled())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, qlora_prefetch.ENV: "1"})
    assert run.stdout.strip() == "True", run.stderr[-2000:]
    importlib.reload(qlora_prefetch)
    # (the reload made a new module object: qlora_path must see the one it imported)
    monkeypatch.setattr(qlora_path, "qlora_prefetch", qlora_prefetch)
    qlora_prefetch.set_enabled(True)
    w = quantize_nf4(torch.randn(32, 64) * 0.1)
    qlora_path.on_dequantized(w, torch.float32, lambda W: None)
    assert qlora_path.dequant_scratch_bytes() == 32 * 64 * 4
    qlora_path.release_dequant_scratch()
    assert qlora_path.dequant_scratch_bytes() == 0


@pytest.mark.gpu
def test_prefetched_chain_is_bit_identical_on_the_gpu():
    """Real side stream, bf16, a chain whose layers differ in size (buffers grow on the calls' stream only)."""
    torch.manual_seed(0)
    dims = [1024, 3072, 1024, 2048, 1024]
    weights = [quantize_nf4(torch.randn(n, k, dtype=torch.bfloat16) * k**-0.5).cuda() for k, n in zip(dims, dims[1:])]
    A = [(torch.randn(16, k, device="cuda") * 0.05).requires_grad_() for k in dims[:-1]]
    B = [(torch.randn(n, 16, device="cuda") * 0.05).requires_grad_() for n in dims[1:]]
    x = torch.randn(2048, dims[0], device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        h = x
        for w, a, b in zip(weights, A, B):
            h = qlora_linear(h, w, None, a, b, 2.0)
        return (h, *torch.autograd.grad(h.float().square().sum(), [x, *A, *B]))
    want = step()
    qlora_prefetch.set_enabled(True)
    assert_repeats_bit_identical(step, want, 4)
    assert _prefetcher(weights[0].device, torch.bfloat16).decodes > 0  # cuda:0: torch.device("cuda") is another key
    assert qlora_path.dequant_scratch_bytes() <= 3 * max(w.numel() for w in weights) * 2  # the two + the one above
    # under capture: the single scratch (sized and tuned before, outside it), nothing on the side stream
    static_x = torch.randn(2048, dims[0], device="cuda", dtype=torch.bfloat16)
    qlora_prefetch.set_enabled(False)
    want = qlora_linear(static_x, weights[0], None, A[0].detach(), B[0].detach(), 2.0)
    qlora_prefetch.set_enabled(True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qlora_linear(static_x, weights[0], None, A[0].detach(), B[0].detach(), 2.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@interpreter_only
def test_a_weight_made_under_inference_mode_takes_the_single_scratch():
    """Its tensors count no writes, so a decoded copy could not be known stale: never kept in a prefetch buffer."""
    qlora_prefetch.set_enabled(True)
    with torch.inference_mode():
        w = quantize_nf4(torch.randn(32, 64) * 0.1)
    got = qlora_path.on_dequantized(w, torch.float32, lambda W: W.clone())
    assert torch.equal(got, w.dequantize(torch.float32))
    assert qlora_prefetch.nbytes() == 0 and qlora_path.dequant_scratch_bytes() == 32 * 64 * 4


@interpreter_only
def test_a_qlora_llama_trains_the_same_with_prefetch(monkeypatch):
    """A tiny random Llama layer, QLoRA on every linear (q, k, v share an input; attention and the MLP between): three
    optimizer steps with and without prefetch give the same losses and adapters bit for bit, and the third step's
    decodes are made ahead of their calls."""
    import copy

    import fastft
    from peft import LoraConfig
    from tests.utils import ALL_LINEAR, tiny_llama

    monkeypatch.setenv("FASTFT_LORA_BACKEND", "triton")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    model = fastft.get_peft_model(fastft.quantize_model(tiny_llama(num_hidden_layers=1), "nf4"),
                                  LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR))
    twin = copy.deepcopy(model)

    fills, step_of = [], [0]
    real_fill = qlora_prefetch.Prefetcher._fill
    monkeypatch.setattr(qlora_prefetch.Prefetcher, "_fill",
                        lambda self, *args: fills.append(step_of[0]) or real_fill(self, *args))

    def train(m):
        m.train()
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        losses = []
        for step in range(3):
            step_of[0] = step
            loss = m(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        return losses, [p.detach() for p in m.parameters() if p.requires_grad]

    want_losses, want_params = train(twin)
    qlora_prefetch.set_enabled(True)
    losses, params = train(model)
    assert torch.equal(torch.stack(losses), torch.stack(want_losses))
    assert all(torch.equal(p, w) for p, w in zip(params, want_params, strict=True))
    # decodes on the call's own stream: the first step's (the order is being learned), one in the second (its first
    # call: what follows the backward's last one is seen only then), none in the third: 7 forward + 4 dx GEMMs (the
    # first layer's q, k, v need no dx), every decode made ahead of its call
    assert fills.count(0) > 0 and fills.count(1) == 1 and fills.count(2) == 0, fills
