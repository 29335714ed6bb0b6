"""NF4 weights whose rows do not split evenly over the ranks: FSDP2's protocol played on one process.

FSDP2 cuts dim 0 with torch.chunk into ceil(rows/world)-row shards (the last ones shorter, or empty: new_empty(0)),
pads each into `new_zeros` of the first shard's size with `narrow(0, 0, len).copy_(shard)`, all-gathers what
`fsdp_pre_all_gather` returns (every rank the same tensors and sizes; torch requires a padded shard's inputs to have
the padded size) and hands the concatenation to `fsdp_post_all_gather`. Here the all-gather is a torch.cat of every
rank's inputs; the rebuilt weight must dequantize to the original bit for bit."""
import pytest
import torch

from fastft.quant import NF4Weight, quantize_nf4
from fastft.quant.nf4_tensor_ops import check_shardable, shard_problem, shard_rows


class _Mesh:
    def __init__(self, world):
        self.world = world

    def size(self):
        return self.world


def _fsdp_shards(w, world):
    """What each rank holds after fully_shard: (the narrowed shard FSDP2 keeps as the DTensor's local tensor, its
    padded buffer), as torch's FSDPParam._init_sharded_param builds them."""
    chunks = list(torch.chunk(w, world, dim=0))
    while len(chunks) < world:
        chunks.append(chunks[0].new_empty(0))
    padded_size = chunks[0].size()
    out = []
    for chunk in chunks:
        padded = w.new_zeros(padded_size)
        rows = chunk.size(0) if chunk.numel() > 0 else 0
        if chunk.numel() > 0:
            padded.narrow(0, 0, rows).copy_(chunk)
        out.append((padded.narrow(0, 0, rows), padded))
    return out


def _all_gather(w, world, param_dtype=torch.float32):
    """The weight FSDP2 rebuilds from every rank's shard, and the inner tensors it would free at reshard."""
    shards = _fsdp_shards(w, world)
    sent = [local.fsdp_pre_all_gather(_Mesh(world), w.shape, None, None, None) for local, _ in shards]
    sizes = {tuple(t.size() for t in inputs) for inputs, _ in sent}
    dtypes = {tuple(t.dtype for t in inputs) for inputs, _ in sent}
    assert len(sizes) == 1 and len(dtypes) == 1, f"ranks send different all-gather inputs: {sizes} {dtypes}"
    padded_size = shards[0][1].size()
    if w.shape[0] % world:  # torch's check for padded shards (FSDPParam.all_gather_inputs)
        assert all(t.size() == padded_size for inputs, _ in sent for t in inputs)
    outputs = [torch.cat([inputs[i].reshape(-1) for inputs, _ in sent]).view(-1, *sent[0][0][i].shape[1:])
               for i in range(len(sent[0][0]))]
    full, inner = shards[0][0].fsdp_post_all_gather(outputs, sent[0][1], param_dtype)
    return full, inner, outputs, sent[0][1], shards


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,world,rows", [((4, 64), 3, [2, 2, 0]), ((10, 64), 3, [4, 4, 2]),
                                              ((4096, 64), 3, [1366, 1366, 1364]), ((6, 128), 4, [2, 2, 2, 0]),
                                              ((1, 64), 2, [1, 0])])
def test_uneven_shards_gather_back_the_weight_bit_for_bit(shape, world, rows, double_quant):
    torch.manual_seed(0)
    w = quantize_nf4(torch.randn(shape), blocksize=64, double_quant=double_quant)
    dense = w.dequantize()
    check_shardable(w, world)
    shards = _fsdp_shards(w, world)
    assert [local.shape[0] for local, _ in shards] == rows
    for rank, (local, padded) in enumerate(shards):
        start = rank * shard_rows(shape[0], world)
        assert torch.equal(local.dequantize(), dense[start:start + local.shape[0]])
        # the padding FSDP2 adds dequantizes to zeros, and the shard's rows are the padded buffer's leading bytes
        assert not padded.dequantize()[local.shape[0]:].any()
        assert local.packed.numel() == 0 or local.packed.data_ptr() == padded.packed.data_ptr()
    full, inner, outputs, meta, _ = _all_gather(w, world)
    assert isinstance(full, NF4Weight) and full.shape == w.shape
    assert torch.equal(full.dequantize(), dense)
    assert torch.equal(full.packed, w.packed)
    # a later all-gather writes into the same (re-allocated) buffers FSDP2 freed at reshard
    for t in inner:
        t.zero_()
    assert shards_post(full, outputs, meta) is None
    assert torch.equal(full.dequantize(), dense)


