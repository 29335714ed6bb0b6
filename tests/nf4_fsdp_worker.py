"""QLoRA under FSDP2 on the CPU: run by tests/test_nf4_fsdp.py as
`python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.nf4_fsdp_worker OUT_DIR` (gloo).

Each rank builds the same NF4 + LoRA tiny Llama, shards it with fastft.shard_model and checks, against an
unsharded copy in the same process: the forward is equal; each rank stores half of the NF4 bytes; the forward
sees whole NF4Weights gathered from packed bytes. Then it trains a few AdamW steps on its half of a fixed
global batch, sharded and again under DDP; rank 0 saves both LoRA states for the test to compare with one
process on the whole batch. Before training, state dicts load into the sharded model (torch's and DCP's way,
copied into the NF4 shards or assigned), the next forward seeing the loaded weights; whole checkpoints load into a
sharded layer (bitsandbytes' keys, dense, DCP's full state dict); the sharded model saves as the unsharded one.
A second, small layer whose shards do not hold whole groups of nested scales checks the un-nested path and bf16
mixed precision. A CamemBERT whose head is tied to embeddings that sit in one of its `_no_split_modules` keeps the
tie when sharded and saves the head's key as the unsharded save does (dropped, re-tied on load).
"""
import copy
import json
import os
import sys

import torch
from torch import nn

import fastft
from fastft.quant import quantize_nf4
from tests.utils import ALL_LINEAR, randomize_lora_B, tiny_llama

STEPS = 3
GLOBAL_BATCH, SEQ = 4, 12


def build_nf4_model():
    """hidden 256: every (rows/2)·K of the Llama's linears is a multiple of 256·64, so shards keep nested scales."""
    model = tiny_llama(seed=0, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2)
    return fastft.quantize_model(model, "nf4")


def build_qlora_model():
    from peft import LoraConfig

    model = fastft.get_peft_model(build_nf4_model(), LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR,
                                                    lora_dropout=0.0))
    randomize_lora_B(model)
    return model


def tied_camembert():
    """A CamemBERT causal LM, NF4, its head tied to the word embeddings (which sit in CamembertEmbeddings, one of
    its `_no_split_modules`)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.CamembertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, max_position_embeddings=40, is_decoder=True,
                                          tie_word_embeddings=True)
    return fastft.quantize_model(transformers.CamembertForCausalLM(config).eval(), "nf4")


def batch():
    return torch.randint(0, 128, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def train(model, ids, steps=STEPS):
    """A few AdamW steps on `ids`; the mean token loss of equal-sized halves averages to the whole batch's."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def lora_state(model):
    from torch.distributed.tensor import DTensor
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def nf4_bytes(model):
    """(bytes of storage behind the packed codes and scales, bytes of the code tables) of every NF4 weight's local
    part: storage, not numel, so a shard that were a view into the whole weight would count it whole."""
    from torch.distributed.tensor import DTensor
    from fastft.quant import NF4Weight

    sharded = tables = 0
    for p in model.parameters():
        local = p._local_tensor if isinstance(p, DTensor) else p
        if isinstance(local, NF4Weight):
            parts = [local.packed, local.absmax] + ([local.absmax2] if local.double_quant else [])
            sharded += sum(t.untyped_storage().nbytes() for t in parts)
            tables += local.nbytes - sum(t.numel() * t.element_size() for t in parts)
    return sharded, tables


