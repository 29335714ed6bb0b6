"""--pad-to-buckets: packed micro-batches padded to a few lengths (data.pack(bucket=True)) train exactly what the
unpadded ones do: the loss, its count, the token count and the gradients, for every objective."""
import pytest
import torch

from fastft.apps.training.data import Example, Pair, bucket_length, pack
from fastft.apps.training.objectives import ObjectiveModel
from tests.utils import randomize_lora_B, tiny_llama


def test_bucket_lengths_are_eight_per_doubling_and_at_most_an_eighth_longer():
    lengths = [bucket_length(n) for n in range(0, 5000)]
    assert lengths[:17] == [16] * 17
    for n, b in enumerate(lengths):
        assert b >= n and (n <= 16 or b <= n * 9 / 8), n
    assert lengths == sorted(lengths)
    for k in range(5, 12):  # (2**(k-1), 2**k]: eight lengths
        assert len({bucket_length(n) for n in range(2 ** (k - 1) + 1, 2 ** k + 1)}) == 8


def _docs(lengths, seed=0, prompt=3):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(1, 128, (n,), generator=g).tolist() for n in lengths]
    return [Example(ids, [-100] * prompt + ids[prompt:]) for ids in docs]


@pytest.mark.parametrize("flash_kwargs", [False, True])
def test_a_bucketed_batch_pads_tokens_and_targets_and_counts_the_real_ones(flash_kwargs):
    items = _docs([20, 9, 16])
    plain = pack(items, pad_token_id=0, flash_kwargs=flash_kwargs)
    padded = pack(items, pad_token_id=0, flash_kwargs=flash_kwargs, bucket=True)
    L, T = 45, 45 - 3 * 3  # tokens; targets: all but each document's 3 prompt tokens
    assert T == int((plain["labels"][:, 1:] != -100).sum())
    assert plain["num_tokens"] == padded["num_tokens"] == L and plain["num_targets"] == padded["num_targets"] == T
    assert padded["input_ids"].shape == (1, bucket_length(L + 1)) == (1, 48)
    assert padded["target_positions"].shape == (bucket_length(T),)
    assert torch.equal(padded["target_positions"][:T], plain["target_positions"])
    assert (padded["target_positions"][T:] == L - 1).all()  # the last real token: its shifted label is ignored
    assert (padded["labels"][0, L:] == -100).all() and (padded["input_ids"][0, L:] == 0).all()
    assert torch.equal(padded["position_ids"][0, L:], torch.arange(48 - L))  # a document of its own
    assert padded["num_documents"] == plain["num_documents"] == 3
    assert padded["document_lengths"] == [20, 9, 16, 3] and (padded["document_ids"][0, L:] == 3).all()
    if flash_kwargs:  # empty documents to a count fixed by the real ones; the longest document's power of two
        assert padded["cu_seq_lens_q"].tolist() == [0, 20, 29, 45, 48, 48]
        assert padded["max_length_q"] == padded["max_length_k"] == 32
    for lengths in ([15], [16], [17, 30], [1], [64] * 16, [40] * 8 + [3] * 50):  # exact fits get a filler token too
        batch = pack(_docs(lengths, prompt=0), pad_token_id=0, flash_kwargs=flash_kwargs, bucket=True)
        L = sum(lengths)
        assert batch["input_ids"].shape[1] == bucket_length(L + 1) > L
        # fillers no longer than the longest document: no position past a real one's
        assert batch["position_ids"].max() == max(lengths) - 1
        assert sum(batch["document_lengths"]) == batch["input_ids"].shape[1]
        if flash_kwargs:
            cu = batch["cu_seq_lens_q"]
            assert cu[-1] == batch["input_ids"].shape[1] and (cu.diff() <= batch["max_length_q"]).all()
            if L >= 16:
                assert cu.numel() == len(lengths) + len(lengths) // 8 + 3


def _lora(model):
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj", "lm_head"]))
    randomize_lora_B(model)
    return model


