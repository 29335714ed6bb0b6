"""Training steps that are right: packed documents stay apart, accumulation equals one big batch, gradient
checkpointing (with offloading) changes no gradient, chat loss only on assistant turns, the objectives'
values at known points."""
import copy
import math

import pytest
import torch
from peft import LoraConfig

import fastft
from fastft.integration.checkpointing import enable_checkpointing
from fastft.apps.training.data import Encoder, Example, Pair, pack
from fastft.apps.training.loop import accumulate
from fastft.apps.training.objectives import ObjectiveModel, causal_lm_parts
from tests.utils import tiny_llama

VOCAB = 128


def _docs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        cut = (i * 3) % (n - 1)  # an unequal share of each document is prompt (no loss)
        docs.append(Example(ids, [-100] * cut + ids[cut:]))
    return docs


def _lora(attn="sdpa", dropout=0.0, seed=0):
    model = tiny_llama(seed, attn_implementation=attn)
    model = fastft.get_peft_model(model, LoraConfig(r=4, lora_dropout=dropout, target_modules=["q_proj", "v_proj",
                                                                                                 "down_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
    return model.train()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("attn", ["sdpa", "eager", "fastft"])
def test_packed_documents_never_attend_across(attn):
    if attn == "fastft":
        import fastft.integration.attention  # noqa: F401 - registers the implementation
    model = tiny_llama(3, attn_implementation=attn)
    docs = _docs([7, 12, 5])
    batch = pack(docs, pad_token_id=0, flash_kwargs=attn == "fastft")
    backbone, _ = causal_lm_parts(model)
    with torch.no_grad():
        # use_cache=False as in training: with a cache transformers does not derive the block mask
        packed = backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                          **{k: batch[k] for k in batch if k.startswith(("cu_seq", "max_length"))}).last_hidden_state
        alone = torch.cat([backbone(input_ids=torch.tensor([d.input_ids])).last_hidden_state for d in docs], 1)
    assert torch.allclose(packed, alone, atol=1e-5), (packed - alone).abs().max()


def test_accumulated_micro_batches_equal_one_batch():
    """4 micro-batches of unequal lengths and target counts ≡ 1 batch of all of them (fp32 tolerance); the
    mean of per-micro-batch means, the bug the exact normalisation avoids, differs."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    docs = _docs([5, 17, 9, 30, 6, 11, 23, 8])
    model = _lora()
    objective = ObjectiveModel(model, "sft")
    micro = [pack(docs[i:i + 2], pad_token_id=0, flash_kwargs=False) for i in range(0, 8, 2)]
    loss_sum, count, tokens = accumulate(objective, objective.count, micro, accelerator)
    accumulated = _grads(model)
    model.zero_grad()
    whole = pack(docs, pad_token_id=0, flash_kwargs=False)
    loss, _ = objective(whole)
    (loss / objective.count(whole)).backward()
    assert count == objective.count(whole) and tokens == whole["input_ids"].numel()
    assert float(loss_sum) == pytest.approx(float(loss.detach()), rel=1e-5)
    for n, g in _grads(model).items():
        assert torch.allclose(accumulated[n], g, rtol=1e-5, atol=1e-7), n
    model.zero_grad()
    for b in micro:
        (objective(b)[0] / objective.count(b) / len(micro)).backward()
    assert any(not torch.allclose(accumulated[n], g, rtol=1e-3, atol=1e-6) for n, g in _grads(model).items())


def test_checkpointing_and_offloading_keep_the_gradients():
    """With LoRA dropout on: the recompute must draw the same dropout seed (fastft draws it from torch's CPU
    generator, whose state non-reentrant checkpointing restores)."""
    docs = _docs([9, 14, 6])
    batch = pack(docs, pad_token_id=0, flash_kwargs=False)
    results = []
    for checkpointing, offload in ((False, False), (True, False), (True, True)):
        model = _lora(dropout=0.2)
        if checkpointing:
            enable_checkpointing(model.get_base_model())
        objective = ObjectiveModel(model, "sft")
        torch.manual_seed(7)
        context = torch.autograd.graph.save_on_cpu() if offload else torch.enable_grad()
        with context:
            loss, _ = objective(batch)
        loss.backward()
        results.append((float(loss), _grads(model)))
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-6)
        for n, g in grads.items():
            assert torch.allclose(g, results[0][1][n], rtol=1e-5, atol=1e-7), n


def test_dpo_starts_at_log2_and_distill_from_itself_is_zero():
    model = _lora()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.zeros_(p)  # the adapter starts as a no-op: policy = reference
    docs = _docs([8, 10, 6, 12])
    pairs = [Pair(docs[0], docs[1]), Pair(docs[2], docs[3])]
    dpo = ObjectiveModel(model, "dpo", dpo_beta=0.5)
    batch = pack(pairs, pad_token_id=0, flash_kwargs=False)
    loss, _ = dpo(batch)
    assert dpo.count(batch) == 2 and float(loss) == pytest.approx(2 * math.log(2), rel=1e-6)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)

    teacher = copy.deepcopy(model.get_base_model()).eval()
    distill = ObjectiveModel(model, "distill", teacher=teacher, kl_weight=1.0, reverse_kl_weight=0.5,
                             temperature=2.0)
    sft_batch = pack(docs, pad_token_id=0, flash_kwargs=False)
    with model.disable_adapter():
        loss, stats = distill.eval()(sft_batch)  # the student's CE is reported in evaluation
    assert abs(float(loss)) < 1e-4
    ce, _ = ObjectiveModel(model, "sft").eval()(sft_batch)
    assert float(stats["ce"]) == pytest.approx(float(ce), rel=1e-5)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from fastft.apps.models import smollm2_checkpoint
    return AutoTokenizer.from_pretrained(smollm2_checkpoint())


def test_chat_loss_only_on_assistant_turns(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"},
                {"role": "assistant", "content": "Rome."}]
    example = Encoder(tokenizer, 512).encode({"messages": messages})
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    trained = [i for i, label in zip(example.input_ids, example.labels) if label != -100]
    assert tokenizer.decode(trained) == "Paris.<|im_end|>\nRome.<|im_end|>\n"
    text = Encoder(tokenizer, 512).encode({"text": "plain text"})
    assert text.labels == text.input_ids and text.input_ids[-1] == tokenizer.eos_token_id


def test_builtin_sets_are_deterministic_and_held_out(tokenizer):
    from fastft.apps.training.records import builtin_instructions, builtin_preferences

    train, evaluation = builtin_instructions(0)
    assert builtin_instructions(0)[0][:50] == train[:50] and len(evaluation) == 2000
    answers = {r["messages"][1]["content"] for r in train[:500]}
    assert {"positive", "negative", "yes", "no"} <= answers and len(answers) > 10  # + written reviews
    from fastft.apps.datasets import load_task

    held_out = {text for name in ("mr", "sms-spam") for text, _ in load_task(name).eval}
    for r in evaluation:  # evaluation comes from the tasks' held-out splits only
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert user.split("\n\n", 1)[-1] in held_out or answer in held_out
    pairs, _ = builtin_preferences("mr", 0)
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {(" positive", " negative"), (" negative", " positive")}


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_learning_keeps_no_logits_and_trains_as_peft(kind):
    """Prompt and prefix tuning ran the PeftModel's own head: the whole tokens × vocab logits, and their fp32
    log-softmax kept for backward (8 GiB at Llama-3-8B's vocabulary, 16k tokens). The head now runs in the fused
    loss: nothing of vocab width is saved, and loss and gradients are peft's own (labels through its forward)."""
    import peft

    vocab = 1000  # wider than anything else in the model, so a saved logits tensor is recognisable by it
    config = (peft.PromptTuningConfig if kind == "prompt" else peft.PrefixTuningConfig)(
        num_virtual_tokens=4, task_type="CAUSAL_LM")
    model = peft.get_peft_model(tiny_llama(vocab_size=vocab), config)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (12,), generator=g).tolist()
    saved = []

    def keep(t):
        saved.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss, _ = ObjectiveModel(model, "sft").train()(pack([Example(ids, ids)], pad_token_id=0, flash_kwargs=False))
    assert not [shape for shape in saved if len(shape) > 1 and shape[-1] == vocab and shape[-2] != 64], saved  # (64, V): Wᵀ
    (loss / 11).backward()
    ours = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    # the first token has no target before it in fastft's packing (peft's forward would predict it from the
    # virtual tokens): masked for peft too
    own = model(input_ids=torch.tensor([ids]), labels=torch.tensor([[-100] + ids[1:]])).loss
    own.backward()
    torch.testing.assert_close(loss / 11, own, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(ours, (p.grad for p in model.parameters() if p.requires_grad)):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-7)
    assert isinstance(model.get_base_model().lm_head, torch.nn.Linear)  # put back


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_tuning_a_model_whose_forward_reads_its_heads_weight(dtype):
    """Mamba-style forwards cast to lm_head.weight.dtype before the head and upcast the logits: the head swapped
    out of peft's forward must still show its weight (AttributeError on nn.Identity), and the upcast hidden states
    go back to the head's dtype for the fused loss."""
    import peft
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    base = Mamba2ForCausalLM(Mamba2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=8,
                                          num_heads=4, head_dim=32, n_groups=1)).to(dtype)
    model = peft.get_peft_model(base, peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    ids = list(range(5, 14))
    loss, _ = ObjectiveModel(model, "sft").train()(pack([Example(ids, ids)], pad_token_id=0, flash_kwargs=False))
    own = model(input_ids=torch.tensor([ids]), labels=torch.tensor([[-100] + ids[1:]])).loss
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(loss.float() / 8, own.float(), **tol)
    loss.backward()
    assert isinstance(model.get_base_model().lm_head, torch.nn.Linear)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_learning_runs_documents_apart(kind):
    """peft's prompt-learning forward ignores position_ids: packed documents would see each other, so each
    runs on its own; the loss equals the documents' losses summed one by one."""
    import peft

    config = (peft.PromptTuningConfig if kind == "prompt" else peft.PrefixTuningConfig)(
        num_virtual_tokens=4, task_type="CAUSAL_LM")
    model = peft.get_peft_model(tiny_llama(), config)
    objective = ObjectiveModel(model, "sft").train()
    docs = _docs([6, 9, 5])
    loss, _ = objective(pack(docs, pad_token_id=0, flash_kwargs=False))
    alone = sum(float(objective(pack([d], pad_token_id=0, flash_kwargs=False))[0].detach()) for d in docs)
    assert float(loss.detach()) == pytest.approx(alone, rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
