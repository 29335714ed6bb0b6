"""The FSDP-QLoRA recipe on a model transformers loaded with bitsandbytes, on the CPU: run by
tests/test_bitsandbytes_nf4_model_runs_fastft_kernels.py as
`python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.bnb_fsdp_worker CHECKPOINT OUT_DIR` (gloo).

Each rank loads the checkpoint with `bnb_4bit_quant_storage=torch.bfloat16` (what FSDP recipes set), wraps it with
fastft.get_peft_model (its bitsandbytes layers become fastft NF4 layers), shards it with fastft.shard_model and runs
a forward and backward on the whole batch, beside an unsharded copy in the same process; rank 0 writes the loss and
gradient differences and saves the adapter (gathered)."""
import json
import os
import sys
from pathlib import Path

import peft
import torch
import torch.distributed as dist

import fastft
from tests.bnb_utils import load_bnb


def build(checkpoint):
    model = load_bnb(checkpoint, bnb_4bit_quant_storage=torch.bfloat16)
    torch.manual_seed(0)
    return fastft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def main(checkpoint: str, out: str) -> None:
    dist.init_process_group("gloo")
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    plain, sharded = build(checkpoint), fastft.shard_model(build(checkpoint))
    losses = []
    for model in (plain, sharded):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    worst = 0.0
    for name, p in sharded.named_parameters():
        if p.requires_grad:
            grad = p.grad.full_tensor()
            worst = max(worst, ((grad - grads[name]).abs().max() / grads[name].abs().max()).item())
    fastft.save_adapter(sharded, Path(out) / "adapter")
    if dist.get_rank() == 0:
        report = {"losses": losses, "grad_rel_err": worst, "gradients": len(grads)}
        (Path(out) / "report.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
    # done (the report written, the group down): no interpreter teardown, where a rank aborted once under load
    # ("terminate called without an active exception", SIGABRT: a native thread's destructor at exit)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
