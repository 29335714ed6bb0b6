"""Integration behaviours a mutation run found no test pinning: a layer registered under two names, one of them
skipped, stays one dense layer; an NF4 weight counts once in the parameter totals; a rank whose partner's write
failed with a full disk gets an OSError too (callers handle it as the failing rank does); DDP's ignore list keeps the
model's own entries; an adapter saved with fan_in_fan_out is refused on NF4; a layer_replication adapter loads as
peft built it."""
import json
import warnings

import peft
import pytest
import torch
from peft import LoraConfig
from torch import nn

import fastft
from fastft.integration import sharded_state
from fastft.integration.nf4_sharding import ignore_nf4_in_ddp
from fastft.integration.parameter_count import parameter_counts
from tests.utils import randomize_lora_B, tiny_llama


def test_a_layer_under_two_names_skipped_at_one_stays_one_dense_layer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            shared = nn.Linear(64, 64)
            self.enc = nn.ModuleDict({"proj": shared})
            self.dec = nn.ModuleDict({"proj": shared})
            self.other = nn.Linear(64, 64)

        def forward(self, x):
            return self.other(self.dec["proj"](self.enc["proj"](x)))

    net = Net()
    shared_weight = net.enc["proj"].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastft.quantize_model(net, skip=["enc.proj"])
    assert net.enc["proj"] is net.dec["proj"] and type(net.dec["proj"]) is nn.Linear
    assert torch.equal(net.dec["proj"].weight, shared_weight) and type(net.other).__name__ == "NF4Linear"


def test_an_nf4_weight_counts_once():
    dense_total = sum(p.numel() for p in tiny_llama().parameters())
    model = fastft.quantize_model(tiny_llama())
    assert parameter_counts(model)[1] == dense_total
    lora = fastft.get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, total = parameter_counts(lora)
    assert trainable == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))  # 2 layers: q (64 out), v (32 out), rank 4
    assert total == dense_total + trainable


def test_a_partners_full_disk_is_an_os_error_on_every_rank(monkeypatch):
    """Rank 1's view of run_shared when rank 0's write failed with ENOSPC (the process group faked)."""
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)

    def all_gather_object(outcomes, mine):
        outcomes[:] = [(is_os_error, text), mine]

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    is_os_error, text = True, "OSError: [Errno 28] No space left on device"
    with pytest.raises(OSError, match=r"save_adapter: rank 0 failed \(OSError: \[Errno 28\]"):
        sharded_state.run_shared(lambda: None, False, "save_adapter")
    is_os_error, text = False, "RuntimeError: boom"
    with pytest.raises(RuntimeError, match="rank 0 failed") as error:
        sharded_state.run_shared(lambda: None, False, "save_adapter")
    assert not isinstance(error.value, OSError)


def test_ddp_ignore_list_keeps_the_models_own_entries():
    model = fastft.quantize_model(tiny_llama())
    model.register_buffer("rank_local_stats", torch.zeros(3))
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["rank_local_stats"])
    ignore_nf4_in_ddp(model)
    ignored = model._ddp_params_and_buffers_to_ignore
    assert "rank_local_stats" in ignored and "model.layers.0.mlp.down_proj.weight" in ignored


def test_a_fan_in_fan_out_adapter_is_refused_on_nf4(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"fan_in_fan_out": True}))
    with pytest.raises(ValueError, match="fan_in_fan_out=True, which fastft's QLoRA layers"):
        fastft.load_adapter(fastft.quantize_model(tiny_llama()), tmp_path)


def test_a_layer_replication_adapter_loads_as_peft_built_it(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = peft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                            layer_replication=[[0, 2], [1, 2]]))
        randomize_lora_B(made)
        made.save_pretrained(tmp_path)
        loaded = fastft.load_adapter(tiny_llama(), tmp_path)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, made(input_ids=ids).logits, atol=1e-6)
