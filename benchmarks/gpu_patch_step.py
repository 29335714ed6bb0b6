"""GPU benchmark: one LoRA training step of a random-init Llama-3.2-1B-shape model (16 layers, hidden 2048,
32/8 heads of 64, intermediate 8192, vocab 128256, tied embeddings) at B4 × S2048, bf16, LoRA r16 alpha 32 on
all linear layers, AdamW (fused) on the adapters:

    peft                 peft.get_peft_model, sdpa attention, transformers' loss (the anchor's 36.6k tokens/s)
    peft+liger           Liger-Kernel on the instance (rope, swiglu, rmsnorm, fused linear CE), then peft
    fastft               fastft.get_peft_model (fused LoRA layers), unpatched
    fastft+patch         ... + fastft.patch_model (layer kernels, fastft attention, fused loss: no logits)
    fastft+patch+lm_head ... with a LoRA on lm_head too, trained through the fused loss (no peer can)

Each variant runs in its own process (Liger patches transformers' module functions globally; peak memory
must not carry over). Before timing, the patched variants check that patching leaves the loss of the same
model and batch within bf16 rounding. tokens/s is the mean of 6 steps after 2 warm-ups (as the anchors),
peak GiB the allocator's peak over those steps. Run: python benchmarks/gpu_patch_step.py
(FASTFT_BENCH_SMOKE=1: a CPU dry run at toy sizes.)
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

from smoke_mode import DEVICE, SMOKE  # first: the interpreter before triton loads

import torch

# peft first (the ratios' base), then the variant no peer has: gpu_check.sh's cap can cut the last ones (5 runs of
# up to FASTFT_STEP_TIMEOUT s each against its 330 s)
VARIANTS = ["peft", "fastft+patch+lm_head", "fastft+patch", "fastft", "peft+liger"]
DTYPE = torch.float32 if SMOKE else torch.bfloat16
BATCH, SEQ = (1, 16) if SMOKE else (4, 2048)
WARMUP, STEPS = (1, 1) if SMOKE else (2, 6)
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = (dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16) if SMOKE else
             dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64))
    config = LlamaConfig(**shape, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config)
    return model.to(DTYPE)


def batch(seed: int):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    ids = torch.randint(0, 128 if SMOKE else 128000, (BATCH, SEQ), device=DEVICE, generator=g)
    return ids, ids.clone()


def step_loss(model, seed=123):
    ids, labels = batch(seed)
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.float().item()


def prepare(variant: str):
    """(model, note): the variant's model ready to train."""
    import peft

    model = build_model()
    targets = LINEARS + (["lm_head"] if variant.endswith("lm_head") else [])
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets)
    note = ""
    if variant == "peft+liger":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    if variant.startswith("peft"):
        return peft.get_peft_model(model, config), note
    import fastft

    model = fastft.get_peft_model(model, config)
    if "patch" in variant:
        before = step_loss(model)
        fastft.patch_model(model)
        after = step_loss(model)
        rel = abs(after - before) / abs(before)
        if not rel < 1e-2:
            raise AssertionError(f"patched loss {after:.5f} vs unpatched {before:.5f} (rel {rel:.1e})")
        note = f"loss patched/unpatched rel diff {rel:.1e}; {model.get_base_model()._fastft_patch.summary}"
    return model, note


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_variant(variant: str) -> dict:
    model, note = prepare(variant)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=DEVICE == "cuda")

    def step(seed):
        ids, labels = batch(seed)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(WARMUP):
        step(i)
    sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(STEPS):
        loss = step(100 + i)
    sync()
    seconds = (time.perf_counter() - start) / STEPS
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
    return dict(variant=variant, tokens_per_s=BATCH * SEQ / seconds, step_ms=seconds * 1e3, peak_gib=peak,
                trainable_m=sum(p.numel() for p in params) / 1e6, last_loss=float(loss), note=note)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--variant":
        try:
            row = run_variant(sys.argv[2])
        except Exception as err:  # noqa: BLE001 - the parent reports it as the variant's row
            row = dict(variant=sys.argv[2], error=f"{type(err).__name__}: {err}"[:300])
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    from fastft.apps.bench import card_name, markdown_table, write_results

    card = card_name()
    print(f"card: {card}; torch {torch.__version__}; B{BATCH} x S{SEQ}, {DTYPE}", flush=True)

    def save(rows, complete):
        base = next((r["tokens_per_s"] for r in rows if r["variant"] == "peft" and "tokens_per_s" in r), None)
        for r in rows:
            if base and "tokens_per_s" in r:
                r["vs_peft"] = r["tokens_per_s"] / base
        write_results("patch_step", dict(card=card, torch=torch.__version__, batch=BATCH, seq=SEQ, dtype=str(DTYPE),
                                         rows=rows, complete=complete))

    rows = []
    for variant in VARIANTS:
        if variant == "peft+liger" and importlib.util.find_spec("liger_kernel") is None:  # no process started for it
            rows.append(dict(variant=variant, error="liger_kernel is not installed"))
            print(json.dumps(rows[-1]), flush=True)
            continue
        try:
            proc = subprocess.run([sys.executable, __file__, "--variant", variant], capture_output=True, text=True,
                                  timeout=int(os.environ.get("FASTFT_STEP_TIMEOUT", "150")))
            found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            row = json.loads(found[-1][7:]) if found else dict(variant=variant, error=proc.stderr[-300:])
        except subprocess.TimeoutExpired:
            row = dict(variant=variant, error="timed out")
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(rows, complete=False)  # after every variant: a section cut short keeps the variants it finished
    save(rows, complete=True)
    print(f"\n## LoRA r16 training step, Llama-3.2-1B shape, B{BATCH} x S{SEQ}, {DTYPE}, on {card}")
    print(markdown_table(rows, ["variant", "tokens_per_s", "vs_peft", "step_ms", "peak_gib", "trainable_m",
                                "error"]))
    return 1 if any("error" in r and not r["variant"] == "peft+liger" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
