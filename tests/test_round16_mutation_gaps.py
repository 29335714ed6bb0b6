"""Gaps a mutation test of audit round 16's changes found (traced attention notes, the study's folder lock, the
dtypes a checkpoint keeps): each test fails on a mutant the covering tests let through."""
import fcntl
import gc
import types
import warnings

import pytest
import torch
from transformers import GPTBigCodeConfig, PhimoeConfig
from transformers.masking_utils import and_masks, causal_mask_function, packed_sequence_mask_function

import fastft
import fastft.integration.attention_masks as masks
from fastft.apps import cli
from fastft.apps.study import runner
from fastft.files import lock_folder
from fastft.integration.attention_masks import (bidirectional_window, causal_mask_window, documents_from_mask,
                                                fastft_attention_mask)


def _phimoe_config(window, cls=PhimoeConfig):
    return cls(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=window, num_local_experts=2,
                        num_experts_per_tok=2, pad_token_id=0)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_an_eager_attention_reads_the_reach_its_traced_mask_noted(fresh_dynamo):
    """_reach: a mask traced (noted under the config's traced key only) read by an eager attention: the traced note,
    not None (a causal window and a bidirectional reach)."""
    config = _phimoe_config(window=6)

    def both_masks():
        fastft_attention_mask(1, 8, 8, config=config, local_size=6)
        fastft_attention_mask(1, 8, 8, config=config, local_size=3, allow_is_bidirectional_skip=True)

    torch.compile(both_masks, backend="eager", fullgraph=True)()
    for kind in ("causal", "bidirectional"):  # what an eager mask of a dead config of the same id left: not this one's
        masks._mask_reach.pop((kind, id(config)), None)
    assert causal_mask_window(config) == 6
    assert bidirectional_window(types.SimpleNamespace(config=config), 99) == 4


class _OtherPhimoeConfig(PhimoeConfig):
    """Another config class with the very same settings (a model of another class may draw another reach from
    them: ModernBERT halves its local_attention)."""


def test_traced_notes_of_two_config_classes_alike_in_settings_stay_apart(fresh_dynamo):
    """The traced key holds the config's class: two classes of the same settings keep their own reaches."""
    configs = {3: _phimoe_config(window=7), 5: _phimoe_config(window=7, cls=_OtherPhimoeConfig)}
    assert vars(configs[3]) == vars(configs[5])

    def masks_of_both():
        for reach, config in configs.items():
            fastft_attention_mask(1, 8, 8, config=config, local_size=reach, allow_is_bidirectional_skip=True)

    torch.compile(masks_of_both, backend="eager", fullgraph=True)()
    for reach, config in configs.items():
        masks._mask_reach.pop(("bidirectional", id(config)), None)  # a dead config's of the same id: not its own
        assert bidirectional_window(types.SimpleNamespace(config=config), 99) == reach + 1


def _packed_mask(config, lengths=(3, 5)):
    """The mask function of one packed row (documents of `lengths`), built eagerly: (its tokens, the reference)."""
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    fn = and_masks(causal_mask_function, packed_sequence_mask_function(seq))
    tokens = sum(lengths)
    with torch.no_grad():
        fastft_attention_mask(1, tokens, tokens, mask_function=fn, config=config, allow_is_causal_skip=False)
    return tokens


