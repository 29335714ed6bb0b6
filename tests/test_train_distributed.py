"""2 processes (torchrun + gloo on the CPU) train the same adapter as 1 process with the same global batch:
DDP and FSDP2, SFT on a jsonl of unequal documents (text and chat), with gradient accumulation."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastft.apps.cli import main
from tests.train_utils import save_tiny_checkpoint


pytestmark = pytest.mark.slow  # runs training jobs


def _one_process(argv):
    """`fastft train` in this process, one thread (as each torchrun worker has): the reference run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(before)


def _two_processes(jobs: list[dict], root, timeout=900):
    """Every job in one torchrun launch (tests/train_jobs_worker.py): the launch's imports are paid once."""
    path = root / "jobs.json"
    path.write_text(json.dumps(jobs))
    worker = Path(__file__).with_name("train_jobs_worker.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(worker), str(path)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    (root / "launch.stderr").write_text(run.stderr)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The one-process reference runs (batch 4) here, then every two-process run (batch 2) in one launch."""
    root = tmp_path_factory.mktemp("dist")
    tiny = save_tiny_checkpoint(root / "tiny")
    rng = random.Random(0)
    words = "the a model packs tokens documents never attend across each other exact counts".split()
    lines = []
    for i in range(24):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 30)))
        if i % 3:
            lines.append({"text": text})
        else:
            lines.append({"messages": [{"role": "user", "content": text[:20]}, {"role": "assistant", "content": text}]})
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = ["train", "--model", str(tiny), "--data", str(data), "--steps", "3", "--grad-accum", "2",
              "--eval-examples", "2", "--max-length", "48", "--dropout", "0", "--lr", "3e-3"]
    jobs = []

    def two(*argv):
        jobs.append({"argv": [*argv, "--batch-size", "2"]})

    _one_process([*common, "--batch-size", "4", "--output-dir", str(root / "one")])
    for distributed in ("auto", "fsdp"):  # a straight run, copied aside, then resumed from its step 2
        out = root / distributed
        lora = [*common, "--save-every", "2", "--output-dir", str(out)]
        two(*lora, "--distributed", distributed)
        jobs.append({"copy": [str(out), str(root / f"{distributed}-straight")]})
        jobs.append({"remove": str(out / "metrics.json")})  # as if killed after its step-2 checkpoint
        if distributed == "fsdp":  # FSDP's sharded optimizer state does not go into DDP: refused
            jobs.append({"argv": [*lora, "--distributed", "ddp", "--resume", "--batch-size", "2"], "code": 2})
        # auto's run resumed as --distributed ddp: under torchrun the same DDP, another spelling
        two(*lora, "--distributed", "ddp" if distributed == "auto" else distributed, "--resume")
    qlora = [*common, "--method", "qlora"]
    _one_process([*qlora, "--batch-size", "4", "--output-dir", str(root / "qlora-one")])
    for distributed in ("ddp", "fsdp"):
        two(*qlora, "--distributed", distributed, "--output-dir", str(root / f"qlora-{distributed}"))
    for method in ("prefix", "full"):
        args = [*common, "--method", method, "--save-every", "2",
                *(["--num-virtual-tokens", "4"] * (method == "prefix"))]
        _one_process([*args, "--batch-size", "4", "--output-dir", str(root / f"{method}-one")])
        two(*args, "--distributed", "fsdp", "--eval-examples", "3", "--output-dir", str(root / f"{method}-fsdp"))
    # records --max-length cuts, over 3 epochs: each process tokenizes records the other did in an earlier epoch
    cut = ["train", "--model", str(tiny), "--data", str(data), "--epochs", "3", "--grad-accum", "2",
           "--eval-examples", "2", "--max-length", "16", "--dropout", "0"]
    _one_process([*cut, "--batch-size", "4", "--output-dir", str(root / "cut-one")])
    two(*cut, "--output-dir", str(root / "cut-two"))
    # dropout on records of one length: both processes draw as many numbers, so only their seeds tell them apart
    same = root / "same-length.jsonl"
    same.write_text("".join(json.dumps({"text": "every record holds the same words"}) + "\n" for _ in range(8)))
    two("train", "--model", str(tiny), "--data", str(same), "--steps", "1", "--eval-examples", "2", "--dropout", "0.1",
        "--save-every", "1", "--output-dir", str(root / "dropout"))
    _two_processes(jobs, root)
    return root


def test_records_cut_count_each_record_once_across_processes(setup):
    """Summed per process, a record the two processes both tokenized (in different epochs) counted twice: 8 long
    records were reported as 15."""
    one, two = (json.loads((setup / d / "metrics.json").read_text())["records_cut"] for d in ("cut-one", "cut-two"))
    assert one == two and 0 < one["cut"] < one["tokenized"] == 22


