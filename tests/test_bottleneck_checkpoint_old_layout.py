"""fastft train checkpoints of bottleneck adapters written before BottleneckAdapterModel took peft's layout name
their tensors `base_model.<key>` (the wrapper's parameters then); now they are `base_model.model.<key>`. A resume
loads such a checkpoint under the new names when that renaming makes the names match exactly; any other mismatch
stays refused as a damaged checkpoint. Under FSDP2 (one rank here) the optimizer state, keyed by parameter names
there, is renamed too, and every tensor of the file must land on a weight of the sharded model."""
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastft
from fastft import BottleneckAdapterConfig
from fastft.apps.training.checkpoints import Checkpoints, layout_renames
from fastft.apps.training.config import ConfigError
from tests.utils import tiny_llama


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state()


def _model(mesh=None):
    model = fastft.get_peft_model(tiny_llama(), BottleneckAdapterConfig(size=4))
    if mesh is not None:  # FSDP2 replaces the parameters: the optimizer takes the sharded ones
        from fastft.integration.nf4_sharding import shard_model

        shard_model(model, mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


def _trained(model, optimizer):
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _as_old_layout(path):
    """The checkpoint's trainable.safetensors with the names the old layout gave: `base_model.<key>`."""
    file = path / "trainable.safetensors"
    new = load_file(file)
    assert new and all(k.startswith("base_model.model.") for k in new)
    old = {"base_model." + k.removeprefix("base_model.model."): v for k, v in new.items()}
    save_file(old, file)
    return old


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_checkpoint_in_the_old_layout_resumes_under_the_new_names(tmp_path, accelerator):
    model, optimizer = _trained(*_model())
    checkpoints = Checkpoints(tmp_path, accelerator)
    path = checkpoints.save(2, model, optimizer, {})
    _as_old_layout(path)
    fresh, fresh_optimizer = _model()
    checkpoints.load(path, fresh, fresh_optimizer)
    want, got = _trainable(model), _trainable(fresh)
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    moments = [optimizer.state[p]["exp_avg"] for p in optimizer.param_groups[0]["params"]]
    assert all(torch.equal(fresh_optimizer.state[p]["exp_avg"], m)
               for p, m in zip(fresh_optimizer.param_groups[0]["params"], moments))


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_an_old_layout_checkpoint_that_still_does_not_fit_is_refused(tmp_path, accelerator, change):
    model, optimizer = _trained(*_model())
    checkpoints = Checkpoints(tmp_path, accelerator)
    path = checkpoints.save(2, model, optimizer, {})
    old = _as_old_layout(path)
    if change == "missing":
        old.pop(sorted(old)[0])
    else:
        old["base_model.lm_head.weight"] = torch.zeros(128, 64)
    save_file(old, path / "trainable.safetensors")
    fresh, fresh_optimizer = _model()
    before = _trainable(fresh)
    with pytest.raises(ConfigError, match="is damaged: trainable.safetensors: it lacks"):  # under the new names
        checkpoints.load(path, fresh, fresh_optimizer)
    assert all(torch.equal(v, before[k]) for k, v in _trainable(fresh).items())  # nothing was loaded


def test_only_the_exact_renaming_counts():
    expected = {"base_model.model.a.adapter.up.weight", "base_model.model.b.adapter.up.weight"}
    old = {"base_model.a.adapter.up.weight", "base_model.b.adapter.up.weight"}
    assert layout_renames(old, expected) == {k: k.replace("base_model.", "base_model.model.") for k in old}
    assert layout_renames(expected, expected) == {}  # the new layout: nothing to rename
    assert layout_renames(old | {"base_model.c.weight"}, expected) == {}
    assert layout_renames({"base_model.a.adapter.up.weight"}, expected) == {}


def test_a_sharded_model_resumes_an_old_layout_checkpoint(tmp_path, accelerator, one_rank_group):
    model, optimizer = _trained(*_model(one_rank_group))
    checkpoints = Checkpoints(tmp_path, accelerator)
    path = checkpoints.save(2, model, optimizer, {})
    optim = torch.load(path / "optimizer.pt", weights_only=False)
    assert all(k.startswith("base_model.model.") for k in optim["state"])  # keyed by names under FSDP2
    old = _as_old_layout(path)
    renames = {"base_model.model." + k.removeprefix("base_model."): k for k in old}
    optim["state"] = {renames[k]: v for k, v in optim["state"].items()}
    optim["param_groups"] = [{**g, "params": [renames[n] for n in g["params"]]} for g in optim["param_groups"]]
    torch.save(optim, path / "optimizer.pt")
    fresh, fresh_optimizer = _model(one_rank_group)
    checkpoints.load(path, fresh, fresh_optimizer)
    want, got = _trainable(model), _trainable(fresh)
    assert want.keys() == got.keys() and all(torch.equal(got[k].full_tensor(), want[k].full_tensor()) for k in want)
    moments = [optimizer.state[p]["exp_avg"].full_tensor() for p in optimizer.param_groups[0]["params"]]
    assert all(torch.equal(fresh_optimizer.state[p]["exp_avg"].full_tensor(), m)
               for p, m in zip(fresh_optimizer.param_groups[0]["params"], moments))


def test_a_sharded_load_skips_no_tensor_of_the_file(tmp_path, accelerator, one_rank_group, monkeypatch):
    """set_model_state_dict(strict=False) (the frozen weights are not in the file) would drop a tensor named after no
    weight; _check_weights finds that first, and the load itself refuses it too (a name FSDP2 spells otherwise)."""
    model, optimizer = _trained(*_model(one_rank_group))
    checkpoints = Checkpoints(tmp_path, accelerator)
    path = checkpoints.save(2, model, optimizer, {})
    weights = load_file(path / "trainable.safetensors")
    save_file({**weights, "base_model.model.nowhere.weight": torch.zeros(3)}, path / "trainable.safetensors")
    monkeypatch.setattr(Checkpoints, "_check_weights", lambda *args: None)
    fresh, fresh_optimizer = _model(one_rank_group)
    with pytest.raises(ConfigError, match=r"1 tensor\(s\) of trainable.safetensors match no weight of the sharded "
                                          r"model \(base_model.model.nowhere.weight, ...\); they would not load"):
        checkpoints.load(path, fresh, fresh_optimizer)


def test_save_pretrained_takes_the_wrappers_own_state_dict_and_refuses_other_names(tmp_path):
    model, _ = _model()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path / "own")
    model.save_pretrained(tmp_path / "given", state_dict=model.state_dict())  # Trainer's _save passes this
    own, given = load_file(tmp_path / "own" / "adapter_model.safetensors"), \
        load_file(tmp_path / "given" / "adapter_model.safetensors")
    assert own.keys() == given.keys() and all(torch.equal(own[k], given[k]) for k in own)
    old_names = {"base_model." + k.removeprefix("base_model.model."): v for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="lacks 8 adapter tensor.* and holds 8 .*under names the model has not"):
        model.save_pretrained(tmp_path / "old", state_dict=old_names)
    dropped = dict(model.state_dict())
    dropped.pop(next(k for k in dropped if ".adapter." in k))
    with pytest.raises(ValueError, match="lacks 1 adapter tensor"):
        model.save_pretrained(tmp_path / "dropped", state_dict=dropped)
    assert not (tmp_path / "old").exists() and not (tmp_path / "dropped").exists()


def test_a_tied_head_trained_whole_is_saved_from_the_trainable_parameters(tmp_path):
    """fastft train saves the trainable parameters, where a tied weight is named once (embed_tokens.weight): an lm_head
    in modules_to_save under tied embeddings was left out of the adapter file, which no load then took."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = fastft.get_peft_model(LlamaForCausalLM(config),
                                  BottleneckAdapterConfig(size=4, modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.get_base_model().lm_head.weight.add_(1.0)
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert not any("lm_head" in n for n in trainable)  # named once, as the embeddings
    model.save_pretrained(tmp_path, state_dict=trainable)
    loaded = fastft.load_adapter(LlamaForCausalLM(config), tmp_path)
    assert torch.equal(loaded.get_base_model().lm_head.weight, model.get_base_model().lm_head.weight)
