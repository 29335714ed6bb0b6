"""QLoRA under FSDP2 over a process count that does not split the NF4 weights' rows evenly: run by
tests/test_nf4_uneven_shards.py as `python -m torch.distributed.run --standalone --nproc_per_node 3
-m tests.nf4_uneven_fsdp_worker OUT_DIR` (gloo, CPU).

Each rank builds the same NF4 + LoRA tiny Llama (64-, 32- and 128-row projections: 22/22/20, 11/11/10 and 43/43/42
rows a rank), an unsharded copy, and shards the model with fastft.shard_model. On the whole batch the sharded
forward must equal the unsharded one bit for bit; then each rank runs forward+backward on its third of the batch and
the gathered LoRA gradients must equal the unsharded model's on the whole batch (fp32 rounding of the averaging
only). A lone NF4Linear with 4 output rows (2, 2 and an empty shard) checks an empty shard, twice (the second
all-gather writes into the buffers FSDP2 re-allocated)."""
import copy
import json
import sys

import torch

import fastft
from tests.utils import ALL_LINEAR, randomize_lora_B, tiny_llama

SEQ = 10


def build_qlora_model():
    from peft import LoraConfig

    model = tiny_llama(seed=0, hidden_size=64, intermediate_size=128)
    fastft.quantize_model(model, "nf4")
    model = fastft.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, lora_dropout=0.0))
    randomize_lora_B(model)
    return model


def lora_grads(model):
    from torch.distributed.tensor import DTensor
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def local_rows(model):
    from torch.distributed.tensor import DTensor
    from fastft.quant import NF4Weight
    rows = {}
    for name, p in model.named_parameters():
        local = p._local_tensor if isinstance(p, DTensor) else p
        if isinstance(local, NF4Weight) and "layers.0." in name:
            rows[name.split("layers.0.")[1]] = local.shape[0]
    return rows


def empty_shard_layer(mesh):
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from fastft.modules.nf4_linear import NF4Linear

    torch.manual_seed(5)
    layer = NF4Linear.from_linear(nn.Linear(64, 4))
    plain = copy.deepcopy(layer)
    fully_shard(layer, mesh=mesh)
    rows = layer.weight._local_tensor.shape[0]
    x = torch.randn(3, 64)
    with torch.no_grad():  # the root stays unsharded after its forward: reshard, so the next one gathers again
        diffs = []
        for _ in range(2):
            diffs.append((layer(x) - plain(x)).abs().max().item())
            layer.reshard()
    return {"empty_shard_rows": rows, "empty_shard_diffs": diffs}


def full_tensors_match(model, plain) -> bool:
    """DTensor.full_tensor() of every sharded NF4 weight (state dicts, saving): the short shards padded by DTensor
    (constant_pad_nd), gathered and narrowed back dequantize to the unsharded weight bit for bit."""
    from torch.distributed.tensor import DTensor
    from fastft.quant import NF4Weight
    whole = dict(plain.named_parameters())
    checked = [torch.equal(p.full_tensor().dequantize(), whole[n].dequantize())
               for n, p in model.named_parameters()
               if isinstance(p, DTensor) and isinstance(p._local_tensor, NF4Weight)]
    return len(checked) == 14 and all(checked)


def save_sharded_base(mesh, out_dir, rank):
    """An NF4 tiny Llama (no LoRA) sharded over the ranks and saved: rank 0 writes what load_nf4_model reads back."""
    base = fastft.quantize_model(tiny_llama(seed=3, hidden_size=64, intermediate_size=128), "nf4")
    fastft.shard_model(base, mesh)
    fastft.save_nf4_model(base, f"{out_dir}/saved_sharded")


def state_dict_loads(mesh, in_features, out_features):
    """Loads into an NF4Linear sharded unevenly: DCP's full state dict (scattered from rank 0), bitsandbytes' keys
    through load_state_dict (each rank copies its rows) and another sharded layer's state dict (another nested offset
    copied into a shard that is some rows of a padded buffer); then full_tensor. {how: max diff or the error}."""
    from torch import nn
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from fastft.modules.nf4_linear import NF4Linear

    torch.manual_seed(9)
    layer, source = (NF4Linear.from_linear(nn.Linear(in_features, out_features, bias=False)) for _ in range(2))
    fully_shard(layer, mesh=mesh)
    other = copy.deepcopy(source)
    fully_shard(other, mesh=mesh)
    loads = {"dcp_full": lambda: set_model_state_dict(layer, {"weight": source.weight.detach()},
                                                      options=StateDictOptions(full_state_dict=True)),
             "bnb": lambda: layer.load_state_dict(source.state_dict()),
             "sharded": lambda: set_model_state_dict(layer, get_model_state_dict(other))}
    x, found = torch.randn(2, in_features), {}
    for how, load in loads.items():
        layer.load_state_dict(NF4Linear.from_linear(nn.Linear(in_features, out_features, bias=False)).state_dict())
        try:
            load()
        except NotImplementedError as e:
            found[how] = str(e)
            continue
        with torch.no_grad():
            found[how] = (layer(x) - source(x)).abs().max().item()
            layer.reshard()
    found["full_tensor"] = torch.equal(layer.weight.full_tensor().dequantize(), source.weight.dequantize())
    return found


def main(out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    ids = torch.randint(0, 128, (world, SEQ), generator=torch.Generator().manual_seed(7))

    model = build_qlora_model()
    plain = copy.deepcopy(model)
    fastft.shard_model(model, mesh)
    report = {"local_rows": local_rows(model)}
    with torch.no_grad():
        report["forward_max_diff"] = (model(ids).logits - plain(ids).logits).abs().max().item()

    model.train(), plain.train()
    loss = model(ids[rank:rank + 1], labels=ids[rank:rank + 1]).loss
    loss.backward()
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    sharded = lora_grads(model)
    whole = plain(ids, labels=ids).loss
    whole.backward()
    single = lora_grads(plain)
    report["mean_loss_diff"] = abs(torch.stack(losses).mean().item() - whole.item())
    report["grad_names"] = len(single)
    report["grad_max_abs"] = max(g.abs().max().item() for g in single.values())
    report["grad_max_diff"] = max((sharded[n] - g).abs().max().item() for n, g in single.items())
    report.update(empty_shard_layer(mesh))
    model.eval()
    with torch.no_grad():
        model(ids)  # leaves the root unsharded: full_tensor must reshard-gather all the same
    report["full_tensors_match"] = full_tensors_match(model, plain)
    save_sharded_base(mesh, out_dir, rank)
    # 10 rows of 16384 values (one group of 256 nested scales a row) over 3: 4, 4, 2 rows, every piece nested;
    # 383x128 over 3: 128, 128, 127 rows, the last splitting a group (un-nested) while the others keep theirs
    report["loads_all_nested"] = state_dict_loads(mesh, 16384, 10)
    report["loads_mixed"] = state_dict_loads(mesh, 128, 383)
    if rank == world - 1:
        with open(f"{out_dir}/report.json", "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