def test_a_compiled_attention_without_a_config_reads_the_eager_masks_documents(fresh_dynamo):
    """Regional compilation, a layer without a config: it reads the eager mask's packed documents under "last" in the
    traced book (_packing_seen), as an eager one does in its thread's."""
    config = GPTBigCodeConfig(vocab_size=96, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    tokens = _packed_mask(config)
    bare = types.SimpleNamespace()
    with torch.no_grad():  # the mode the mask was built in, as a forward's layers run in its mode
        eager = documents_from_mask(bare, tokens)
        assert eager is not None
        traced = torch.compile(lambda: documents_from_mask(bare, tokens), backend="eager")()
    assert traced is not None
    torch.testing.assert_close(traced[0], eager[0])


def test_an_eager_attention_without_a_config_reads_its_forwards_documents():
    """An eager layer without a config reads its thread's note under "last"."""
    config = GPTBigCodeConfig(vocab_size=96, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    tokens = _packed_mask(config, lengths=(4, 2, 3))
    got = documents_from_mask(types.SimpleNamespace(), tokens)
    assert got is not None and got[0].tolist() == [0, 4, 6, 9]


def test_a_config_with_a_nan_setting_compiles_once(fresh_dynamo):
    """The traced key leaves floats out: a NaN setting (never equal to itself) in it lost the note in the graph (or
    would fail its guard at every call: a recompile per call, past the limit an eager run)."""
    from torch._dynamo.utils import counters

    config = _phimoe_config(window=5)
    config.a_float_setting = float("nan")
    def step(x):
        fastft_attention_mask(1, 8, 8, config=config, local_size=5)
        return x + (causal_mask_window(config) or -1)

    step = torch.compile(step, backend="eager", fullgraph=True)
    fastft_attention_mask(1, 8, 8, config=config, local_size=5)  # noted: the compiled calls write nothing new
    before = counters["stats"]["unique_graphs"]
    for _ in range(3):
        assert step(torch.zeros(2)).tolist() == [5.0, 5.0]  # the window read in the graph
    assert counters["stats"]["unique_graphs"] - before == 1


# --- the study's folder lock

ARGS = ["study", "--quick", "--methods", "lora", "--no-progress"]


@pytest.fixture
def no_cells(monkeypatch):
    """The study without its packages or cells; the report records whether the folder was held while drawn."""
    drawn = []
    monkeypatch.setattr(runner, "check_inputs", lambda config: {})
    monkeypatch.setattr(runner, "run_study", lambda config, progress=True, log=print: {
        "config": {}, "tasks": {}, "cells": [{"status": "done"}]})
    import fastft.apps.study.report as report

    def write_report(results, out):
        other, problem = lock_folder(out, runner.LOCK_NAME, "another study")
        if other is not None:
            other.close()
        drawn.append(problem)
        return {"report": f"{out}/report.md"}

    monkeypatch.setattr(report, "write_report", write_report)
    return drawn


def test_the_study_holds_its_own_lock_file_while_it_draws_the_report(tmp_path, no_cells):
    """The report is drawn inside the hold (a second study there is refused till then), under .fastft-study.lock,
    not train's lock file."""
    assert cli.main([*ARGS, "--output-dir", str(tmp_path)]) == 0
    assert len(no_cells) == 1 and "is in use by another another study" in no_cells[0]
    assert runner.LOCK_NAME == ".fastft-study.lock" and (tmp_path / ".fastft-study.lock").is_file()
    assert not (tmp_path / ".fastft-train.lock").exists()


def test_the_study_hold_closes_its_lock_file_itself(tmp_path):
    """Leaving the hold (an exception too) closes the lock file: not left to the garbage collector, which frees the
    lock only once nothing refers to the file (a ResourceWarning here)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="stopped"):
            with runner.holding_output_dir(tmp_path):
                raise RuntimeError("stopped")
        gc.collect()
    assert not [w for w in seen if issubclass(w.category, ResourceWarning)]
    lock, problem = lock_folder(tmp_path, runner.LOCK_NAME, "the next study")
    assert problem is None
    lock.close()


def test_a_train_run_locks_its_own_file(tmp_path):
    from fastft.apps.training.run_lock import _try_lock

    lock, problem = _try_lock(tmp_path)
    try:
        assert problem is None and (tmp_path / ".fastft-train.lock").is_file()
        assert not (tmp_path / ".fastft-study.lock").exists()
    finally:
        lock.close()


def test_lock_folder_makes_the_folder_and_refuses_a_file_system_without_locks(tmp_path, monkeypatch):
    """A folder not made yet is made (a study's --output-dir is locked before run_study makes it); flock failing
    with an OSError (no locks there) is a refusal saying so, not a held lock."""
    lock, problem = lock_folder(tmp_path / "new" / "out", "x.lock", "test")
    assert problem is None and (tmp_path / "new" / "out" / "x.lock").is_file()
    lock.close()

    def no_locks(*args):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock, problem = lock_folder(tmp_path, "x.lock", "test")
    assert lock is None and "cannot lock" in problem and "another file system" in problem


def test_a_mask_built_without_a_config_is_noted_eagerly_and_traced(fresh_dynamo):
    """A mask function called with no config (a layer without one): noted under "none" / "last", not a failure
    reading the settings of None, eagerly and traced."""
    assert _packed_mask(None) == 8
    assert documents_from_mask(types.SimpleNamespace(), 8)[0].tolist() == [0, 3, 8]
    torch.compile(lambda: fastft_attention_mask(1, 8, 8, local_size=4), backend="eager", fullgraph=True)()



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: --dtype auto gives bf16 there")
def test_a_gpu_runs_checkpoint_keeps_the_dtypes_auto_gave_there(tmp_path):
    """The checkpoint keeps the dtypes of the run's own device (auto: bf16 on a GPU), not the CPU's."""
    from tests.train_utils import save_tiny_checkpoint

    tiny = save_tiny_checkpoint(tmp_path / "tiny", layers=1)
    assert cli.main(["train", "--model", str(tiny), "--steps", "1", "--batch-size", "2", "--eval-examples", "0",
                     "--max-length", "16", "--rank", "4", "--save-every", "1", "--dtype", "auto", "--output-dir",
                     str(tmp_path / "run")]) == 0
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-00000001" / "trainer_state.pt", weights_only=False)
    assert state["dtypes"] == {"weights": "bfloat16", "teacher": None}

@pytest.mark.parametrize("between", ["alike model", "itself"])
def test_a_regional_recompute_reads_its_own_documents_after_an_alike_models_forward(fresh_dynamo, between):
    """Attention compiled under an eager mask, checkpointed, a packed batch without position_ids (GPT-BigCode): a
    no-grad forward of another model alike in every setting (a teacher copy) on rows packed otherwise, run between
    the forward and the backward, replaced the note the recompute reads (_packing_seen under the traced key):
    gradients 34 off at scale 65, silently (e4284c9, keyed by the config's id: exact). An eager mask leaves a mark
    there now (_EAGER_MASK): the recompute reads its own forward's notes outside the graph — also after a no-grad
    forward of the same model (which stopped it with a CheckpointError before)."""
    from tests.test_attention_notes_per_model_and_forward import _bigcode, _grads, _packed_batch
    from fastft.integration.packing import PackingCollator

    fastft.register_attention(backend="torch")
    try:
        student, teacher = _bigcode(), _bigcode()
        student.train()
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        batch = _packed_batch()
        want = _grads(student, "sdpa", batch)
        for m in (student, teacher):
            for block in m.transformer.h:
                block.attn.compile(backend="eager")
        docs = [torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 6, 8)]
        other = PackingCollator(return_flash_kwargs=False)([{"input_ids": d} for d in docs])
        other.pop("labels")
        teacher.set_attn_implementation("fastft")
        if between == "itself":  # its own evaluation between forward and backward (a CheckpointError before)
            teacher = student

        def teacher_forward():
            with torch.no_grad():
                teacher(**other, use_cache=False)

        got = _grads(student, "fastft", batch, teacher_forward)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    finally:
        fastft.register_attention()


@pytest.mark.parametrize("between, reentrant", [("packed", False), ("packed", True), ("unpacked", True)])
def test_a_regional_recompute_reads_its_own_documents_after_an_alike_models_forward_with_gradients(fresh_dynamo,
                                                                                                 between, reentrant):
    """As above, the alike model's forward with gradients on (another student, a teacher trained alongside): it
    replaced the note under the recompute's own grad mode too (gradients 34-38 off at scale 65, silently; after one
    without documents 32 off, reentrant). Reentrant checkpointing lost the documents with nothing in between too
    (28 off): its forward runs without gradients, and the notes were kept per grad mode. An eager mask leaves a mark
    in the traced book now, kept by a forward without documents, and the compiled attention reads, outside the
    graph, the notes an eager one reads: its own forward's, by the config's id (the recompute's too), with no guard
    on the id: an alike model compiles nothing of its own."""
    from torch._dynamo.utils import counters

    from tests.test_attention_notes_per_model_and_forward import _bigcode, _grads, _packed_batch
    from fastft.integration.packing import PackingCollator

    masks._packing_seen.clear()  # what earlier tests noted (a no-grad forward's) hid the reentrant case
    fastft.register_attention(backend="torch")
    try:
        student, other_student, third = _bigcode(), _bigcode(), _bigcode()
        student.train()
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        batch = _packed_batch()
        want = _grads(student, "sdpa", batch)
        for m in (student, other_student, third):
            m.set_attn_implementation("fastft")
            for block in m.transformer.h:
                block.attn.compile(backend="eager")
        docs = [torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 6, 8)]
        other = PackingCollator(return_flash_kwargs=False)([{"input_ids": d} for d in docs])  # 19 tokens too
        other.pop("labels")
        if between == "unpacked":
            other = {"input_ids": other["input_ids"]}
        got = _grads(student, "fastft", batch, lambda: other_student(**other, use_cache=False))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        graphs = counters["stats"]["unique_graphs"]
        third(**other, use_cache=False).logits.sum().backward()
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        fastft.register_attention()
