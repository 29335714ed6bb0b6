"""Loading into NF4 layers, found in review: deferred init (meta, then `to_empty`, then a load), a checkpoint of
the same layout copied in place, whole checkpoints into an FSDP2 shard (one rank here; 2 ranks:
tests/nf4_fsdp_worker.py), DCP's full state dict, and saving a sharded model."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

from fastft.integration.nf4_files import save_nf4_model
from fastft.integration.nf4_model import quantize_model
from fastft.modules.nf4_linear import NF4Linear
from fastft.quant import NF4Weight, quantize_nf4
from fastft.quant.nf4_format import nf4_code


def _parts_on(w, device):
    return all(t.device.type == device for t in w._tensors_and_offset())


def layout(w):
    return (tuple(w.shape), w.dtype, w.blocksize, w.double_quant, w.absmax.dtype, w.nested_blocksize)


# ----------------------------------------------------------------------------------------------
# 1. meta, then to_empty: a zero weight of the same layout on the device, to load into

@pytest.mark.parametrize("double_quant", [True, False])
def test_to_empty_after_meta_gives_a_weight_to_load_into(double_quant):
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(64, 32), double_quant=double_quant)
    state = copy.deepcopy(layer.state_dict())
    empty = copy.deepcopy(layer).to("meta").to_empty(device="cpu")
    w = empty.weight
    assert isinstance(w, NF4Weight) and _parts_on(w, "cpu") and layout(w) == layout(layer.weight)
    assert torch.equal(w.code, nf4_code()) and not w.dequantize().any()
    empty.load_state_dict(state)
    assert empty.weight is w and torch.equal(w.packed, layer.weight.packed)  # copied in place
    assert torch.equal(w.dequantize(), layer.weight.dequantize()) and w.offset == layer.weight.offset


def test_new_zeros_and_empty_like_honour_the_device():
    w = quantize_nf4(torch.randn(64, 64))
    meta = w.to("meta")
    made_on = [(meta.new_zeros((64, 64), device="cpu"), "cpu"), (meta.new_empty((32, 64), device="cpu"), "cpu"),
               (w.new_zeros((64, 64), device="meta"), "meta"), (torch.empty_like(w, device="meta"), "meta"),
               (torch.zeros_like(meta, device="cpu"), "cpu")]
    for made, device in made_on:
        assert isinstance(made, NF4Weight) and made.device.type == device and _parts_on(made, device)
        if device == "cpu":
            assert not made.dequantize().any()


def test_quantize_on_meta_gives_a_layout_to_fill():
    """accelerate's init_empty_weights: quantize_model on a meta model, to_empty, then load a checkpoint."""
    from accelerate import init_empty_weights

    w = quantize_nf4(torch.empty(32, 64, device="meta"))
    assert w.is_meta and layout(w) == layout(quantize_nf4(torch.randn(32, 64))) and w.offset == 0.0
    assert copy.deepcopy(w).is_meta and pickle.loads(pickle.dumps(w)).is_meta
    buffer = io.BytesIO()
    torch.save(w, buffer)
    assert torch.load(io.BytesIO(buffer.getvalue())).is_meta
    torch.manual_seed(0)
    source = quantize_model(nn.Sequential(nn.Linear(64, 32)))
    with init_empty_weights():
        model = quantize_model(nn.Sequential(nn.Linear(64, 32)))
    assert model[0].weight.is_meta
    model.to_empty(device="cpu").load_state_dict(source.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(model(x), source(x))


# ----------------------------------------------------------------------------------------------
# 3. a checkpoint of the layer's layout is copied in place; another layout (or assign) replaces the weight

@pytest.mark.parametrize("dense", [False, True])
def test_a_checkpoint_of_the_same_layout_is_copied_in_place(dense):
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(64, 37))
    before, packed = layer.weight, layer.weight.packed.data_ptr()
    if dense:
        state = {"weight": torch.randn(37, 64), "bias": torch.randn(37)}
        expected = quantize_nf4(state["weight"]).dequantize()
    else:
        source = NF4Linear.from_linear(nn.Linear(64, 37))
        state, expected = source.state_dict(), source.weight.dequantize()
    assert not layer.load_state_dict(state).missing_keys
    assert layer.weight is before and layer.weight.packed.data_ptr() == packed
    assert torch.equal(layer.weight.dequantize(), expected)

    layer.load_state_dict(state, assign=True)  # assign: the checkpoint's own weight
    assert layer.weight is not before and torch.equal(layer.weight.dequantize(), expected)
    other = NF4Linear.from_linear(nn.Linear(64, 37), blocksize=128, double_quant=False)
    layer = NF4Linear.from_linear(nn.Linear(64, 37))
    before = layer.weight
    layer.load_state_dict(other.state_dict())  # another layout: the checkpoint's replaces the layer's
    assert layer.weight is not before and layer.weight.blocksize == 128 and not layer.weight.double_quant
    assert torch.equal(layer.weight.dequantize(), other.weight.dequantize())