def shards_post(full, outputs, meta):
    return full.fsdp_post_all_gather(outputs, meta, torch.float32, out=full)


def test_nested_shards_are_sent_as_decoded_scales_alike():
    """Every rank sends one uint8 tensor of the padded size, whether its shard kept nested scales or not."""
    torch.manual_seed(1)
    w = quantize_nf4(torch.randn(1030, 64 * 128), blocksize=64, double_quant=True)  # 128 blocks a row
    # 258 rows a shard = 129 groups of 256 blocks, the last 256 rows = 128 groups: all nested
    assert all(local.double_quant for local, _ in _fsdp_shards(w, 4))
    full, *_ = _all_gather(w, 4)
    assert torch.equal(full.dequantize(), w.dequantize())
    w = quantize_nf4(torch.randn(7, 128), blocksize=64, double_quant=True)  # 14 blocks: not a whole group
    shards = _fsdp_shards(w, 3)  # 3, 3, 1 rows: the un-nested padded buffers take the nested chunks' decoded scales
    assert [padded.double_quant for _, padded in shards] == [False] * 3
    full, *_ = _all_gather(w, 3)
    assert torch.equal(full.dequantize(), w.dequantize())


def test_a_last_shard_that_splits_a_group_pads_into_an_unnested_buffer():
    """383x128 over 3: 128-row shards are whole groups (256 blocks), but the last holds 127 rows (254 blocks). A nested
    padded buffer would narrow to an un-nested copy for it, losing the copy_; so no rank's buffer is nested."""
    torch.manual_seed(4)
    w = quantize_nf4(torch.randn(383, 128), blocksize=64, double_quant=True)
    shards = _fsdp_shards(w, 3)
    assert [local.shape[0] for local, _ in shards] == [128, 128, 127]
    assert not any(padded.double_quant for _, padded in shards)
    full, *_ = _all_gather(w, 3)
    assert torch.equal(full.dequantize(), w.dequantize())


def test_mixed_precision_gathers_in_the_param_dtype():
    torch.manual_seed(2)
    w = quantize_nf4(torch.randn(10, 64), blocksize=64)
    full, *_ = _all_gather(w, 3, torch.bfloat16)
    assert full.dtype == torch.bfloat16 and torch.equal(full.dequantize(), w.dequantize(torch.bfloat16))


def test_a_cut_inside_a_block_is_still_refused_by_name():
    w = quantize_nf4(torch.randn(10, 32), blocksize=64)  # ceil(10/3) = 4 rows = 128 values: fine over 3
    check_shardable(w, 3)
    with pytest.raises(ValueError, match=r"mlp\.weight.*a shard of 3 rows \(ceil\(10/4\)\) holds 96 values.*cut "
                                         r"through a quantization block.*process count"):
        check_shardable(w, 4, "mlp.weight")
    assert shard_problem((4096, 4096), 64, 3) is None and shard_problem((4096, 4096), 64, 6) is None
    assert "a 0-d NF4 weight" in shard_problem((), 64, 2)


def test_copying_nested_rows_into_an_unnested_piece_of_a_nested_weight_is_refused():
    """The relaxed copy_ (nested source into an un-nested destination: scales decoded) must not write into an
    un-nested row range of a nested weight, which holds a copy of its scales (the write would be lost)."""
    torch.manual_seed(3)
    w = quantize_nf4(torch.randn(512, 128), blocksize=64, double_quant=True)
    part = w.narrow(0, 0, 4)  # 8 blocks: not a whole group, so un-nested (a copy of the scales)
    src = quantize_nf4(torch.randn(4, 128), blocksize=64, double_quant=True)
    with pytest.raises(ValueError, match="writing codes into it"):
        part.copy_(src)


