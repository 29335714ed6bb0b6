"""One benchmark run: a fresh model for (method, implementation), warm-up steps, timed training steps, memory.

A step is forward (labels = inputs, the model's own LM loss) + backward + optimizer step (--optimizer; AdamW, fused
on CUDA, by default) + zero_grad, on random token ids; a compiled run torch.compiles the model (forward, loss and
the backward AOTAutograd derives from them; not the optimizer step), which compiles during the warm-up steps. Each
timed step is bracketed by device synchronisation; tokens/s counts the batch's B×S tokens (prompt and prefix
tuning's virtual tokens are not counted). Any failure becomes the row's status (unavailable / not installed / oom /
error) and the next run goes on. A run whose loss became NaN/inf is "diverged", and a compiled run that dynamo
partly ran eagerly (its recompile limit hit, or no graph compiled) is "not compiled": both keep their timings in the
JSON, but no table cell, ratio or target uses them. On a card, the row also keeps the mean SM clock and power over
the timed steps (sm_mhz, power_w: fastft.apps.bench.clocks), to tell a power-limited clock from the method.
"""
from __future__ import annotations

import math
import statistics
import time
import traceback

import torch

from fastft.apps.bench import peers
from fastft.apps.bench.clocks import clock_log, rounded
from fastft.apps.bench.config import BenchConfig
from fastft.apps.bench.harness import PeakMemory, release_freed_memory
from fastft.apps.bench.shapes import build_model, resolve_dtype
from fastft.apps.compiling import CUDA_GRAPH_MODES, compile_kwargs, dynamo_counts
from fastft.apps.optimizers import make_optimizer
from fastft.integration.methods import MethodOptions

CUDA_GRAPH_WARMUP = 3  # warm-up steps of a compiled run that captures CUDA graphs


def method_options(cfg: BenchConfig) -> MethodOptions:
    return MethodOptions(rank=cfg.rank, alpha=cfg.alpha, num_virtual_tokens=cfg.num_virtual_tokens)


def run_one(cfg: BenchConfig, method: str, implementation: str, device: torch.device, compile: str = "off") -> dict:
    """The row of one run (never raises for a failure of the run itself). `compile`: "off" (eager) or the
    torch.compile mode the model's forward is compiled with (backend cfg.compile_backend)."""
    row = {"method": method, "implementation": peers.label(implementation, method), "peer": implementation,
           "compile": compile}
    if compile != "off":
        row["compile_backend"] = cfg.compile_backend
    no_path = peers.no_path(implementation, method)
    if no_path:
        return dict(row, status="unavailable", reason=no_path)
    missing = peers.missing_package(implementation, method)
    if missing:
        return dict(row, status="not installed", reason=f"{missing} is not installed")
    try:
        row.update(_measure(cfg, method, implementation, device, compile))
        row.update(_verdict(row))
    except NotImplementedError as err:   # a method fastft (or the peer) does not have yet
        row.update(status="unavailable", reason=_one_line(err))
    except torch.OutOfMemoryError as err:
        row.update(status="oom", error=_one_line(err))
    except Exception as err:  # noqa: BLE001 - recorded in the row; the other runs go on
        row.update(status="error", error=f"{type(err).__name__}: {_one_line(err)}",
                   traceback=traceback.format_exc(limit=-8))  # the innermost frames
    finally:
        _release(device)
    return row


