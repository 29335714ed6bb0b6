"""`fastft train` end to end on a tiny model: every objective on built-in data and on a user's jsonl, full
fine-tuning, and the memory options together."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fastft.apps.cli import main
from tests.train_utils import save_tiny_checkpoint


pytestmark = pytest.mark.slow  # runs training jobs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _run(tiny, out, *extra):
    assert main(["train", "--model", str(tiny), "--steps", "2", "--batch-size", "2", "--eval-examples", "4",
                 "--max-length", "40", "--output-dir", str(out), *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def _changed(out) -> bool:
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    return any(torch.count_nonzero(v) for k, v in weights.items() if "lora_B" in k)


def test_dpo_on_builtin_pairs_and_on_a_jsonl(tiny, tmp_path):
    metrics = _run(tiny, tmp_path / "builtin", "--objective", "dpo")
    before = metrics["eval_before"]
    assert before["loss"] == pytest.approx(0.6931, abs=1e-3) and before["examples"] == 4  # policy = reference
    assert "reward_accuracy" in metrics["eval_after"] and _changed(tmp_path / "builtin")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}: colour?", "chosen": " blue", "rejected": " red"}) + "\n"
                             for i in range(12)))
    metrics = _run(tiny, tmp_path / "file", "--objective", "dpo", "--data", str(pairs), "--dpo-beta", "0.5")
    assert metrics["eval_after"]["examples"] == 1  # 10% of 12 held out


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_distill_from_a_teacher_on_builtin_instructions(tiny, tmp_path, method):
    teacher = save_tiny_checkpoint(tmp_path / "teacher", seed=1, layers=1)
    metrics = _run(tiny, tmp_path / "run", "--objective", "distill", "--teacher", str(teacher), "--task",
                   "instructions", "--kl-weight", "0.5", "--reverse-kl-weight", "0.5", "--ce-weight", "0.1",
                   "--temperature", "2", "--max-length", "96", "--method", method)
    assert metrics["eval_after"]["ce"] > 0 and metrics["eval_after"]["loss"] < metrics["eval_before"]["loss"]
    if method == "qlora":  # the merged evaluation is the same objective (its weights and temperature), merged exactly
        assert metrics["eval_merged"]["dense"]["loss"] == pytest.approx(metrics["eval_after"]["loss"], rel=1e-4)


def test_qlora_dpo_compiles(tiny, tmp_path):
    """DPO's reference runs with the adapters disabled inside the compiled forward: peft's disable_adapter() built
    every layer's repr (an NF4 weight's is not traceable) and flipped requires_grad (neither is traceable: two graph
    breaks a step); objectives.adapters_disabled flips the layers' flags only: no graph break, the eager losses."""
    runs = [_run(tiny, tmp_path / name, "--method", "qlora", "--objective", "dpo", "--dropout", "0", *extra)
            for name, extra in (("eager", ()), ("compiled", ("--compile", "default", "--compile-backend", "eager")))]
    assert runs[1]["compile"]["compiled"] and runs[1]["compile"]["graph_breaks"] == 0, runs[1]["compile"]
    assert runs[1]["train_losses"] == pytest.approx(runs[0]["train_losses"], rel=1e-6)


def test_full_fine_tuning_with_checkpointing_offload_bf16_and_a_chat_jsonl(tiny, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Count to {i}"},
                                                     {"role": "assistant", "content": " ".join(map(str, range(i)))}]})
                            + "\n" for i in range(2, 14)))
    out = tmp_path / "full"
    metrics = _run(tiny, out, "--method", "full", "--data", str(data), "--gradient-checkpointing",
                   "--offload-activations", "--mixed-precision", "bf16", "--schedule", "linear", "--eval-every", "1",
                   "--lr", "1e-4")
    assert metrics["trainable_parameters"] == metrics["total_parameters"]
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny)
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "eval" in r] == [1, 2] and all("tokens_per_second" in r for r in logs
                                                                        if "eval" not in r)
    assert (out / "config.yaml").read_text().count("method: full") == 1