def test_qlora_under_fsdp2_over_three_processes_matches_one(tmp_path):
    """3 ranks (gloo) shard a tiny NF4 + LoRA Llama whose 64-, 32- and 128-row weights split 22/22/20, 11/11/10 and
    43/43/42 (tests/nf4_uneven_fsdp_worker.py): the forward equals the unsharded model's bit for bit, and the LoRA
    gradients of a forward+backward (each rank a third of the batch) equal one process on the whole batch."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
           "-m", "tests.nf4_uneven_fsdp_worker", str(tmp_path)]
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)  # keep any path already set
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    # the report is rank 2's: the last, shortest shards
    assert report["local_rows"] == {"self_attn.q_proj.base_layer.weight": 20, "self_attn.k_proj.base_layer.weight": 10,
                                    "self_attn.v_proj.base_layer.weight": 10, "self_attn.o_proj.base_layer.weight": 20,
                                    "mlp.gate_proj.base_layer.weight": 42, "mlp.up_proj.base_layer.weight": 42,
                                    "mlp.down_proj.base_layer.weight": 20}
    assert report["forward_max_diff"] == 0.0
    # observed: 6e-8 against gradients up to 7e-2 (the mean of three thirds' losses rounds apart from the whole's)
    assert report["grad_names"] == 2 * 7 * 2 and report["grad_max_abs"] > 1e-2
    assert report["grad_max_diff"] < 1e-6 and report["mean_loss_diff"] < 1e-5
    assert report["empty_shard_rows"] == 0 and report["empty_shard_diffs"] == [0.0, 0.0]
    # DTensor.full_tensor() pads the short shards (constant_pad_nd), gathers and narrows: the same weights back
    assert report["full_tensors_match"]
    # state dicts load into uneven shards; DCP's full state dict is scattered where every piece has one layout, and
    # refused by name on every rank (no hang) where nested and un-nested pieces mix
    assert report["loads_all_nested"] == {"dcp_full": 0.0, "bnb": 0.0, "sharded": 0.0, "full_tensor": True}
    mixed = report["loads_mixed"]
    assert mixed["bnb"] == 0.0 and mixed["sharded"] == 0.0 and mixed["full_tensor"]
    assert "cannot be scattered into these uneven FSDP2 shards" in mixed["dcp_full"]
    # save_nf4_model on the sharded model (rank 0 writes): loads back to the unsharded model's logits bit for bit
    import fastft
    from tests.utils import tiny_llama

    ids = torch.randint(0, 128, (2, 9))
    loaded = fastft.load_nf4_model(str(tmp_path / "saved_sharded"), dtype=torch.float32).eval()
    unsharded = fastft.quantize_model(tiny_llama(seed=3, hidden_size=64, intermediate_size=128), "nf4").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, unsharded(ids).logits)


@pytest.mark.parametrize("double_quant", [True, False])
def test_padding_rows_appends_zero_rows_unnested(double_quant):
    """DTensor pads a short shard with F.pad before its all-gather (full_tensor): zero rows after the weight's."""
    torch.manual_seed(5)
    w = quantize_nf4(torch.randn(6, 128), blocksize=64, double_quant=double_quant)
    padded = torch.nn.functional.pad(w, (0, 0, 0, 3))
    assert isinstance(padded, NF4Weight) and padded.shape == (9, 128) and not padded.double_quant
    assert torch.equal(padded.dequantize()[:6], w.dequantize()) and not padded.dequantize()[6:].any()
    assert torch.nn.functional.pad(w[:0], (0, 0, 0, 2)).dequantize().abs().sum() == 0
    with pytest.raises(NotImplementedError, match="only appends zero rows"):
        torch.nn.functional.pad(w, (0, 1))


def test_a_weight_with_its_own_offset_loads_into_a_shard_padded_with_zero_rows():
    """An uneven shard is the leading rows of a padded buffer sharing its nested offset; loading a weight quantized
    with another offset replaces that offset, harmless for the padding (zero codes are 0 under any scale), while the
    same copy into rows of a real weight is refused (its other rows would shift)."""
    torch.manual_seed(6)
    w = quantize_nf4(torch.randn(2, 16384), blocksize=64, double_quant=True)  # 512 blocks: whole groups
    padded = w.new_zeros((4, 16384))
    assert padded.double_quant
    shard = padded.narrow(0, 0, 2)
    src = quantize_nf4(torch.randn(2, 16384) * 3, blocksize=64, double_quant=True)
    assert src.offset != padded.offset
    shard.copy_(src)
    assert torch.equal(shard.dequantize(), src.dequantize()) and not padded.dequantize()[2:].any()
    whole = quantize_nf4(torch.randn(4, 16384), blocksize=64, double_quant=True)
    with pytest.raises(ValueError, match="another nested offset"):
        whole.narrow(0, 0, 2).copy_(src)
