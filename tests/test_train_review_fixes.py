"""`fastft train`'s precision, resume checks and record cache, unit by unit: the training forward autocasts
(also for a model `shard_model` sharded, which skips `prepare`), `accelerate launch`'s environment does not
override --mixed-precision, fp16's scaled gradients are unscaled before clipping and a skipped step leaves the
schedule alone, a resume with other data / another held-out split / fewer steps is refused, and the record
cache stores tokens compactly."""
import json
from array import array
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastft.apps.training import loop, resume_checks, run_setup  # each test names what it needs
from fastft.apps.training.batches import Batches
from fastft.apps.training.config import ConfigError, TrainConfig
from fastft.apps.training.data import BatchPlan, Example, Pair
from fastft.apps.training.records import data_fingerprint, load_records, records_digest


@pytest.fixture
def accelerator_state():
    """make_accelerator resets accelerate's state itself; reset it after too, for tests that build their own."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state()


def _jsonl(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(n)))
    return path


# ------------------------------------------------------------------------------------------- precision

class _DtypeProbe(torch.nn.Module):
    """A model whose forward remembers the dtype its linear layer computed in."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.dtypes = []

    def forward(self, batch):
        out = self.linear(torch.ones(2, 4))
        self.dtypes.append(out.dtype)
        return out.float().sum(), {}


def test_the_training_forward_autocasts_without_prepare(accelerator_state):
    """--distributed fsdp shards the model itself (shard_model) and hands only the optimizer to `prepare`, so
    accelerate never wraps the forward in autocast: accumulate must (bf16 ran in fp32 while eval ran in bf16)."""
    accelerator = run_setup.make_accelerator(TrainConfig(mixed_precision="bf16"))
    probe = _DtypeProbe()
    micro = [{"input_ids": torch.zeros(1, 3, dtype=torch.long)}] * 2
    loop.accumulate(probe, lambda b: 3, micro, accelerator)
    assert probe.dtypes == [torch.bfloat16, torch.bfloat16]
    assert probe.linear.weight.grad is not None and probe.linear.weight.grad.dtype == torch.float32


def test_accelerate_launch_does_not_override_mixed_precision_no(monkeypatch, accelerator_state):
    """`accelerate launch` exports ACCELERATE_MIXED_PRECISION from its config; --mixed-precision no (passed to
    accelerate as None before) let it win while config.yaml and metrics said "no"."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    cfg = TrainConfig()
    assert run_setup.make_accelerator(cfg).mixed_precision == "no"
    (note,) = run_setup.launcher_notes(cfg)
    assert "--mixed-precision no, not accelerate's bf16 (ACCELERATE_MIXED_PRECISION" in note
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # the launcher's default: nothing to say
    assert run_setup.launcher_notes(TrainConfig(mixed_precision="bf16")) == []


class _Scaled:
    """What fastft train's loop sees of accelerate under fp16: an AcceleratedOptimizer with a GradScaler, and
    the accelerator's unscale_gradients / optimizer_step_was_skipped over it (accelerate itself refuses fp16
    on the CPU, so the Accelerator is stood in for; the scaler and optimizer wrapper are accelerate's own)."""

    def __init__(self, params):
        from accelerate.optimizer import AcceleratedOptimizer

        run_setup.make_accelerator(TrainConfig())  # the state AcceleratedOptimizer reads
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        self.optimizer = AcceleratedOptimizer(torch.optim.SGD(params, lr=0.1), device_placement=False,
                                              scaler=self.scaler)

    def unscale_gradients(self):
        self.scaler.unscale_(self.optimizer.optimizer)

    @property
    def optimizer_step_was_skipped(self):
        return self.optimizer.step_was_skipped


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # accelerate's patch
def test_fp16_clips_unscaled_gradients_and_a_skipped_step_keeps_the_schedule(accelerator_state):
    """Under shard_model's FSDP2, _clip called torch's clip_grad_norm_ on the GradScaler's scaled gradients (a
    norm 65536x too large, clipped to nothing), and the schedule stepped although the scaler skipped the
    optimizer step. (On the GPU only in a real run: fp16 autocast needs CUDA.)"""
    weight = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    fake = _Scaled([weight])
    schedule = torch.optim.lr_scheduler.LambdaLR(fake.optimizer.optimizer, lambda s: 1.0 / (s + 1))
    fake.scaler.scale((weight * weight).sum() / 2).backward()  # gradient = weight: norm 5
    assert loop._clip([weight], 10.0, fake, sharded_here=True) == pytest.approx(5.0)
    assert loop._optimizer_step(fake.optimizer, schedule, fake)
    assert schedule.last_epoch == 1 and torch.allclose(weight.detach(), torch.tensor([2.7, 3.6]))
    fake.optimizer.zero_grad()

    fake.scaler.scale((weight * float("inf")).sum()).backward()  # an overflow: the scaler skips the step
    before = weight.detach().clone()
    loop._clip([weight], 10.0, fake, sharded_here=True)
    assert not loop._optimizer_step(fake.optimizer, schedule, fake)
    assert schedule.last_epoch == 1 and torch.equal(weight.detach(), before)