def test_fused_token_loss_trains_a_lora_lm_head():
    """The SFT loss goes through fastft.ops.lm_head_cross_entropy: same loss and gradients as full logits +
    F.cross_entropy, and a LoRA adapter on lm_head gets its gradient (the peers' fused losses give it none)."""
    import torch.nn.functional as F
    from peft import LoraConfig
    from torch import nn

    import fastft
    from fastft.apps.training.objectives import token_cross_entropy_sum

    torch.manual_seed(0)
    holder = nn.Module()
    holder.lm_head = nn.Linear(32, 50, bias=False)
    model = fastft.get_peft_model(holder, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"],
                                                     init_lora_weights=False))
    head = model.base_model.model.lm_head
    hidden = torch.randn(13, 32, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    fused = token_cross_entropy_sum(hidden, head, targets)
    fused_grads = torch.autograd.grad(fused, [hidden, head.lora_A["default"].weight, head.lora_B["default"].weight])
    plain = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    plain_grads = torch.autograd.grad(plain, [hidden, head.lora_A["default"].weight, head.lora_B["default"].weight])
    assert torch.allclose(fused, plain, rtol=1e-5)
    for a, b in zip(fused_grads, plain_grads):
        assert a.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def _packed_docs(lengths, vocab=128, seed=0, prompt=3):
    from fastft.apps.training.data import Example

    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    return [Example(ids, [-100] * prompt + ids[prompt:]) for ids in docs]


def _sequence_logprobs_from_logits(model, batch):
    """Σ log p(target) per document from the model's own full logits (adapters as the caller set them)."""
    from fastft.apps.training.objectives import _model_inputs

    logp = model(**_model_inputs(batch), use_cache=False).logits.double()[:, :-1].log_softmax(-1)
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    token = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return torch.zeros(batch["num_documents"], dtype=torch.float64).index_add_(
        0, batch["document_ids"][:, :-1][keep], token[keep])


@pytest.mark.parametrize("head", ["none", "lora", "modules_to_save"])
def test_dpo_reference_is_the_whole_model_without_adapters(head):
    """The reference log-probs come from the model with adapters disabled, its lm_head included: with a LoRA or a
    modules_to_save lm_head the trained head must not leak into the reference."""
    import torch.nn.functional as F
    from peft import LoraConfig

    import fastft
    from fastft.apps.training.data import Pair, pack
    from fastft.apps.training.objectives import ObjectiveModel
    from tests.utils import randomize_lora_B, tiny_llama

    targets = ["q_proj", "lm_head"] if head == "lora" else ["q_proj"]
    config = LoraConfig(r=4, target_modules=targets, modules_to_save=["lm_head"] if head == "modules_to_save" else None)
    model = fastft.get_peft_model(tiny_llama(0, attn_implementation="eager"), config).train()
    randomize_lora_B(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    docs = _packed_docs([8, 10, 6, 12])
    batch = pack([Pair(docs[0], docs[1]), Pair(docs[2], docs[3])], pad_token_id=0, flash_kwargs=False)
    got, _ = ObjectiveModel(model, "dpo", dpo_beta=0.5)(batch)
    with torch.no_grad():
        policy = _sequence_logprobs_from_logits(model, batch)
        with model.disable_adapter():
            ref = _sequence_logprobs_from_logits(model, batch)
    want = -F.logsigmoid(0.5 * ((policy[0::2] - ref[0::2]) - (policy[1::2] - ref[1::2]))).sum()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_adapters_disabled_restores_each_flag_and_leaves_requires_grad(monkeypatch):
    """DPO's reference context: every adapter layer (LoRA, modules_to_save, trainable tokens) disabled inside, each
    flag back as it was after (a layer the user disabled stays disabled), requires_grad untouched, and peft's
    per-call status check (a repr of every module) not run; the output inside is peft's disable_adapter()'s."""
    from peft import LoraConfig
    from peft.peft_model import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    import fastft
    from fastft.apps.training.objectives import adapters_disabled
    from tests.utils import randomize_lora_B, tiny_llama

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                        trainable_token_indices={"embed_tokens": [1, 2]})
    model = fastft.get_peft_model(tiny_llama(0, attn_implementation="eager"), config)
    randomize_lora_B(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))}
    user_off = next(n for n in layers if n.endswith("v_proj"))
    layers[user_off].enable_adapters(False)  # a layer the user switched off (its requires_grad cleared by peft)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    flags = {n: m.disable_adapters for n, m in layers.items()}
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad(), model.disable_adapter():
        want = model(input_ids=ids).logits
    layers[user_off].enable_adapters(False)  # peft's context switched every layer back on
    monkeypatch.setattr(PeftModel, "get_model_status", lambda self: pytest.fail("the status check ran"))
    with torch.no_grad(), adapters_disabled(model):
        assert all(m.disable_adapters for m in layers.values())
        got = model(input_ids=ids).logits
    assert torch.equal(got, want)
    assert {n: m.disable_adapters for n, m in layers.items()} == flags and flags[user_off]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def _tiny_gemma2(cap):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                          final_logit_softcapping=cap, attn_implementation="eager", tie_word_embeddings=False)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits large enough for the cap to matter
    return model


