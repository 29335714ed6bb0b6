"""NF4Weight as a tensor: a frozen Parameter, its aten op table and sharding rules, torch.compile without graph
breaks, peft on an NF4-only model, non-finite weights refused, and QLoRA under FSDP2 (2 processes, gloo)."""
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastft
from fastft.integration.nf4_sharding import shard_model
from fastft.modules.nf4_linear import NF4Linear
from fastft.quant import NF4Weight, quantize_nf4
from fastft.quant.nf4_tensor_ops import check_shardable

ROOT = Path(__file__).resolve().parent.parent


class _TwoNF4(nn.Module):
    """A model whose only layers are NF4 (peft used to stop with a bare StopIteration on it)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _nf4_only_model():
    torch.manual_seed(0)
    return fastft.quantize_model(_TwoNF4(), "nf4")


def test_nf4_weight_is_a_frozen_parameter_moved_by_the_module():
    model = _nf4_only_model()
    params = dict(model.named_parameters())
    assert isinstance(params["up.weight"], NF4Weight) and isinstance(params["up.weight"], nn.Parameter)
    assert not params["up.weight"].requires_grad and params["up.weight"].shape == (128, 64)
    x = torch.randn(3, 64)
    expected = model(x)
    meta = copy.deepcopy(model).to("meta")  # NF4Linear has no _apply override: the tensor moves itself
    assert meta.up.weight.device.type == "meta" and meta.up.weight.packed.device.type == "meta"
    assert isinstance(meta.up.weight, NF4Weight)
    half = copy.deepcopy(model).half()  # dtype casts leave quantized codes alone; the bias follows
    assert half.up.weight.dtype == torch.float32 and half.up.bias.dtype == torch.float16
    assert torch.equal(half.up.weight.packed, model.up.weight.packed)
    empty = copy.deepcopy(model).to_empty(device="cpu")
    assert isinstance(empty.up.weight, NF4Weight) and not empty.up.weight.dequantize().any()
    clone = copy.deepcopy(model)
    assert clone.up.weight.packed.data_ptr() != model.up.weight.packed.data_ptr()
    assert torch.equal(clone(x), expected)
    buffer = io.BytesIO()
    torch.save(model.up.weight, buffer)
    buffer.seek(0)
    again = torch.load(buffer)  # weights_only: NF4Weight is a registered safe global
    assert isinstance(again, NF4Weight) and torch.equal(again.dequantize(), model.up.weight.dequantize())
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the whole module, pickled: still a frozen Parameter after loading
    buffer.seek(0)
    whole = torch.load(buffer, weights_only=False)
    assert isinstance(whole.up.weight, nn.Parameter) and torch.equal(whole(x), expected)
    fresh = NF4Linear(64, 128)
    fresh.load_state_dict(model.up.state_dict(), assign=True)  # bitsandbytes keys, assign as well
    assert torch.equal(fresh.weight.packed, model.up.weight.packed) and fresh.bias is not None


def test_peft_on_an_nf4_only_model():
    from peft import LoraConfig

    model = fastft.get_peft_model(_nf4_only_model(), LoraConfig(r=4, target_modules=["up", "down"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    x = torch.randn(5, 64)
    model(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("double_quant", [True, False])
def test_op_table_keeps_the_bytes(double_quant):
    w = quantize_nf4(torch.randn(256, 128), blocksize=64, double_quant=double_quant)
    dense = w.dequantize()
    top, bottom = torch.chunk(w, 2)  # 256 blocks a piece: whole groups, so nested scales stay 8-bit
    assert top.double_quant == double_quant and top.packed.data_ptr() == w.packed.data_ptr()
    assert torch.equal(torch.cat([top.dequantize(), bottom.dequantize()]), dense)
    for a, b in [(0, 4), (36, 100), (200, 256)]:  # ranges that split nested groups are un-nested, same values
        part = w.narrow(0, a, b - a)
        assert part.shape == (b - a, 128) and torch.equal(part.dequantize(), dense[a:b])
    buffer = w.new_zeros((128, 128))
    assert torch.equal(buffer.dequantize(), torch.zeros(128, 128))
    buffer.narrow(0, 0, 128).copy_(bottom)
    assert torch.equal(buffer.dequantize(), dense[128:])
    flat = buffer.view(-1)
    assert flat.shape == (128 * 128,) and torch.equal(torch.as_strided(flat, (128, 128), (128, 1), 0).dequantize(),
                                                      dense[128:])
    assert torch.equal(w.clone().dequantize(), dense) and torch.equal(w.detach().packed, w.packed)
    with pytest.raises(ValueError, match="cut through a quantization block"):
        quantize_nf4(torch.randn(96, 40)).narrow(0, 0, 1)  # one row of 40 values is not a whole 64-block
    with pytest.raises(NotImplementedError, match="aten.add"):
        w + 1
    with pytest.raises(NotImplementedError, match="dim 0"):
        w.narrow(1, 0, 64)
    with pytest.raises(ValueError, match="layouts differ"):
        w.new_zeros((64, 128)).copy_(top)


def test_shard_checks_name_the_weight():
    w = quantize_nf4(torch.randn(96, 40))
    check_shardable(w, 2)  # 48·40 = 1920 = 30 blocks a shard
    check_shardable(w, 3)  # uneven is fine while shards hold whole blocks: 32·40 = 1280 = 20 blocks
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj\.weight.*20 rows \(ceil\(96/5\)\) holds 800 values.*"
                                         r"cut through a quantization block"):
        check_shardable(w, 5, "layers.0.q_proj.weight")
    with pytest.raises(ValueError, match=r"mlp\.weight.*not a multiple of the blocksize 64"):
        check_shardable(w, 8, "mlp.weight")  # 12·40 = 480 values: 7.5 blocks

    class OneDMesh:  # shard_model checks every NF4 weight before it shards anything
        ndim = 1

        def size(self):
            return 5

    class Narrow(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(40, 96)

    with pytest.raises(ValueError, match=r"up\.weight"):
        shard_model(fastft.quantize_model(Narrow(), "nf4"), OneDMesh())


def test_compiles_without_graph_breaks():
    from peft import LoraConfig

    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(128, 48))
    x = torch.randn(3, 128)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    assert torch.equal(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), layer(x))
    # layers differ in their nested offset (a tensor, not graph metadata): one graph serves them all
    others = [NF4Linear.from_linear(nn.Linear(128, 48)) for _ in range(2)]
    assert len({w.weight.offset for w in [layer, *others]}) == 3
    run = torch.compile(lambda module, inp: module(inp), backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for module in [layer, *others]:
            assert torch.equal(run(module, x), module(x))
    qlora = fastft.get_peft_model(_nf4_only_model(), LoraConfig(r=4, target_modules=["up", "down"]))
    x = torch.randn(5, 64, requires_grad=True)
    compiled = torch.compile(qlora, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    assert torch.allclose(y, qlora(x), atol=1e-6)
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("double_quant", [True, False])
def test_non_finite_weights_are_refused(bad, double_quant):
    x = torch.randn(16, 64)
    x[3, 5] = bad
    with pytest.raises(ValueError, match=r"`w` \(shape \(16, 64\)\) has 1 non-finite.*\(3, 5\)"):
        quantize_nf4(x, double_quant=double_quant, name="w")
    from fastft.quant.nf4_weight import _refuse_non_finite
    with pytest.raises(ValueError, match=r"the first at index \(3, 5\)"):
        _refuse_non_finite(x, "`w`", chunk=64)  # found in the fourth chunk
    model = _TwoNF4()
    with torch.no_grad():
        model.down.weight[0, 0] = bad
    with pytest.raises(ValueError, match=r"`down\.weight`"):
        fastft.quantize_model(model, "nf4", double_quant=double_quant)
    with pytest.raises(ValueError, match=r"`weight`"):
        NF4Linear(64, 16).load_state_dict({"weight": x, "bias": torch.zeros(16)})


def test_qlora_under_fsdp2_and_ddp_matches_one_process(tmp_path):
    """2 ranks (gloo), each half of the batch, against one process on the whole batch: same adapter."""
    from tests import nf4_fsdp_worker as worker

    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # keep any path already set
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.nf4_fsdp_worker", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    # the forward under FSDP2 sees whole NF4 weights rebuilt from gathered packed bytes, and equals the unsharded
    assert report["gathered_weight"] == ["NF4Weight", 256 * 256 // 2, [256, 256]]
    assert report["forward_max_diff"] == 0.0
    # each rank stores exactly half of the codes and scales (nested scales kept); only the tables are replicated
    assert report["local_nested"] and report["local_nf4_bytes"] * 2 == report["full_nf4_bytes"]
    local = report["local_nf4_bytes"] + report["table_bytes"]
    assert 0.5 < local / (report["full_nf4_bytes"] + report["table_bytes"]) < 0.53
    # shards that split groups of nested scales are un-nested; bf16 mixed precision computes as unsharded
    assert report["unnested_local_absmax_dtype"] == "torch.float32"
    assert report["unnested_forward_max_diff"] == 0.0 and report["unnested_out_dtype"] == "torch.bfloat16"

    assert report["full_tensor_equal"]  # DTensor.full_tensor() gathers the same bytes back
    # state dicts load into the sharded model (NF4 shards copied in place), another layer's with its own offset
    # (copied, or assigned: a new shard that later all-gathers into the old unsharded weight must bring its offset)
    assert report["reloaded_forward_max_diff"] == 0.0 and report["loaded_other_max_diff"] == 0.0
    assert report["assigned_other_max_diff"] == 0.0
    # whole checkpoints (bitsandbytes' keys, dense, DCP's full state dict) load into this rank's rows of the shard
    assert report["full_loads_max_diff"] == {"bnb": 0.0, "dense": 0.0, "dcp": 0.0}
    assert report["full_loads_kept_the_shard"]
    # save_nf4_model gathers a sharded model: the same tensors as the unsharded model's
    from safetensors.torch import load_file
    saved = {how: load_file(tmp_path / f"saved_{how}" / "model.safetensors") for how in ("sharded", "plain")}
    assert saved["sharded"].keys() == saved["plain"].keys()
    assert all(torch.equal(saved["sharded"][k], v) for k, v in saved["plain"].items())
    configs = [(tmp_path / f"saved_{how}" / "config.json").read_text() for how in ("sharded", "plain")]
    assert configs[0] == configs[1]
    # a head tied to embeddings in one of the model's _no_split_modules: the tie survives sharding (the block stays
    # in the root's unit), and the save drops the head's key as the unsharded save does, the loader re-tying it
    assert report["tie_kept"]
    tied = {how: load_file(tmp_path / f"tied_{how}" / "model.safetensors") for how in ("sharded", "plain")}
    assert "lm_head.decoder.weight" not in tied["sharded"] and "lm_head.decoder.bias" not in tied["sharded"]
    whole = {k for k in tied["plain"] if "nested" not in k}  # (shards splitting nested groups save un-nested scales)
    assert tied["sharded"].keys() == whole
    ids = torch.randint(0, 96, (2, 9))
    loaded = fastft.load_nf4_model(str(tmp_path / "tied_sharded"), dtype=torch.float32).eval()
    assert loaded.lm_head.decoder.weight is loaded.roberta.embeddings.word_embeddings.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, worker.tied_camembert()(ids).logits)
    assert report["adapter_state_matches"]  # peft's adapter state dict reads the sharded model
    sharded, ddp = torch.load(tmp_path / "lora.pt"), torch.load(tmp_path / "lora_ddp.pt")
    model = worker.build_qlora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    worker.train(model, worker.batch())
    single = worker.lora_state(model)
    assert sharded.keys() == single.keys() and len(single) == 2 * 7 * 2
    # fastft.save_adapter on the sharded model, no state_dict= given: the whole trained adapter, as peft saves it
    assert report["adapter_written_before_return"]  # on both ranks: rank 1 waited for rank 0's write
    # a write that fails on rank 0 (the only writer) raises on every rank instead of leaving rank 1 in a barrier
    assert report["failed_save_raised"] == ["NotADirectoryError", "OSError"]  # an OSError on every rank, as on rank 0
    written = load_file(tmp_path / "adapter_sharded" / "adapter_model.safetensors")
    assert written.keys() == {k.replace(".default.", ".") for k in sharded}
    assert all(torch.equal(written[k.replace(".default.", ".")], v) for k, v in sharded.items())
    for name, value in single.items():  # observed: differences ~2e-6 against updates of ~3e-3 (rounding order);
        # gradients not reduced across the ranks (each rank's half of the batch alone) are off by ~6e-3
        assert (value - before[name]).abs().max() > 1e-3, f"{name} barely trained"
        for how, got in (("FSDP2", sharded), ("DDP", ddp)):
            assert torch.allclose(got[name], value, rtol=1e-4, atol=1e-5), \
                f"{how} {name}: max diff {(got[name] - value).abs().max().item():.2e}"


@pytest.mark.gpu
def test_on_cuda_moves_compiles_and_shards_on_one_rank(tmp_path):
    """The CUDA side of the above (never run on a GPU in the session that wrote it): module.cuda() moves the
    parts, the compiled dequantize (inductor, custom op) equals eager, FSDP2 over NCCL on one rank runs it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(256, 128)).cuda()
    w = layer.weight
    assert all(t.is_cuda for t in (w.packed, w.absmax, w.absmax2, w.code2, w.code, w.nested_offset))
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    eager = layer(x)
    ref = x.double() @ w.dequantize(torch.float32).double().T + layer.bias.double()
    assert (eager.double() - ref).norm() / ref.norm() < 2e-2
    compiled = torch.compile(lambda m, dtype: m.weight.dequantize(dtype), fullgraph=True)
    assert torch.equal(compiled(layer, torch.bfloat16), w.dequantize(torch.bfloat16))
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        fully_shard(layer, mesh=init_device_mesh("cuda", (1,)))
        assert torch.equal(layer(x), eager)
    finally:
        dist.destroy_process_group()
