"""Distillation into a prompt-tuned student whose model softcaps its logits (Gemma 2/3): hidden_at_targets then hands
the model's own (capped) logits with head None, which distill_loss_sum's plain-head check called plain_linear on
(AttributeError: 'NoneType' has no attribute 'forward'). Loss and gradient against peft's prompt tuning, written
from its full logits."""
import copy

import peft
import torch
import torch.nn.functional as F

from fastft.apps.training.data import Example, pack
from fastft.apps.training.objectives import ObjectiveModel
from fastft.integration.methods import MethodOptions, apply_method
from tests.methods_utils import copy_trainables, perturb_trainables

KNOBS = dict(kl_weight=1.0, reverse_kl_weight=0.5, ce_weight=0.25, temperature=2.0)


def _tiny_gemma2(seed, vocab):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                          final_logit_softcapping=5.0, attn_implementation="eager", tie_word_embeddings=False)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits large enough for the cap to matter
    return model


def _reference_loss(student, teacher, docs):
    """Σ over target tokens of the documented terms, each document on its own through the models' own logits."""
    T, total = KNOBS["temperature"], 0
    for doc in docs:
        ids = torch.tensor([doc.input_ids])
        labels = torch.tensor(doc.labels)[1:]
        at = (labels != -100).nonzero()[:, 0]
        s = student(input_ids=ids).logits[0, -ids.shape[1]:][at].double()
        with torch.no_grad():
            t = teacher(input_ids=ids).logits[0][at, :s.shape[-1]].double()  # the teacher's head is padded
        s_log, t_log = (s / T).log_softmax(-1), (t / T).log_softmax(-1)
        total = total + T * T * (KNOBS["kl_weight"] * (t_log.exp() * (t_log - s_log)).sum()
                                 + KNOBS["reverse_kl_weight"] * (s_log.exp() * (s_log - t_log)).sum()) \
            + KNOBS["ce_weight"] * F.cross_entropy(s, labels[at], reduction="sum")
    return total


def test_a_prompt_tuned_softcapped_student_distills_as_peft_computes_it():
    base = _tiny_gemma2(0, 64).train()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(num_virtual_tokens=3,
                                                                              task_type="CAUSAL_LM"))
    ours = apply_method(base, "prompt", MethodOptions(num_virtual_tokens=3))
    perturb_trainables(ours)
    copy_trainables(ours, theirs)
    teacher = _tiny_gemma2(1, 72).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    docs = [Example(ids, [-100] * 2 + ids[2:]) for ids in
            (torch.randint(0, 64, (n,), generator=g).tolist() for n in (7, 5))]

    loss, _ = ObjectiveModel(ours, "distill", teacher=teacher, **KNOBS).train()(pack(docs, pad_token_id=0,
                                                                                      flash_kwargs=False))
    loss.backward()
    want = _reference_loss(theirs, teacher, docs)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=0)
    (name, grad), = [(n, p.grad) for n, p in ours.named_parameters() if p.requires_grad]
    torch.testing.assert_close(grad, dict(theirs.named_parameters())[name].grad, rtol=1e-4, atol=1e-7)