def _loss_and_grads(module, batch):
    module.zero_grad(set_to_none=True)
    loss, _ = module(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective", ["sft", "distill", "distill-torch", "dpo"])
def test_a_bucketed_batch_trains_what_the_unpadded_one_does(objective):
    """Loss and every gradient as the unpadded batch's (to fp32 rounding: other shapes), the count unchanged. The
    padded target rows are ignored ones: distillation's KL skips them too (fused, and the torch form a LoRA lm_head
    takes)."""
    torch.manual_seed(0)
    model = _lora(tiny_llama()) if objective != "distill" else tiny_llama()
    model.train()
    if objective == "distill":  # plain heads: the fused KL
        for n, p in model.named_parameters():
            p.requires_grad_("layers.1" in n or "lm_head" in n)
    kind = objective.removesuffix("-torch")
    knobs = dict(teacher=tiny_llama(seed=1), kl_weight=1.0, reverse_kl_weight=0.5, ce_weight=0.25,
                 temperature=2.0) if kind == "distill" else {}
    module = ObjectiveModel(model, kind, **knobs)
    if kind == "dpo":
        docs = _docs([12, 15, 9, 11], seed=1)
        items = [Pair(docs[0], docs[1]), Pair(docs[2], docs[3])]
    else:
        items = _docs([20, 9, 14, 6])
    plain = pack(items, pad_token_id=0, flash_kwargs=False)
    padded = pack(items, pad_token_id=0, flash_kwargs=False, bucket=True)
    assert padded["input_ids"].shape[1] > plain["input_ids"].shape[1]
    assert padded["target_positions"].numel() > plain["target_positions"].numel()
    assert module.count(padded) == module.count(plain) > 0
    want, want_grads = _loss_and_grads(module, plain)
    got, got_grads = _loss_and_grads(module, padded)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_learned_positions_and_a_teacher_running_documents_alone_take_a_bucketed_batch():
    """Fillers stay within the real documents' positions: GPT-2's learned position embeddings (64 here, every
    document at the limit, 128 filler tokens) index none past them; a distillation teacher that runs each document
    alone runs the real ones only."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastft.apps.training.objectives import run_documents_alone

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    items = _docs([64] * 16)
    plain = pack(items, pad_token_id=0, flash_kwargs=False)
    padded = pack(items, pad_token_id=0, flash_kwargs=False, bucket=True)
    assert padded["input_ids"].shape[1] - 1024 == 128
    module = ObjectiveModel(model, "sft")
    want, want_grads = _loss_and_grads(module, plain)
    got, got_grads = _loss_and_grads(module, padded)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    teacher = tiny_llama(seed=1, max_position_embeddings=64)
    run_documents_alone(teacher, True)
    module = ObjectiveModel(tiny_llama(), "distill", teacher=teacher, kl_weight=1.0, ce_weight=0.5)
    items = _docs([20, 9, 14, 6])
    want, _ = module(pack(items, pad_token_id=0, flash_kwargs=False))
    got, _ = module(pack(items, pad_token_id=0, flash_kwargs=False, bucket=True))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fastft_attention_takes_a_bucketed_batch():
    """attn_implementation="fastft" reads the batch's cu_seq_lens and max_length (the row's length when bucketed):
    the filler is one more document, the real documents' states as unpadded."""
    import fastft
    from fastft.apps.training.objectives import _model_inputs

    fastft.register_attention(backend="triton" if not torch.cuda.is_available() else "auto")
    model = tiny_llama(attn_implementation="fastft", head_dim=16)
    items = _docs([20, 9, 14])
    plain = pack(items, pad_token_id=0, flash_kwargs=True)
    padded = pack(items, pad_token_id=0, flash_kwargs=True, bucket=True)
    with torch.no_grad():
        want = model.model(**_model_inputs(plain), use_cache=False).last_hidden_state
        got = model.model(**_model_inputs(padded), use_cache=False).last_hidden_state
    torch.testing.assert_close(got[:, :43], want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fastft_train_pads_to_buckets_with_the_same_losses_and_token_count(tmp_path):
    import json

    from fastft.apps.cli import main
    from tests.train_utils import save_tiny_checkpoint

    tiny = save_tiny_checkpoint(tmp_path / "tiny")
    runs = {}
    for pad in ("off", "on"):
        out = tmp_path / pad
        assert main(["train", "--model", str(tiny), "--steps", "3", "--batch-size", "3", "--grad-accum", "2",
                     "--eval-examples", "4", "--max-length", "40", "--lr", "1e-5", "--pad-to-buckets", pad,
                     "--output-dir", str(out)]) == 0
        logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
        runs[pad] = json.loads((out / "metrics.json").read_text()), [(r["tokens"], r["targets"]) for r in logs
                                                                      if "tokens" in r]
    (on, on_counts), (off, off_counts) = runs["on"], runs["off"]
    assert on["config"]["pad_to_buckets"] == "on" and off["config"]["pad_to_buckets"] == "off"
    # (a small --lr: Adam turns rounding-level differences of near-zero gradients into ±lr steps)
    assert on["train_losses"] == pytest.approx(off["train_losses"], rel=1e-5)
    assert on_counts == off_counts and len(on_counts) == 3  # the real tokens and targets of each step


def test_pad_to_buckets_auto_follows_cuda_graphs_and_is_refused_for_prompt_learning():
    from fastft.apps.training.config import ConfigError, TrainConfig, resolved_pad_to_buckets, validate

    def resolved(**kw):
        return resolved_pad_to_buckets(TrainConfig(**kw))

    assert resolved() == "off" and resolved(compile="default") == "off"
    assert resolved(compile="max-autotune-no-cudagraphs") == "off"
    assert resolved(compile="reduce-overhead") == resolved(compile="max-autotune") == "on"
    assert resolved(compile="reduce-overhead", method="prefix") == "off"
    assert resolved(pad_to_buckets="on") == "on" and resolved(compile="max-autotune", pad_to_buckets="off") == "off"
    assert validate(TrainConfig(pad_to_buckets="on")).pad_to_buckets == "on"
    with pytest.raises(ConfigError, match=r"--pad-to-buckets on: --method prompt runs each packed document"):
        validate(TrainConfig(method="prompt", pad_to_buckets="on"))