def load_full_checkpoints(mesh, x):
    """Whole (unsharded) checkpoints into an FSDP2-sharded NF4Linear: bitsandbytes' keys and a dense weight through
    load_state_dict (each rank copies its rows into its shard, FSDP2's parameter kept), and DCP's full state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from fastft.modules.nf4_linear import NF4Linear

    torch.manual_seed(11)
    layer, source = (NF4Linear.from_linear(nn.Linear(256, 128, bias=False)) for _ in range(2))
    fully_shard(layer, mesh=mesh)
    param, shard = layer.weight, layer.weight._local_tensor
    found, kept = {}, []
    dense = torch.randn(128, 256)
    loads = {"bnb": lambda: layer.load_state_dict(source.state_dict()),
             "dense": lambda: layer.load_state_dict({"weight": dense}),
             # DCP's full state dict: every rank has the whole NF4Weight, its pieces are scattered from rank 0
             "dcp": lambda: set_model_state_dict(layer, {"weight": source.weight.detach()},
                                                 options=StateDictOptions(full_state_dict=True))}
    with torch.no_grad():
        for how, load in loads.items():
            layer(x)  # the root layer stays unsharded after a forward: load_state_dict reshards it, then copies
            if how == "dcp":
                layer.reshard()  # DCP reads the parameters before that: sharded, it scatters the whole weight
            load()
            kept.append(layer.weight is param and layer.weight._local_tensor is shard)
            expected = x @ quantize_nf4(dense).dequantize().t() if how == "dense" else source(x)
            found[how] = (layer(x) - expected).abs().max().item()
    return {"full_loads_max_diff": found, "full_loads_kept_the_shard": all(kept)}


def main(out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from fastft.modules.nf4_linear import NF4Linear
    from fastft.quant import NF4Weight

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    ids = batch()
    local_ids = ids.chunk(world)[rank]
    report = {}

    model = build_qlora_model()
    plain = copy.deepcopy(model)
    full_bytes, _ = nf4_bytes(plain)
    fastft.shard_model(model, mesh)
    report["local_nf4_bytes"], report["table_bytes"] = nf4_bytes(model)
    report["full_nf4_bytes"] = full_bytes
    report["local_nested"] = all(p._local_tensor.double_quant for p in model.parameters()
                                 if isinstance(getattr(p, "_local_tensor", None), NF4Weight))

    # a checkpoint's full state dict gathers a sharded NF4 weight back whole (DTensor.full_tensor)
    name = "base_model.model.model.layers.1.mlp.down_proj.base_layer.weight"
    gathered = dict(model.named_parameters())[name].full_tensor()
    report["full_tensor_equal"] = isinstance(gathered, NF4Weight) and all(
        torch.equal(a, b) for a, b in zip(gathered._tensors(), dict(plain.named_parameters())[name]._tensors()))

    seen = []  # what the forward of an NF4 layer finds as its weight once FSDP2 has all-gathered it
    probe = next(m for m in model.modules() if isinstance(m, NF4Linear))
    probe.register_forward_pre_hook(lambda m, args: seen.append((type(m.weight).__name__, m.weight.packed.numel(),
                                                                 tuple(m.weight.shape))))
    model.eval(), plain.eval()
    with torch.no_grad():
        sharded_logits, plain_logits = model(local_ids).logits, plain(local_ids).logits
    report["forward_max_diff"] = (sharded_logits - plain_logits).abs().max().item()
    report["gathered_weight"] = seen[0]

    # a state dict loads into the sharded model: each NF4 shard copied in place (both torch's and DCP's way),
    # also another layer's weights, whose different nested offset the next all-gather must see
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    model.load_state_dict(model.state_dict())
    set_model_state_dict(model, get_model_state_dict(model))
    torch.manual_seed(5)
    into, other, third = (NF4Linear.from_linear(nn.Linear(256, 128)) for _ in range(3))
    refs, x = copy.deepcopy((other, third)), torch.randn(5, 256)
    for layer in (into, other, third):
        fully_shard(layer, mesh=mesh)
    with torch.no_grad():
        into(x)  # the unsharded weight exists before the load: later all-gathers write into it
        set_model_state_dict(into, get_model_state_dict(other))
        report["reloaded_forward_max_diff"] = (model(local_ids).logits - plain_logits).abs().max().item()
        report["loaded_other_max_diff"] = (into(x) - refs[0](x)).abs().max().item()
        into.load_state_dict(get_model_state_dict(third), assign=True)  # a new shard, not a copy
        report["assigned_other_max_diff"] = (into(x) - refs[1](x)).abs().max().item()
    report.update(load_full_checkpoints(mesh, x))
    # a sharded model saves as the unsharded one does (gathered onto rank 0, which writes; the NF4 model itself:
    # save_nf4_model refuses one holding adapters)
    nf4 = build_nf4_model()
    fastft.shard_model(nf4, mesh)
    fastft.save_nf4_model(nf4, os.path.join(out_dir, "saved_sharded"))
    if rank == 0:
        fastft.save_nf4_model(build_nf4_model(), os.path.join(out_dir, "saved_plain"))
    tied = tied_camembert()
    fastft.shard_model(tied, mesh)
    report["tie_kept"] = tied.lm_head.decoder.weight is tied.roberta.embeddings.word_embeddings.weight
    # as transformers' Trainer saves (is_main_process=False on the other ranks): every rank still gathers
    tied.save_pretrained(os.path.join(out_dir, "tied_sharded"), is_main_process=rank == 0)
    if rank == 0:
        fastft.save_nf4_model(tied_camembert(), os.path.join(out_dir, "tied_plain"))

    train(model, local_ids)
    state = lora_state(model)
    fastft.save_adapter(model, os.path.join(out_dir, "adapter_sharded"))  # no state_dict=: gathered, rank 0 writes
    report["adapter_written_before_return"] = os.path.isfile(os.path.join(out_dir, "adapter_sharded",
                                                                          "adapter_model.safetensors"))
    blocked = os.path.join(out_dir, "not_a_folder")  # rank 0's write fails: every rank raises, none waits
    if rank == 0:
        open(blocked, "w").close()
    dist.barrier()
    try:
        fastft.save_adapter(model, blocked)
        raised = None
    except Exception as e:
        raised = type(e).__name__
    report["failed_save_raised"] = [None] * world
    dist.all_gather_object(report["failed_save_raised"], raised)
    from peft import get_peft_model_state_dict  # what saving the adapter reads: works on the sharded model
    adapter = get_peft_model_state_dict(model)
    report["adapter_state_matches"] = len(adapter) == len(state) and all(
        torch.equal(v.full_tensor(), state[k.replace(".weight", ".default.weight")]) for k, v in adapter.items())

    # the same QLoRA model under DDP (the frozen NF4 weights are left out of DDP's start-up broadcast)
    from torch.nn.parallel import DistributedDataParallel
    ddp_model = fastft.ignore_nf4_in_ddp(build_qlora_model())
    train(DistributedDataParallel(ddp_model), local_ids)
    ddp_state = lora_state(ddp_model)

    # a layer whose shards split groups of nested scales (48 blocks a shard): un-nested shards, bf16 compute
    torch.manual_seed(3)
    layer = NF4Linear.from_linear(nn.Linear(96, 64))
    ref_layer = copy.deepcopy(layer)
    fully_shard(layer, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    report["unnested_local_absmax_dtype"] = str(layer.weight._local_tensor.absmax.dtype)
    x = torch.randn(5, 96)
    with torch.no_grad():
        y = layer(x)
        y_ref = ref_layer(x.bfloat16())
    report["unnested_forward_max_diff"] = (y.float() - y_ref.float()).abs().max().item()
    report["unnested_out_dtype"] = str(y.dtype)

    if rank == 0:
        torch.save(state, os.path.join(out_dir, "lora.pt"))
        torch.save(ddp_state, os.path.join(out_dir, "lora_ddp.pt"))
        with open(os.path.join(out_dir, "report.json"), "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
