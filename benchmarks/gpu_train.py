"""GPU benchmark of `fastft train`'s step against transformers' Trainer + peft (+ bitsandbytes for QLoRA),
one run, one card: SFT with packing (documents of 64–1024 tokens back to back, no padding), LoRA r=16 on all
linear layers, dropout 0, bf16 weights, AdamW.

Both sides train alike (`fastft train`'s defaults): torch AdamW (fused on CUDA) at a constant lr 1e-4, no weight
decay, no gradient clipping, no autocast (the weights are bf16 already). Each row records what its side used
("setup", read back from the optimizer and the Trainer's arguments) so a difference shows.

Models: random-init Llamas of the SmolLM2-135M shape (30 layers, hidden 576, 9/3 heads, vocab 49152) and of
the Llama-3.2-1B shape (16 layers, hidden 2048, vocab 128256); no hub, no data package needed. Both sides get
the same documents in the same order, `DOCS_PER_STEP` per optimizer step packed into one row (fastft:
fastft.integration.packing.PackingCollator; Trainer: DataCollatorWithFlattening). tokens/s is measured over
the steps after WARMUP; peak memory is torch.cuda.max_memory_allocated over the run. LoRA on the SmolLM2 shape also
runs compiled with CUDA graphs (`--compile reduce-overhead`), its batches padded to bucket lengths
(`--pad-to-buckets`, tokens/s over the real tokens) and as they come (a graph recorded per new shape); a new
bucket within the timed steps records a graph too (step_ms_median beside the mean).

  python benchmarks/gpu_train.py              # on the GPU machine (benchmarks/gpu_check.sh section `train`)
  python benchmarks/gpu_train.py --cpu-smoke  # a tiny model, 2 steps each, LoRA only: checks the script runs
"""
from __future__ import annotations

import copy
import gc
import os
import sys
import tempfile
import time

import torch

from fastft.apps.bench import card_name, markdown_table, write_results

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
}
STEPS, WARMUP = int(os.environ.get("TRAIN_BENCH_STEPS", 14)), int(os.environ.get("TRAIN_BENCH_WARMUP", 4))
DOCS_PER_STEP = int(os.environ.get("TRAIN_BENCH_DOCS", 16))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 0.0, 0.0   # the same on both sides; MAX_GRAD_NORM 0: no clipping


def documents(vocab: int, count: int, seed: int = 0, lengths=(64, 1024)):
    """Examples with random lengths; the first eighth of each is prompt (no loss)."""
    from fastft.apps.training.data import Example

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(lengths[0], lengths[1] + 1, (), generator=g))
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append(Example(ids, [-100] * (n // 8) + ids[n // 8:]))
    return out


def base_model(shape: str, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, attn_implementation="sdpa", **SHAPES[shape])
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def _reset(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None   # None: not measured


def adamw(params, device) -> torch.optim.AdamW:
    """fastft's optimizer: what the Trainer builds for trainer_arguments' optim."""
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True if device.type == "cuda" else None)


def trainer_arguments(out: str, device, steps: int):
    """The Trainer's settings, matched to fastft's side: its AdamW, lr, weight decay, no clipping, no autocast."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out, per_device_train_batch_size=DOCS_PER_STEP, max_steps=steps,
                             learning_rate=LR, lr_scheduler_type="constant", weight_decay=WEIGHT_DECAY,
                             max_grad_norm=MAX_GRAD_NORM, optim="adamw_torch_fused" if device.type == "cuda"
                             else "adamw_torch", bf16=False, fp16=False, report_to=[], save_strategy="no",
                             logging_strategy="no", dataloader_num_workers=0, use_cpu=device.type != "cuda",
                             remove_unused_columns=False)


def setup(optimizer, max_grad_norm: float, autocast: bool) -> dict:
    """What a side trained with, read back from its optimizer (the Trainer's is wrapped by accelerate)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    group = inner.param_groups[0]
    return {"optimizer": type(inner).__name__, "fused": bool(group.get("fused")),
            "lr": sorted({g["lr"] for g in inner.param_groups}),
            "weight_decay": sorted({g["weight_decay"] for g in inner.param_groups}),
            "betas": list(group["betas"]), "eps": group["eps"], "max_grad_norm": max_grad_norm, "autocast": autocast}


def run_fastft(model, method: str, docs, device, attn: str, compile_mode: str | None = None,
               bucket: bool = False) -> dict:
    """The step `fastft train` runs: apply_method, ObjectiveModel (hidden states, LM head at targets only),
    exact-count accumulation, AdamW; compile_mode: torch.compile of the objective (as --compile; "smoke": aot_eager
    on the CPU); bucket: batches padded to bucket lengths (--pad-to-buckets), tokens/s over the real tokens."""
    from accelerate import Accelerator

    from fastft.apps.training.data import pack
    from fastft.apps.training.loop import accumulate
    from fastft.apps.training.objectives import ObjectiveModel, token_rows
    from fastft.integration.methods import MethodOptions, apply_method

    if attn == "fastft":
        import fastft.integration.attention  # noqa: F401
        model.config._attn_implementation = "fastft"
    accelerator = Accelerator(cpu=device.type != "cuda")
    model = apply_method(model, method, MethodOptions(rank=16, alpha=32, dropout=0.0, target_modules=tuple(TARGETS)))
    objective = ObjectiveModel(model, "sft").train()
    rows = token_rows(model)
    if compile_mode is not None:
        torch._dynamo.reset()
        smoke = compile_mode == "smoke"
        objective = torch.compile(objective, mode=None if smoke else compile_mode,
                                  backend="aot_eager" if smoke else "inductor")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, device)
    _reset(device)
    times, tokens = [], []
    for step in range(STEPS):
        batch = pack(docs[step * DOCS_PER_STEP:(step + 1) * DOCS_PER_STEP], pad_token_id=0,
                     flash_kwargs=attn == "fastft", bucket=bucket)
        # as fastft train's batches: ids checked on the host, so the fused loss does not read the device for them
        assert int(batch["input_ids"].max()) < rows
        batch["checked_on_host"] = True
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) and k != "choices" else v for k, v in batch.items()}
        start = time.perf_counter()
        accumulate(objective, objective.count, [batch], accelerator)
        if MAX_GRAD_NORM > 0:
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        tokens.append(batch["num_tokens"])  # the real ones (a bucketed row's padding is not counted)
    return _summary(times, tokens, device) | {"setup": setup(optimizer, MAX_GRAD_NORM,
                                                              accelerator.mixed_precision != "no")}


def run_trainer(model, method: str, docs, device) -> dict:
    """transformers' Trainer + peft (+ bitsandbytes NF4 with double quantization for QLoRA), same documents."""
    import peft
    from transformers import BitsAndBytesConfig, DataCollatorWithFlattening, LlamaForCausalLM, Trainer, TrainerCallback

    if method == "qlora":
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            dtype = model.dtype
            del model
            _reset(device)
            model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype), device_map={"": device.index or 0})
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                       task_type="CAUSAL_LM"))
    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    data = [{"input_ids": d.input_ids, "labels": d.labels} for d in docs[:STEPS * DOCS_PER_STEP]]
    for i in range(STEPS):
        tokens.append(sum(len(d["input_ids"]) for d in data[i * DOCS_PER_STEP:(i + 1) * DOCS_PER_STEP]))
    with tempfile.TemporaryDirectory() as out:
        args = trainer_arguments(out, device, STEPS)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithFlattening(),
                          callbacks=[Clock()])
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(data)  # same order
        _reset(device)
        trainer.train()
    return _summary(times, tokens, device) | {"setup": setup(trainer.optimizer, args.max_grad_norm,
                                                              args.bf16 or args.fp16)}


