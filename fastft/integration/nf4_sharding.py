"""Distributed NF4 models: `shard_model(model, mesh)` shards a (quantized, peft-wrapped) model with FSDP2, decoder
layer by layer, NF4 weights sharding their packed bytes and scales; `ignore_nf4_in_ddp(model)` keeps DDP from
broadcasting them."""
from __future__ import annotations

from torch import nn

from fastft.arguments import check_model
from fastft.quant.nf4_weight import NF4Weight


def _decoder_layer_names(model: nn.Module) -> set[str]:
    """transformers names the blocks that must stay whole (`_no_split_modules`); look through peft's wrappers."""
    for m in model.modules():
        names = getattr(m, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def _shares_a_parameter_outside(model: nn.Module, name: str, block: nn.Module) -> bool:
    inside = {id(p) for p in block.parameters()}
    return any(id(p) in inside and not n.startswith(name + ".")
               for n, p in model.named_parameters(remove_duplicate=False))


def shard_model(model: nn.Module, mesh=None, *, reshard_after_forward: bool = True, mp_policy=None,
                layer_classes=None) -> nn.Module:
    """FSDP2-shard `model` in place: `fully_shard` on every decoder layer, then on the root; returns it.

    Works on a plain, an NF4-quantized (`quantize_model` / `load_nf4_model`) and a peft-wrapped
    (`fastft.get_peft_model`) model — apply LoRA first, then shard. NF4 weights shard their packed bytes and
    scales (each rank holds 1/world of them; the forward all-gathers 4-bit codes, not a dense copy). Rows that do not
    split evenly shard as FSDP2 shards dense weights (ceil(rows/world) a rank, the last ranks fewer or none, padded
    for the all-gather, which then carries a byte a value: codes and fp32 scales).
    mesh: a 1-D DeviceMesh (default: all ranks of the initialised process group, on the parameters' device type);
    the model must already be on that device. mp_policy: a torch.distributed.fsdp.MixedPrecisionPolicy.
    layer_classes: class names of the blocks to shard one by one (default: the model's `_no_split_modules`); a block
    holding a weight tied to a module outside it (RoBERTa's embeddings and head) is left to the root's unit.
    Raises ValueError, naming the weight, for an NF4 weight whose shards over the mesh would cut through a
    quantization block (fastft.quant.nf4_tensor_ops.shard_problem).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fastft.quant.nf4_tensor_ops import check_shardable

    check_model(model, "shard_model")
    if mesh is None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("shard_model: no mesh given and torch.distributed is not initialised "
                               "(launch with torchrun / accelerate, or pass mesh=init_device_mesh(...))")
        device_type = next((p.device.type for p in model.parameters()), "cpu")
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"shard_model: expected a 1-D device mesh, got {mesh.ndim}-D ({mesh})")
    world = mesh.size()
    for name, p in model.named_parameters():
        if isinstance(p, NF4Weight):
            check_shardable(p, world, name)
    names = set(layer_classes) if layer_classes else _decoder_layer_names(model)
    layers = [(n, m) for n, m in model.named_modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"shard_model: no layer of {type(model).__name__} is one of {sorted(names)}; pass "
                         "layer_classes=[...] (the class names of its transformer blocks)")
    # a block sharing a weight with a module outside it (RoBERTa's embeddings, tied to its head) stays in the root's
    # unit: sharded on its own, the two modules would hold two parameters, trained apart and saved untied
    layers = [m for n, m in layers if not _shares_a_parameter_outside(model, n, m)]
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def unshardable_nf4_layer(model: nn.Module, world: int, blocksize: int = 64) -> str | None:
    """Why `shard_model` could not shard `model` over `world` ranks once `quantize_model(model)` quantized it: the
    first NF4 weight to be whose FSDP2 shards would cut through a quantization block
    (fastft.quant.nf4_tensor_ops.shard_problem), or None. Reads the layers' shapes only: `model` may be a
    meta-device skeleton, checked before any weight loads."""
    from fastft.integration.nf4_model import layers_to_quantize
    from fastft.modules.nf4_linear import linear_features
    from fastft.quant.nf4_tensor_ops import shard_problem

    targets, _ = layers_to_quantize(model)
    seen = set()
    for name, layer in targets:
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        in_features, out_features = linear_features(layer)
        problem = shard_problem((out_features, in_features), blocksize, world, f"{name}.weight")
        if problem:
            return problem
    return None


def ignore_nf4_in_ddp(model: nn.Module) -> nn.Module:
    """Tell DistributedDataParallel not to broadcast `model`'s NF4 weights; returns the model.

    DDP broadcasts every parameter from rank 0 when it wraps a model, by concatenating them — which a packed NF4
    weight cannot take part in. The NF4 weights are frozen and every rank quantizes or loads the same bytes, so
    there is nothing to synchronise. Call on the module you hand to DDP (or to accelerate's `prepare`), after
    `get_peft_model`: the names are relative to it.
    """
    from torch.nn.parallel import DistributedDataParallel

    check_model(model, "ignore_nf4_in_ddp")
    names = [name for name, p in model.named_parameters() if isinstance(p, NF4Weight)]
    names += list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(set(names)))
    return model