@pytest.mark.parametrize("cap", [None, 5.0])
def test_objectives_apply_the_final_logit_softcap(cap):
    """Gemma 2/3 softcap their logits after the head; the objectives apply the head themselves: SFT's loss
    equals the model's own, and distillation from the model itself is 0 with the cap applied to both sides."""
    from fastft.apps.training.data import pack
    from fastft.apps.training.objectives import ObjectiveModel, _model_inputs

    model = _tiny_gemma2(cap)
    batch = pack(_packed_docs([20, 9], prompt=4), pad_token_id=0, flash_kwargs=False)
    sft = ObjectiveModel(model, "sft").eval()
    with torch.no_grad():
        got = float(sft(batch)[0]) / sft.count(batch)
        want = float(model(**_model_inputs(batch), labels=batch["labels"], use_cache=False).loss)
        student, _ = ObjectiveModel(model, "distill", teacher=_tiny_gemma2(cap), kl_weight=0.0,
                                    ce_weight=1.0).eval()(batch)
    assert got == pytest.approx(want, rel=1e-5)
    assert float(student) / sft.count(batch) == pytest.approx(want, rel=1e-5)


def test_objectives_refuse_logit_scaling_they_do_not_apply():
    from transformers import CohereConfig, CohereForCausalLM

    from fastft.apps.training.config import ConfigError
    from fastft.apps.training.objectives import ObjectiveModel

    model = CohereForCausalLM(CohereConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, logit_scale=0.0625))
    with pytest.raises(ConfigError, match=r"config.logit_scale = 0.0625"):
        ObjectiveModel(model, "sft")


def test_logit_transforms_after_the_head_are_refused():
    """Falcon-H1 multiplies its logits by lm_head_multiplier (SFT loss 10.87 against the model's own 5.03); a
    multimodal config (Gemma3n) keeps its softcap on the text config; any other transform after the head is caught
    by comparing the model's logits with head(hidden states) once at load."""
    from types import SimpleNamespace

    from transformers import FalconH1Config, FalconH1ForCausalLM

    from fastft.apps.training.config import ConfigError
    from fastft.apps.training.objectives import check_head_gives_logits, final_softcap
    from tests.utils import tiny_llama

    falcon = FalconH1ForCausalLM(FalconH1Config(vocab_size=128, hidden_size=64, intermediate_size=96,
                                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                                                lm_head_multiplier=0.25))
    with pytest.raises(ConfigError, match=r"config.lm_head_multiplier = 0.25"):
        final_softcap(falcon)

    text = SimpleNamespace(final_logit_softcapping=30.0)
    composite = torch.nn.Module()
    composite.config = SimpleNamespace(final_logit_softcapping=None, get_text_config=lambda: text)
    assert final_softcap(composite) == 30.0

    model = tiny_llama().train()
    check_head_gives_logits(model, "--model tiny")  # a plain Llama passes, and is left in its mode
    assert model.training
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 4
        return out

    model.forward = scaled
    with pytest.raises(ConfigError, match=r"--model tiny: LlamaForCausalLM transforms its logits after the head"):
        check_head_gives_logits(model, "--model tiny")


