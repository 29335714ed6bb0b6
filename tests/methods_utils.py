"""Helpers the per-method tests share: perturb the trainable parameters, run a step, compare with peft."""
import peft
import torch

import fastft
from tests.utils import assert_close, rel_err, tiny_llama


def perturb_trainables(model, std: float = 0.1, seed: int = 1):
    """peft initialises most methods as a no-op (B = 0, l = 1): move every trainable parameter off it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * std)


def copy_trainables(src, dst):
    """Copy every trainable parameter of src into dst by name (the same method built by two implementations)."""
    dst_params = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            if p.requires_grad:
                assert name in dst_params, f"{name} missing in the other model"
                dst_params[name].copy_(p)


def step(model, ids, attention_mask=None, seed: int = 0):
    """Logits and gradients of every trainable parameter (by name) for one forward/backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(input_ids=ids, attention_mask=attention_mask, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def assert_same_step(a, b, what: str, dtype=torch.float32, tol: float | None = None):
    """tol: a relative-error bound replacing the dtype's (deep real models accumulate more rounding)."""
    logits_a, grads_a = a
    logits_b, grads_b = b
    if tol is not None:
        for name in grads_a:
            err = rel_err(grads_a[name], grads_b[name])
            assert err <= tol, f"{what} grad {name}: relative error {err:.3e} > {tol:.1e}"
        err = rel_err(logits_a, logits_b)
        assert err <= tol and set(grads_a) == set(grads_b) and grads_a, f"{what} logits: relative error {err:.3e}"
        return
    assert_close(logits_a, logits_b, dtype, f"{what} logits")
    assert set(grads_a) == set(grads_b) and grads_a, f"{what}: trainable parameters differ"
    for name in grads_a:
        assert grads_a[name] is not None and torch.isfinite(grads_a[name]).all(), f"{what}: {name} has no gradient"
        assert_close(grads_a[name], grads_b[name], dtype, f"{what} grad {name}")


def ids(batch=2, seq=9, vocab=128, seed=5):
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def fastft_and_peft(make_config):
    """(fastft model, peft model) of the tiny llama with the same trained-looking adapters; `make_config()` builds
    each model its own config."""
    ours = fastft.get_peft_model(tiny_llama(), make_config())
    theirs = peft.get_peft_model(tiny_llama(), make_config())
    perturb_trainables(ours)
    copy_trainables(ours, theirs)
    return ours, theirs


def assert_round_trips_with_peft(ours, tmp_path, what: str = "", peft_model=None):
    """fastft.save_adapter → peft loads the same logits; peft's save_pretrained (of `peft_model`, else of the model
    peft loaded) → fastft.load_adapter loads them too. Returns the model fastft loaded."""
    label = f"{what}: " if what else ""
    batch = ids()
    with torch.no_grad():
        want = ours(input_ids=batch).logits
    fastft.save_adapter(ours, tmp_path / "ours")
    by_peft = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))
    with torch.no_grad():
        assert_close(by_peft(input_ids=batch).logits, want, torch.float32, f"{label}fastft → peft")
    (by_peft if peft_model is None else peft_model).save_pretrained(str(tmp_path / "theirs"))
    by_fastft = fastft.load_adapter(tiny_llama(), tmp_path / "theirs")
    with torch.no_grad():
        assert_close(by_fastft(input_ids=batch).logits, want, torch.float32, f"{label}peft → fastft")
    return by_fastft


def unfreeze_base_weights(*models, modules=("q_proj",)):
    """Train the base weights of these adapted modules too (a partly unfrozen base): their gradients must come back."""
    for model in models:
        for name, p in model.named_parameters():
            if any(name.endswith(f"{m}.base_layer.weight") for m in modules):
                p.requires_grad_(True)


def assert_generates_as_its_forward(model, new_tokens: int = 3, left_padded: bool = True):
    """Greedy `generate` on a batch of 2 (the second row left-padded) gives, row by row, the scores and tokens of
    repeated whole forwards of the unpadded row: generation sees the method exactly as training does."""
    batch = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(batch)
    mask[1, :2] = 0 if left_padded else 1
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
        for row in range(2):
            seq = batch[row:row + 1, 6 - int(mask[row].sum()):]
            for t in range(new_tokens):
                logits = model(input_ids=seq).logits[0, -1]
                assert torch.allclose(out.scores[t][row], logits, atol=1e-5), (row, t)
                seq = torch.cat([seq, logits.argmax()[None, None]], 1)
            assert torch.equal(out.sequences[row, 6:], seq[0, -new_tokens:]), row