# ------------------------------------------------------------------------------------------- resume checks

def test_the_batch_plan_refuses_other_training_records(tmp_path):
    """The plan records how many training records there were and their digest; an older checkpoint's plan
    (without them) resumes as before."""
    records = [{"text": f"record {i}"} for i in range(20)]
    plan = BatchPlan(20, 2, 2, 1, 0, records_digest(records))
    plan.next_step(0)
    state = plan.state_dict()
    BatchPlan(20, 2, 2, 1, 0, records_digest(records)).load_state_dict(state)
    with pytest.raises(ConfigError, match="trained on 20 records, this run has 19.*--eval-examples"):
        BatchPlan(19, 2, 2, 1, 0, records_digest(records[:19])).load_state_dict(state)
    other = records[:19] + [{"text": "another"}]
    with pytest.raises(ConfigError, match="20 training records differ"):
        BatchPlan(20, 2, 2, 1, 0, records_digest(other)).load_state_dict(state)
    older = {k: v for k, v in state.items() if k not in ("num_records", "records")}
    resumed = BatchPlan(20, 2, 2, 1, 0, records_digest(other))
    resumed.load_state_dict(older)
    assert (resumed.epoch, resumed.index) == (0, 4)


def test_changed_data_and_fewer_steps_are_refused_on_resume(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", 30)
    cfg = TrainConfig(data=str(path))
    saved = data_fingerprint(cfg)
    assert saved["eval_data"] is None and saved["data"]["size"] == path.stat().st_size
    checkpoint = tmp_path / "step-00000008"
    resume_checks.check_resumed_data(data_fingerprint(cfg), saved, checkpoint)
    resume_checks.check_resumed_data(data_fingerprint(cfg), None, checkpoint)  # an older checkpoint: not checked
    path.write_text(path.read_text().replace("record 3", "record 4"))  # same size, other contents
    with pytest.raises(ConfigError, match=r"--data changed since .*step-00000008 was written, its sha256 differs"):
        resume_checks.check_resumed_data(data_fingerprint(cfg), saved, checkpoint)
    with path.open("a") as f:
        f.write(json.dumps({"text": "new"}) + "\n")
    with pytest.raises(ConfigError, match=r"--data changed .* \(\d+ -> \d+ bytes\)"):
        resume_checks.check_resumed_data(data_fingerprint(cfg), saved, checkpoint)

    resume_checks.check_resumed_step(TrainConfig(steps=8), 8, checkpoint)  # killed after its last checkpoint: finishes
    with pytest.raises(ConfigError, match="is at step 8, past --steps 4; resume with --steps 8 or more"):
        resume_checks.check_resumed_step(TrainConfig(steps=4), 8, checkpoint)


def test_the_description_counts_the_files_records(tmp_path):
    train, evaluation, description = load_records(TrainConfig(data=str(_jsonl(tmp_path / "d.jsonl", 58)),
                                                              eval_examples=2))
    assert (len(train), len(evaluation)) == (56, 2) and description.endswith("d.jsonl (58 records)")


# ------------------------------------------------------------------------------------------- record cache

def test_the_record_cache_is_compact_and_batches_the_same():
    """The cache held Python ints (~49 bytes a token with the list slot: 45 GiB per 1e9 tokens); array('i')
    holds 4 bytes, and the packed batches are the same."""
    def encode(record):
        ids = [int(t) for t in record.split()]
        return Pair(Example(ids, ids), Example(ids[:2], [-100, ids[1]])) if len(ids) > 3 else Example(ids, ids)

    encoder = SimpleNamespace(encode=encode, tokenizer=SimpleNamespace(pad_token_id=0), last_cut=False)
    batches = Batches(encoder, torch.device("cpu"), flash_kwargs=True)
    records = ["5 6 7", "8 9 10 11 12", "70000 3"]
    for _ in range(2):  # tokenized, then from the cache
        cached, fresh = batches(records, [0, 1, 2]), batches(records, [0, 1, 2], cache=False)
        assert cached.keys() == fresh.keys()
        for key in cached:
            same = torch.equal if isinstance(cached[key], torch.Tensor) else (lambda a, b: a == b)
            assert same(cached[key], fresh[key]), key
    for item in batches.cache.values():
        for example in (item.chosen, item.rejected) if isinstance(item, Pair) else (item,):
            assert isinstance(example.input_ids, array) and example.input_ids.itemsize == 4
            assert isinstance(example.labels, array)



def test_a_setting_added_since_the_checkpoint_counts_as_its_default(tmp_path):
    """A checkpoint written before a setting existed resumes when the setting is at its default (it was refused as
    'None -> default'), and not when it is not."""
    from fastft.apps.training.config import to_yaml_dict

    saved = {k: v for k, v in to_yaml_dict(TrainConfig()).items() if k != "adapter_mlp_output_modules"}
    resume_checks.check_resumed_settings(TrainConfig(), saved, tmp_path)
    with pytest.raises(ConfigError, match=r"--adapter-mlp-output-modules \['down_proj'\] -> \['fc2'\]"):
        resume_checks.check_resumed_settings(TrainConfig(adapter_mlp_output_modules=("fc2",)), saved, tmp_path)


def test_full_fine_tuning_on_a_gpu_keeps_fp32_weights_under_bf16_autocast(monkeypatch):
    """AdamW on bf16 weights (its state bf16 too) rounds away every update below half a bf16 step: at lr 1e-5 a
    4-step run moved 15% of the weights and no RMSNorm weight. --dtype auto now gives full fine-tuning fp32 weights
    under bf16 autocast on a GPU; an explicit --dtype bf16 is run as asked, with a note; adapters are unchanged."""
    from fastft.apps.training.config import resolved_mixed_precision, validate, weights_dtype

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    full = validate(TrainConfig(method="full"))
    assert (full.mixed_precision, weights_dtype(full, gpu)) == ("bf16", torch.float32)
    assert run_setup.precision_notes(full, gpu) == []
    lora = validate(TrainConfig())
    assert (lora.mixed_precision, weights_dtype(lora, gpu)) == ("no", torch.bfloat16)
    asked = validate(TrainConfig(method="full", dtype="bf16"))
    assert (asked.mixed_precision, weights_dtype(asked, gpu)) == ("no", torch.bfloat16)
    (note,) = run_setup.precision_notes(asked, gpu)
    assert "no fp32 copy" in note and "--dtype auto" in note
    assert validate(TrainConfig(method="full", mixed_precision="no")).mixed_precision == "no"  # as given
    assert resolved_mixed_precision(TrainConfig(method="full")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    on_cpu = validate(TrainConfig(method="full"))
    assert (on_cpu.mixed_precision, weights_dtype(on_cpu, cpu)) == ("no", torch.float32)


def test_a_distillation_teacher_is_bf16_on_a_gpu_even_for_full_fine_tuning(monkeypatch):
    """The teacher is frozen: full fine-tuning's fp32 weights (for AdamW's small updates) loaded it in fp32 too,
    twice its memory on a GPU for logits that bf16 autocast computes in bf16. An explicit --dtype is kept."""
    from fastft.apps.training.config import teacher_dtype, validate, weights_dtype

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    full = validate(TrainConfig(method="full", objective="distill", teacher="smollm2-135m"))
    assert (weights_dtype(full, gpu), teacher_dtype(full, gpu)) == (torch.float32, torch.bfloat16)
    lora = validate(TrainConfig(objective="distill", teacher="smollm2-135m"))
    assert teacher_dtype(lora, gpu) == torch.bfloat16
    fp32 = validate(TrainConfig(method="full", objective="distill", teacher="smollm2-135m", dtype="fp32"))
    assert teacher_dtype(fp32, gpu) == torch.float32
    assert teacher_dtype(full, cpu) == torch.float32


def test_report_writes_large_figures_plainly_and_flags_evaluations_over_other_sets():
    """report.md printed 1.235e+05 tokens/s; and a run resumed with another --eval-examples put evaluations over
    16 and 64 examples side by side with nothing but the examples column to tell them apart."""
    from fastft.apps.training.report import report_markdown

    metrics = {"config": {"method": "lora"}, "train_losses": [2.0, 1.5], "tokens_per_second": 123456.7,
               "train_seconds": 45678.9, "peak_memory_gib": 1.25,
               "eval_before": {"loss": 2.1, "examples": 16}, "eval_after": {"loss": 1.4, "examples": 64}}
    text = report_markdown(metrics)
    assert "123,457 tokens/s (leaving out" in text and "45,679 s of training steps" in text and "e+0" not in text
    assert "different held-out sets (16, 64 examples" in text
    metrics["eval_before"]["examples"] = 64
    assert "different held-out sets" not in report_markdown(metrics)


def test_report_names_the_task_only_when_it_was_the_data():
    """A --data run's report.md listed `task | mr`, a built-in task it never read."""
    from fastft.apps.training.report import report_markdown

    assert "| task | mr |" in report_markdown({"config": {"task": "mr", "data": None}})
    text = report_markdown({"config": {"task": "mr", "data": "chats.jsonl"}})
    assert "| task |" not in text and "| data | chats.jsonl |" in text


def test_a_full_models_tied_weights_are_copied_to_the_cpu_once(monkeypatch):
    """--method full saves `full_state_dict`: on a GPU `.cpu()` copied lm_head.weight and embed_tokens.weight apart,
    and save_pretrained (which drops aliases by storage) wrote the tied weight twice (+113 MB for SmolLM2-135M)."""
    from fastft.apps.training.checkpoints import full_state_dict
    from tests.utils import tiny_llama

    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: self.clone())  # what .cpu() does to a CUDA tensor
    state = full_state_dict(model, trainable_only=False)
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    assert state["lm_head.weight"].data_ptr() != model.lm_head.weight.data_ptr()  # a copy was made (emulated)
    assert len({id(v) for v in state.values()}) == len(state) - 1


def test_an_older_checkpoint_that_cannot_be_removed_is_a_warning_not_a_stop(tmp_path, monkeypatch):
    """The new checkpoint is in place when the older one is pruned: a failure there (a file held open on NFS) was
    reported as "its checkpoint could not be written" and stopped the run, at every later save too."""
    import shutil

    from accelerate import Accelerator

    from fastft.apps.training.checkpoints import Checkpoints
    from tests.utils import tiny_llama

    model = tiny_llama(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    checkpoints = Checkpoints(tmp_path, Accelerator(cpu=True))
    checkpoints.save(2, model, optimizer, {})
    real = shutil.rmtree

    def busy(path, *args, **kwargs):
        if Path(path).name == "step-00000002":
            raise OSError(16, "Device or resource busy", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", busy)
    with pytest.warns(UserWarning, match="the older checkpoint .*step-00000002 could not be removed .*Device or "
                                         "resource busy.*step-00000004, is complete: delete the older one by hand"):
        checkpoints.save(4, model, optimizer, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]


@pytest.mark.parametrize("arch", ["opt", "bloom", "llama"])
def test_packed_documents_stay_apart_where_the_mask_ignores_position_ids(arch):
    """transformers builds sdpa/eager's packed block mask from position_ids, but OPT (and BioGPT, XGLM) build one
    causal mask over the row and BLOOM/MPT take no position_ids: packed documents attended to the ones before them
    (losses 0.15 off, gradients 100% off), silently. Such a model runs each document on its own; Llama packs."""
    import torch.nn.functional as F
    import transformers as tf

    from fastft.apps.training.objectives import ObjectiveModel, packing_isolates, run_documents_alone

    V = 128
    config = {"opt": lambda: tf.OPTConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, ffn_dim=96,
                                          num_attention_heads=4, dropout=0.0, word_embed_proj_dim=64),
              "bloom": lambda: tf.BloomConfig(vocab_size=V, hidden_size=64, n_layer=2, n_head=4, hidden_dropout=0.0,
                                              attention_dropout=0.0),
              "llama": lambda: tf.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2)}[arch]()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).train()
    # bf16 too: the probe compares rows of one shape (0.0 apart when isolated), not another kernel shape's rounding,
    # which in bf16 (1.2e-2 for SmolLM2) hid BLOOM's leak (1.4e-2)
    assert packing_isolates(model.to(torch.bfloat16), flash_kwargs=False) == (arch == "llama")
    isolates = packing_isolates(model.float(), flash_kwargs=False)
    assert isolates == (arch == "llama") and model.training
    run_documents_alone(model, not isolates)
    g = torch.Generator().manual_seed(0)
    docs = [Example(ids, ids) for ids in (torch.randint(1, V, (n,), generator=g).tolist() for n in (9, 12, 7))]
    from fastft.apps.training.data import pack

    loss, _ = ObjectiveModel(model, "sft")(pack(docs, pad_token_id=0, flash_kwargs=False))
    packed = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    alone = sum(F.cross_entropy(model(input_ids=torch.tensor([d.input_ids])).logits[0, :-1],
                                torch.tensor(d.labels[1:]), reduction="sum") for d in docs)
    want = torch.autograd.grad(alone, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, alone, rtol=1e-5, atol=1e-5)
    for got, ref in zip(packed, want):
        if ref is not None:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    # evaluation: one record per forward where documents run alone, so every process makes as many forwards (FSDP2
    # gathers in each; a process with fewer records would hang the others)
    from accelerate import Accelerator

    seen = []

    def make_batch(records, indices, cache=True):
        seen.append(len(indices))
        return pack([records[i] for i in indices], pad_token_id=0, flash_kwargs=False)

    result = loop.evaluate(ObjectiveModel(model, "sft"), docs, make_batch, 8, Accelerator(cpu=True))
    assert result["examples"] == 3 and set(seen) == ({1} if arch != "llama" else {3, 1})


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("host_lengths", [True, False])
def test_prompt_learning_runs_each_document_from_host_side_spans(method, host_lengths):
    """Prompt learning runs each packed document on its own: its spans now come from pack's host-side lengths and
    its targets from the host-side positions (a nonzero and boolean masks per document read the device each time);
    the loss and gradients are those of each document run alone, a one-token document included."""
    import torch.nn.functional as F
    from peft import PrefixTuningConfig, PromptTuningConfig

    import fastft
    from fastft.apps.training.data import pack
    from fastft.apps.training.objectives import ObjectiveModel
    from tests.utils import tiny_llama

    config = (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3) if method == "prompt"
              else PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model = fastft.get_peft_model(tiny_llama(), config).train()
    g = torch.Generator().manual_seed(0)
    docs = []
    for n, prompt in ((9, 3), (1, 0), (12, 5), (7, 2)):
        ids = torch.randint(1, 128, (n,), generator=g).tolist()
        docs.append(Example(ids, [-100] * prompt + ids[prompt:]))
    batch = pack(docs, pad_token_id=0, flash_kwargs=False)
    if not host_lengths:  # a batch made elsewhere: spans from the document ids
        del batch["document_lengths"]
    import sys

    nonzero, found = torch.Tensor.nonzero, []

    def counted(self, *args, **kwargs):  # the objective's per-document device reads were nonzero calls
        found.append(sys._getframe(1).f_code.co_filename)
        return nonzero(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "nonzero", counted)
        loss, _ = ObjectiveModel(model, "sft")(batch)
    # (fastft attention reads a forward's position_ids once, to find packed documents: not the objective's)
    assert not [f for f in found if "fastft/apps" in f], found
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params)
    alone = sum(F.cross_entropy(model(input_ids=torch.tensor([d.input_ids])).logits[0, -len(d.input_ids):-1],
                                torch.tensor(d.labels[1:]), reduction="sum") for d in docs if len(d.input_ids) > 1)
    torch.testing.assert_close(loss, alone, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, torch.autograd.grad(alone, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