def test_distillation_from_a_teacher_with_a_padded_head():
    """Teachers' heads are often padded past the shared tokenizer (Qwen2.5 0.5B: 151936 rows, 7B: 152064): KL over
    the logits both heads have, CE over the student's; a head smaller than the tokenizer is refused."""
    import torch.nn.functional as F

    from fastft.apps.training.config import ConfigError
    from fastft.apps.training.objectives import check_vocab_rows, distill_loss_sum
    from tests.utils import tiny_llama

    g = torch.Generator().manual_seed(0)
    hidden, t_hidden = torch.randn(7, 16, generator=g), torch.randn(7, 24, generator=g)
    head, t_head = torch.nn.Linear(16, 128, bias=False), torch.nn.Linear(24, 136, bias=False)
    targets = torch.randint(0, 128, (7,), generator=g)
    got = distill_loss_sum(hidden, head, t_hidden, t_head, targets, kl_weight=1.0, reverse_kl_weight=0.5,
                           ce_weight=0.25, temperature=2.0)
    with torch.no_grad():
        got = got.detach()
        s, t = head(hidden).double(), t_head(t_hidden)[:, :128].double()
        s_log, t_log = F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1)
        want = (4 * F.kl_div(s_log, t_log, log_target=True, reduction="sum")
                + 0.5 * 4 * F.kl_div(t_log, s_log, log_target=True, reduction="sum")
                + 0.25 * F.cross_entropy(s, targets, reduction="sum"))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)

    student, teacher = tiny_llama(), tiny_llama(vocab_size=120)
    check_vocab_rows(student, tiny_llama(vocab_size=136), 128, "t")
    with pytest.raises(ConfigError, match=r"--teacher t: the student's head has 128 rows and the teacher's 120"):
        check_vocab_rows(student, teacher, 128, "t")