def test_each_process_draws_its_own_dropout_masks(setup):
    """Every process starts from the same initialisation, then seeds its own generator: the same seed would give
    every process the same dropout masks (the checkpoint's RNG state, saved per process after one step, shows it)."""
    states = [torch.load(path, weights_only=False)["torch"] for path in
              (next((setup / "dropout").glob(f"**/rng-{rank}.pt")) for rank in (0, 1))]
    assert not torch.equal(*states)


@pytest.mark.parametrize("distributed", ["auto", "fsdp"])
def test_two_processes_train_the_adapter_of_one(setup, distributed):
    """torchrun, 2 processes × batch 2 (auto: DDP, as torchrun sets up) trains the adapter of 1 process × batch 4."""
    root = setup
    straight, resumed = root / f"{distributed}-straight", root / distributed
    two, one = (json.loads((d / "metrics.json").read_text()) for d in (straight, root / "one"))
    assert two["processes"] == 2 and two["distribution"]["sharded"] == (distributed == "fsdp")
    # the same global batches and the same exactly normalised loss: the same losses step by step
    assert two["train_losses"] == pytest.approx(one["train_losses"], rel=1e-5)
    assert two["eval_after"]["loss"] == pytest.approx(one["eval_after"]["loss"], rel=1e-5)
    assert two["eval_after"]["examples"] == one["eval_after"]["examples"] == 2  # each example once, not per process
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(root / "one" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:  # Adam magnifies rounding in near-zero gradients: compared loosely
        assert torch.allclose(a[key], b[key], atol=3e-3), key
    checkpoint = load_file(str(straight / "checkpoints" / "step-00000002" / "trainable.safetensors"))
    assert {tuple(v.shape) for v in checkpoint.values()} == {tuple(v.shape) for v in a.values()}  # whole, not shards
    # resuming from step 2 (weights, optimizer and RNG scattered back to both processes) redoes step 3 exactly;
    # auto's run resumed as --distributed ddp (the same DDP under torchrun: refused as another setting before)
    assert json.loads((resumed / "metrics.json").read_text())["resumed_from"].endswith("step-00000002")
    again = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert again.keys() == a.keys()
    for key in a:
        assert torch.equal(again[key], a[key]), key


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_processes_train_the_qlora_adapter_of_one(setup, distributed):
    """QLoRA: DDP leaves the frozen NF4 weights out of its broadcast; FSDP2 shards their packed bytes."""
    root = setup
    one, out = root / "qlora-one", root / f"qlora-{distributed}"
    two, ref = (json.loads((d / "metrics.json").read_text()) for d in (out, one))
    assert two["processes"] == 2 and two["distribution"]["sharded"] == (distributed == "fsdp")
    assert two["train_losses"] == pytest.approx(ref["train_losses"], rel=1e-5)
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], atol=3e-3), key


@pytest.mark.parametrize("method", ["prefix", "full"])
def test_fsdp_trains_prefix_tuning_and_a_full_fine_tune_like_one_process(setup, method):
    """Prefix tuning runs each document alone: every process must still gather the FSDP2 weights as often (its
    evaluation hung when one process had more records), and peft saves its adapter from the live, sharded prefix
    encoder (the whole weights stand in). A full fine-tune's tied lm_head is saved once, as one process saves it."""
    root = setup
    one, out = root / f"{method}-one", root / f"{method}-fsdp"
    two, ref = (json.loads((d / "metrics.json").read_text()) for d in (out, one))
    assert two["distribution"]["sharded"] and two["train_losses"] == pytest.approx(ref["train_losses"], rel=1e-5)
    saved = "adapter/adapter_model.safetensors" if method == "prefix" else "model/model.safetensors"
    a, b = load_file(str(out / saved)), load_file(str(one / saved))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4), key
    if method == "prefix":  # the checkpoint's adapter too (saved while sharded)
        assert load_file(str(out / "checkpoints" / "step-00000002" / "adapter" / "adapter_model.safetensors"))
    else:
        assert "lm_head.weight" not in a


def test_a_sharded_checkpoint_resumed_whole_is_refused_naming_both_layouts(setup):
    """An FSDP run's checkpoint (optimizer state by DTensor shard) resumed under DDP: refused before any model
    loads, naming both layouts (--distributed may change its spelling now, so the layout is what is compared)."""
    stderr = (setup / "launch.stderr").read_text()
    assert ("was written by a run whose state was sharded over the processes (FSDP), this run's is whole on every "
            "process (DDP)") in stderr