def _measure(cfg: BenchConfig, method: str, implementation: str, device: torch.device, compile: str = "off") -> dict:
    dtype = resolve_dtype(cfg.dtype, device)
    _release(device)
    meter = PeakMemory(device)   # on CPU its baseline is the RSS before the model exists

    def build():
        return build_model(shape=None if cfg.model else cfg.shape, model=cfg.model, seq_len=cfg.seq_len,
                           dtype=dtype, device=device, seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing)

    start = time.perf_counter()
    model, notes = peers.prepare(implementation, method, method_options(cfg), build, patch_model=cfg.patch_model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"{method} ({implementation}) left no parameter requiring grad")
    optimizer = make_optimizer(cfg.optimizer, model, lr=cfg.lr, weight_decay=0.0)
    build_s = time.perf_counter() - start
    release_freed_memory()  # what building freed (a QLoRA row's dense weights, once quantized): not this row's peak
    vocab = model.config.vocab_size if hasattr(model, "config") else model.get_base_model().config.vocab_size
    if compile != "off":
        fresh_dynamo(device)
    counts_before = dynamo_counts()
    forward = model if compile == "off" else torch.compile(model, **compile_kwargs(compile, cfg.compile_backend))
    tokens = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len),
                           generator=torch.Generator().manual_seed(cfg.seed)).to(device)

    def step():
        loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # kept until the end: a CUDA graph's output (reduce-overhead) is overwritten by the next replay, so a copy
        return loss.detach() if compile == "off" else loss.detach().clone()

    warmup = warmup_steps(cfg, compile)
    start = time.perf_counter()
    losses, compiled_again = [], False
    # a warm-up step after the first that compiled again (a guard that failed on a later call: a model whose mask
    # notes its window at the first traced call) says the next may too: warm up on until a step compiles nothing,
    # at most EXTRA_WARMUP more (the first step always compiles; a compilation left among the timed steps, as with
    # --warmup 1, is flagged below)
    while len(losses) < warmup or (compiled_again and len(losses) < warmup + EXTRA_WARMUP):
        before = dynamo_counts() if compile != "off" else None
        losses.append(step())
        compiled_now = before is not None and dynamo_counts() != before
        compiled_again = compiled_now and len(losses) > 1
    warmup = len(losses)
    _sync(device)
    warmup_s = time.perf_counter() - start
    step_ms = []
    clocks = clock_log()
    timed_from = clocks.mark()
    timed_counts = dynamo_counts()
    with meter:
        for _ in range(cfg.steps):
            _sync(device)
            t0 = time.perf_counter()
            losses.append(step())
            _sync(device)
            step_ms.append((time.perf_counter() - t0) * 1e3)
    clock = clocks.since(timed_from)  # the card's SM clock and power over the timed steps
    losses = [float(v) for v in losses]
    mean_ms = statistics.fmean(step_ms)
    compiled = {} if compile == "off" else {"compile_stats": _counts_since(counts_before),
                                            "compiled_while_timed": dynamo_counts() != timed_counts}
    return {
        "tokens_per_s": cfg.batch_size * cfg.seq_len / (mean_ms / 1e3),
        "step_ms": mean_ms,
        "step_ms_median": statistics.median(step_ms),
        "step_ms_all": step_ms,
        "peak_gib": meter.peak_gib,
        "memory_kind": meter.kind,
        "trainable_params": sum(p.numel() for p in params),
        "loss_first": losses[0], "loss_last": losses[-1],
        "build_s": build_s, "warmup_s": warmup_s, "warmup_steps": warmup,
        "sm_mhz": rounded(clock, "sm_mhz"), "power_w": rounded(clock, "power_w"),
        **compiled,
        **notes,
    }


def fresh_dynamo(device: torch.device) -> None:
    """A fresh dynamo before each compiled run, as in a new process: earlier rows compiled the same transformers
    frames (LlamaAttention.forward, ...), and past torch._dynamo.config.recompile_limit dynamo runs them eagerly."""
    torch._dynamo.reset()
    if device.type == "cuda":   # CUDA graph trees are global state too (newer torch resets them in reset())
        try:
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees
        except ImportError:
            return
        reset_cudagraph_trees()


def _counts_since(before: dict[str, int]) -> dict[str, int]:
    return {k: v - before[k] for k, v in dynamo_counts().items()}


def _verdict(row: dict) -> dict:
    """The status of a measured row: "ok", or why its numbers must not be compared."""
    if not (math.isfinite(row["loss_last"]) and math.isfinite(row["loss_first"])):
        return {"status": "diverged", "reason": f"the loss became non-finite (first {row['loss_first']}, last "
                                                f"{row['loss_last']}): the timings are of a broken run"}
    stats = row.get("compile_stats")
    if stats and stats["recompile_limit_hits"]:
        hits = stats["recompile_limit_hits"]
        return {"status": "not compiled",
                "reason": f"torch._dynamo hit its recompile limit ({hits}x): parts of the step ran eagerly"}
    if stats is not None and stats["graphs"] == 0:
        return {"status": "not compiled", "reason": "torch.compile compiled no graph: the step ran eagerly"}
    if row.get("compiled_while_timed"):
        return {"status": "compiled while timed",
                "reason": f"torch.compile compiled again during the timed steps (after {row['warmup_steps']} warm-up "
                          "steps): the mean step holds a compilation; give --warmup more steps"}
    return {"status": "ok"}


EXTRA_WARMUP = 3  # warm-up steps a compiled run may add while its steps still compile


def warmup_steps(cfg: BenchConfig, compile: str) -> int:
    """--warmup, but at least CUDA_GRAPH_WARMUP for a compiled run that captures CUDA graphs (reduce-overhead,
    max-autotune): they run a function once unrecorded, record it on the second call and replay from the third, so a
    step timed earlier would hold the recording."""
    return max(cfg.warmup, CUDA_GRAPH_WARMUP) if compile in CUDA_GRAPH_MODES else cfg.warmup


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    from fastft.ops import release_dequant_scratch

    release_dequant_scratch()  # fastft QLoRA's shared decode buffer: not the next row's (a peer's) memory
    release_freed_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]