@pytest.mark.parametrize("config", ["dora", "ia3"])
def test_an_lm_head_adapter_the_fused_loss_refuses_trains_through_torch(config):
    """DoRA or IA3 on lm_head (the fused loss takes plain and LoRA heads) stopped sft and dpo with an error: they
    take head(hidden) in torch instead, with the model's own loss."""
    import peft

    from fastft.apps.training.data import pack
    from fastft.apps.training.objectives import ObjectiveModel, _model_inputs
    from tests.utils import randomize_lora_B, tiny_llama

    cfg = (peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], use_dora=True) if config == "dora" else
           peft.IA3Config(target_modules=["lm_head", "down_proj"], feedforward_modules=["down_proj"]))
    model = peft.get_peft_model(tiny_llama(), cfg)
    if config == "dora":
        randomize_lora_B(model)
    batch = pack(_packed_docs([20, 9], prompt=4), pad_token_id=0, flash_kwargs=False)
    sft = ObjectiveModel(model, "sft").eval()
    loss = sft(batch)[0]
    want = model(**_model_inputs(batch), labels=batch["labels"], use_cache=False).loss
    assert float(loss) / sft.count(batch) == pytest.approx(float(want), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lm_head" in n)


def test_distillation_computes_its_reported_ce_in_evaluation_only(monkeypatch):
    """The student's CE is what evaluation reports for distillation; in training nobody reads it, yet every
    micro-batch computed it (one more pass over the lm_head, no gradient). The step's target count comes from
    pack's host-side positions (a count of device labels read the device once per micro-batch)."""
    from fastft.apps.training import objectives
    from fastft.apps.training.data import pack
    from tests.utils import tiny_llama

    calls = []
    ce = objectives.token_cross_entropy_sum
    monkeypatch.setattr(objectives, "token_cross_entropy_sum", lambda *a: (calls.append(1), ce(*a))[1])
    batch = pack(_packed_docs([20, 9], prompt=4), pad_token_id=0, flash_kwargs=False)
    module = objectives.ObjectiveModel(tiny_llama(), "distill", teacher=tiny_llama(seed=1), kl_weight=1.0,
                                       ce_weight=0.0)
    loss, stats = module.train()(batch)
    assert calls == [] and "ce" not in stats
    with torch.no_grad():
        _, stats = module.eval()(batch)
    assert calls == [1] and float(stats["ce"]) > 0
    want = int((batch["labels"][:, 1:] != -100).sum())
    assert module.count(batch) == want == batch["target_positions"].numel()
    del batch["target_positions"]
    assert module.count(batch) == want


def test_distillation_with_plain_heads_makes_no_logits(monkeypatch):
    """Plain heads (the usual case: LoRA on the layers, the lm_heads dense) go through the fused KL and CE: no
    tokens x vocab logits (the torch form kept several fp32 copies, ~1.6 GB each for 8k tokens of a 49k vocab). Loss
    and gradients (hidden states, a trainable student head) as the torch form's, a padded teacher head and a bf16
    teacher included."""
    import torch.nn.functional as F

    from fastft.apps.training import objectives

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 16, generator=g).requires_grad_()
    t_hidden = torch.randn(9, 24, generator=g).to(torch.bfloat16)
    head, t_head = torch.nn.Linear(16, 100, bias=False), torch.nn.Linear(24, 104, bias=False).to(torch.bfloat16)
    targets = torch.randint(0, 100, (9,), generator=g)
    knobs = dict(kl_weight=1.0, reverse_kl_weight=0.5, ce_weight=0.25, temperature=2.0)
    monkeypatch.setattr(objectives, "_logits", lambda *a: pytest.fail("the fused form made logits"))
    got = objectives.distill_loss_sum(hidden, head, t_hidden, t_head, targets, **knobs)
    got_grads = torch.autograd.grad(got, (hidden, head.weight))
    monkeypatch.undo()
    s, t = F.linear(hidden, head.weight).float(), t_head(t_hidden)[:, :100].float()
    s_log, t_log = F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1)
    want = (4 * F.kl_div(s_log, t_log, log_target=True, reduction="sum")
            + 0.5 * 4 * F.kl_div(t_log, s_log, log_target=True, reduction="sum")
            + 0.25 * F.cross_entropy(s, targets, reduction="sum"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, torch.autograd.grad(want, (hidden, head.weight))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # a head with a hook (or softcapped, NF4, LoRA) runs in torch, where the hook runs
    calls = []
    head.register_forward_hook(lambda *a: calls.append(1))
    objectives.distill_loss_sum(hidden, head, t_hidden, t_head, targets, **knobs)
    assert calls == [1]


def test_distillation_slices_a_head_only_where_it_is_padded():
    """A trainable student head as large as the shared vocabulary was sliced anyway (weight[:vocab]), whose
    backward writes a zero-filled vocab x hidden copy of the gradient per KL term (full fine-tuning)."""
    from fastft.apps.training import objectives

    def nodes(fn, seen=None):
        seen = set() if seen is None else seen
        if fn is None or fn in seen:
            return seen
        seen.add(fn)
        for next_fn, _ in fn.next_functions:
            nodes(next_fn, seen)
        return seen

    g = torch.Generator().manual_seed(0)
    hidden, t_hidden = torch.randn(5, 16, generator=g), torch.randn(5, 24, generator=g)
    targets = torch.randint(0, 100, (5,), generator=g)
    head = torch.nn.Linear(16, 100, bias=False)
    for teacher_rows, sliced in ((100, False), (96, True)):
        loss = objectives.distill_loss_sum(hidden, head, t_hidden, torch.nn.Linear(24, teacher_rows, bias=False),
                                           targets, kl_weight=1.0, reverse_kl_weight=0.5, ce_weight=0.0,
                                           temperature=1.0)
        assert any("Slice" in type(fn).__name__ for fn in nodes(loss.grad_fn)) == sliced


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_dpo_turns_the_models_own_dropout_off(tmp_path, arch):
    """The reference pass runs the same modules in train mode: with the model's dropout on (GPT-2's nn.Dropout 0.1,
    a Llama's attention_dropout) policy and reference log-probs drew their own masks, and the first step (the same
    weights on both sides) was not log 2. TRL's DPO turns the model's dropout off; so does fastft train's dpo."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from fastft.apps.models import smollm2_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                           resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1))
        targets = ["--target-modules", "c_attn", "c_proj"]
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                             attention_dropout=0.3, tie_word_embeddings=True))
        targets = []
    path = tmp_path / arch
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    metrics = _run(path, tmp_path / "run", "--objective", "dpo", "--attn-implementation", "sdpa", *targets)
    assert metrics["train_losses"][0] == pytest.approx(0.6931472, abs=1e-6)  # policy = reference at the first step
