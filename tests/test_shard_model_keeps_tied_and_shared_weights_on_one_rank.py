"""shard_model and save_nf4_model on one rank (gloo, in this process; the two-rank run is tests/nf4_fsdp_worker):
a block holding a weight tied to a module outside it (an embeddings block and its head, whichever is registered
first) stays in the root's unit, so the tie survives; the sharded model saves the keys the unsharded one saves
(a tied weight once, a layer shared under two names once, with all of its NF4 parts)."""
import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastft
from fastft.modules.nf4_linear import NF4Linear


class Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.word = nn.Embedding(32, 64)
        self.norm = nn.LayerNorm(64)

    def forward(self, ids):
        return self.norm(self.word(ids))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)

    def forward(self, x):
        return x + self.proj(x)


class TiedLM(nn.Module):
    def __init__(self, head_first: bool, shared: bool = True):
        super().__init__()
        if head_first:
            self.lm_head = nn.Linear(64, 32, bias=False)
        self.embeddings = Embeddings()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.mix = nn.Linear(64, 64) if shared else nn.Identity()
        self.mix_again = self.mix  # one layer under two names: one NF4Linear at both
        if not head_first:
            self.lm_head = nn.Linear(64, 32, bias=False)
        self.lm_head.weight = self.embeddings.word.weight

    def forward(self, ids):
        x = self.embeddings(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.mix_again(self.mix(x)))


@pytest.fixture
def mesh(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _saved(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("head_first", [False, True], ids=["embeddings-first", "head-first"])
def test_a_tie_across_blocks_survives_sharding_and_saves_as_unsharded(mesh, tmp_path, head_first):
    torch.manual_seed(0)
    model = fastft.quantize_model(TiedLM(head_first, shared=False).eval(), "nf4")
    plain = copy.deepcopy(model)
    fastft.save_nf4_model(plain, str(tmp_path / "plain"))
    fastft.shard_model(model, mesh, layer_classes=["Embeddings", "Block"])
    assert model.lm_head.weight is model.embeddings.word.weight
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids), plain(ids))
    fastft.save_nf4_model(model, str(tmp_path / "sharded"))
    saved = {how: _saved(tmp_path / how) for how in ("plain", "sharded")}
    # the tied weight once, under its first name
    assert ("lm_head.weight" in saved["plain"]) == head_first != ("embeddings.word.weight" in saved["plain"])
    assert saved["sharded"].keys() == saved["plain"].keys()
    assert all(torch.equal(saved["sharded"][k], v) for k, v in saved["plain"].items())


def test_a_layer_shared_under_two_names_saves_once_with_all_its_nf4_parts(mesh, tmp_path):
    torch.manual_seed(0)
    model = fastft.quantize_model(TiedLM(head_first=False).eval(), "nf4")
    assert model.mix is model.mix_again and isinstance(model.mix, NF4Linear)
    plain = copy.deepcopy(model)
    fastft.shard_model(model, mesh, layer_classes=["Embeddings", "Block"])
    fastft.save_nf4_model(model, str(tmp_path / "sharded"))
    saved = _saved(tmp_path / "sharded")
    assert not [k for k in saved if k.startswith("mix_again.")]  # neither the weight nor any part of it
    parts = plain.mix.weight.bnb_state_dict("mix.weight")
    assert len(parts) > 3 and all(torch.equal(saved[k], v) for k, v in parts.items())


def test_the_unsharded_save_of_a_shared_layer_has_no_orphan_parts(tmp_path):
    """_write drops a tensor seen under an earlier key by its storage, but an NF4 weight's quant_map,
    nested_quant_map and quant_state are new tensors at every state_dict(): a layer shared under two names (Zamba's
    shared blocks) saved those three parts under the second name without the weight they describe (found by the
    seventeenth mutation run). The first name keeps every part."""
    torch.manual_seed(0)
    model = fastft.quantize_model(TiedLM(head_first=False).eval(), "nf4")
    fastft.save_nf4_model(model, str(tmp_path / "plain"))
    saved = _saved(tmp_path / "plain")
    assert not [k for k in saved if k.startswith("mix_again.")]
    parts = model.mix.weight.bnb_state_dict("mix.weight")
    assert len(parts) > 3 and all(torch.equal(saved[k], v) for k, v in parts.items())