def _summary(times, tokens, device) -> dict:
    steady = slice(min(WARMUP, len(times) - 1), None)
    return {"tokens_per_s": sum(tokens[steady]) / sum(times[steady]), "step_ms": 1000 * sum(times[steady]) /
            len(times[steady]), "step_ms_median": 1000 * sorted(times[steady])[len(times[steady]) // 2],
            "peak_gib": _peak_gib(device), "steps": len(times)}


def main() -> int:
    smoke = "--cpu-smoke" in sys.argv
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    shapes = ["tiny"] if smoke else ["smollm2-135m", "llama-1b"]
    methods = ["lora"] if smoke else ["lora", "qlora"]
    global STEPS, WARMUP
    if smoke:
        STEPS, WARMUP = 2, 1
    card = card_name()
    rows, failures = [], []

    def save(complete: bool):  # after every run: a section cut short keeps the runs it finished
        write_results("train", dict(card=card, torch=torch.__version__, steps=STEPS, warmup=WARMUP,
                                    docs_per_step=DOCS_PER_STEP, rows=rows, failures=failures, complete=complete))

    for shape in shapes:
        docs = documents(SHAPES[shape]["vocab_size"], STEPS * DOCS_PER_STEP, lengths=(8, 48) if smoke else (64, 1024))
        base = base_model(shape, device, dtype)
        for method in methods:
            runs = [("fastft", lambda: run_fastft(copy.deepcopy(base), method, docs, device, "sdpa")),
                    ("transformers Trainer + peft" + (" + bnb" if method == "qlora" else ""),
                     lambda: run_trainer(copy.deepcopy(base), method, docs, device))]
            if not smoke:
                runs.insert(1, ("fastft, attn fastft", lambda: run_fastft(copy.deepcopy(base), method, docs, device,
                                                                          "fastft")))
            if method == "lora" and shape in ("tiny", "smollm2-135m"):
                # CUDA graphs (reduce-overhead) on packed batches: padded to bucket lengths, and as they come (a
                # graph recorded per new shape); the smoke run checks the compiled, bucketed path on the CPU
                modes = [("smoke", True)] if smoke else [("reduce-overhead", True), ("reduce-overhead", False)]
                for mode, bucket in modes:
                    runs.insert(-1, (f"fastft, compile {mode}" + (" + buckets" if bucket else ""),
                                     lambda mode=mode, bucket=bucket: run_fastft(
                                         copy.deepcopy(base), method, docs, device, "sdpa", mode, bucket)))
            for name, fn in runs:
                try:
                    result = fn()
                except Exception as e:  # noqa: BLE001 - report and go on to the next run
                    failures.append(f"{shape} {method} {name}: {type(e).__name__}: {e}")
                    print(failures[-1], flush=True)
                    continue
                rows.append({"model": shape, "method": method, "run": name, **result})
                print(markdown_table(rows[-1:], ["model", "method", "run", "tokens_per_s", "step_ms", "peak_gib"]),
                      flush=True)
                save(complete=False)
                _reset(device)
        del base
    columns = ["model", "method", "run", "tokens_per_s", "step_ms", "step_ms_median", "peak_gib"]
    print(f"\n## fastft train step vs Trainer + peft on {card} (SFT, packed, {DOCS_PER_STEP} docs/step, "
          f"r=16 all linear, tokens/s over steps {WARMUP + 1}-{STEPS})")
    print(markdown_table(rows, columns))
    save(complete=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
