"""Threads using fastft at once (a server generating from one model in threads; models built in threads), from an
audit of fastft's process-wide state: each thread gets what it gets alone.

- Prefix / prompt tuning's generate() put a wrapper on the base model for the call and deleted it after: a second
  thread's call wrapped the first's (positions shifted) or deleted it (steps without the virtual tokens, then an
  AttributeError); now one wrapper per model while calls are in flight, reading the calling thread's adjustment.
- IA3 on NF4 layers patches peft's IA3Model._create_new_module while it builds: read outside the lock, a second
  thread took the first's patch for peft's own and left it installed (plain peft then built fastft's layers).
"""
from __future__ import annotations

import threading

import pytest
import torch
from peft import IA3Config, PrefixTuningConfig, PromptTuningConfig
from peft.tuners.ia3 import IA3Model

import fastft
from fastft.kernels import runtime
from tests.utils import tiny_llama

THREADS, CALLS = 2, 6


def _in_threads(work, threads: int = THREADS) -> list:
    """work(thread, barrier) in `threads` threads started together; what each returned (an exception re-raised)."""
    barrier = threading.Barrier(threads, timeout=120)
    results = [None] * threads

    def run(thread):
        try:
            results[thread] = work(thread, barrier)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            results[thread] = e
            barrier.abort()  # the other threads stop waiting for this one

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:  # the first thread's own error, not the others' BrokenBarrierError
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generate_from_threads_on_one_prompt_learning_model_is_each_call_s_own(method):
    config = (PrefixTuningConfig if method == "prefix" else PromptTuningConfig)(num_virtual_tokens=3,
                                                                                task_type="CAUSAL_LM")
    model = fastft.get_peft_model(tiny_llama(), config).eval()
    with torch.no_grad():  # virtual tokens that change the scores
        for name, p in model.named_parameters():
            if "prompt_encoder" in name:
                p.normal_(0, 1.0)
    model.generation_config.pad_token_id = 0

    def generate(thread, call):
        ids = torch.randint(1, 128, (1, 5 + (thread + call) % 4),
                            generator=torch.Generator().manual_seed(100 * thread + call))
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        return out.sequences, torch.stack(out.scores)

    alone = {(t, c): generate(t, c) for t in range(THREADS) for c in range(CALLS)}

    def work(thread, barrier):
        out = []
        for call in range(CALLS):
            barrier.wait()
            out.append(generate(thread, call))
        return out

    for thread, outs in enumerate(_in_threads(work)):
        for call, (sequences, scores) in enumerate(outs):
            assert torch.equal(sequences, alone[thread, call][0])
            torch.testing.assert_close(scores, alone[thread, call][1], rtol=0, atol=0)
    assert "prepare_inputs_for_generation" not in model.get_base_model().__dict__


def test_ia3_on_nf4_models_built_in_threads_leaves_peft_as_it_was():
    peft_own = IA3Model.__dict__["_create_new_module"]
    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                       task_type="CAUSAL_LM")
    try:
        for _ in range(4):
            bases = [fastft.quantize_model(tiny_llama(seed=s), "nf4") for s in range(THREADS)]

            def work(thread, barrier):
                barrier.wait()
                return type(fastft.get_peft_model(bases[thread], config).get_base_model()
                            .model.layers[0].self_attn.k_proj).__name__

            assert _in_threads(work) == ["NF4IA3Linear"] * THREADS
            assert IA3Model.__dict__["_create_new_module"] is peft_own
    finally:
        IA3Model._create_new_module = peft_own


@pytest.mark.skipif(not runtime.INTERPRET, reason="the Triton interpreter's launches")
def test_interpreted_launches_from_two_threads_take_turns():
    """The interpreter patches triton.language for a launch and restores it after, and keeps the grid position in one
    builder: a launch in another thread that began inside the first and ended after it ran its kernel unpatched
    ("Did you forget to add @triton.jit ?" — a generate() in threads on a prefix-tuned model, 1 suite run in ~10).
    Here thread b's launch waits, inside it, for a's to end: with launches taking turns, b starts only after."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1, mask=mask)

    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()

    def launch(name, x, barrier):
        def grid(meta):  # evaluated inside the launch, after the interpreter patched the builtins
            (a_inside if name == "a" else b_inside).set()
            (b_inside if name == "a" else a_done).wait(timeout=2)
            return (1,)
        if name == "b":
            a_inside.wait(timeout=10)
        add_one[grid](x, x.numel(), BLOCK=8)
        if name == "a":
            a_done.set()
        return x

    xs = [torch.zeros(5), torch.zeros(5)]
    out = _in_threads(lambda thread, barrier: launch("ab"[thread], xs[thread], barrier))
    assert all(torch.equal(x, torch.ones(5)) for x in out)