# ----------------------------------------------------------------------------------------------
# 2, 7, 8. FSDP2 on one rank: whole checkpoints into the shard, DCP's full state dict, saving

def _sharded(mesh, seed=0, **kwargs):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    layer = NF4Linear.from_linear(nn.Linear(128, 64, bias=False), **kwargs)
    reference = copy.deepcopy(layer)
    fully_shard(layer, mesh=mesh)
    return layer, reference


def test_a_whole_checkpoint_loads_into_an_fsdp2_shard(one_rank_group):
    """bitsandbytes' keys or a dense weight, unsharded: copied into this rank's rows of the shard, FSDP2's parameter
    kept (a new one would leave FSDP2 holding the old); another layout is an error naming the key."""
    layer, _ = _sharded(one_rank_group)
    _, source = _sharded(one_rank_group, seed=1)
    param, shard = layer.weight, layer.weight._local_tensor
    x = torch.randn(3, 128)
    with torch.no_grad():
        layer.load_state_dict(source.state_dict())
        assert layer.weight is param and param._local_tensor is shard
        assert torch.equal(layer(x), source(x))
        dense = torch.randn(64, 128)
        layer.load_state_dict({"weight": dense})
        assert layer.weight is param and torch.equal(shard.dequantize(), quantize_nf4(dense).dequantize())
        layer.load_state_dict(source.state_dict(), assign=True)  # FSDP2 keeps its parameter: still a copy
        assert layer.weight is param and torch.equal(layer(x), source(x))
    other = NF4Linear.from_linear(nn.Linear(128, 64, bias=False), double_quant=False)
    with pytest.raises(RuntimeError, match=r"(?s)'weight' into this rank's shard.*layouts differ"):
        layer.load_state_dict(other.state_dict())


def test_dcp_full_state_dict_loads_into_nf4_shards(one_rank_group):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    layer, _ = _sharded(one_rank_group)
    _, source = _sharded(one_rank_group, seed=1)
    x = torch.randn(3, 128)
    full = StateDictOptions(full_state_dict=True)
    for state in ({"weight": source.weight.detach()}, source.state_dict()):  # an NF4Weight, bitsandbytes' keys
        layer.load_state_dict({"weight": quantize_nf4(torch.randn(64, 128))})
        set_model_state_dict(layer, state, options=full)
        with torch.no_grad():
            assert torch.equal(layer(x), source(x))
    with pytest.raises(NotImplementedError, match="leave broadcast_from_rank0 off"):
        set_model_state_dict(layer, {"weight": source.weight.detach()},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def test_saving_a_sharded_model_gathers_it(one_rank_group, tmp_path):
    from safetensors.torch import load_file

    layer, reference = _sharded(one_rank_group)
    with torch.no_grad():
        layer(torch.randn(3, 128))  # a root FSDP2 module stays unsharded after a forward
    save_nf4_model(layer, tmp_path / "sharded")
    save_nf4_model(reference, tmp_path / "plain")
    saved, expected = (load_file(tmp_path / how / "model.safetensors") for how in ("sharded", "plain"))
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], v) for k, v in expected.items())
