"""`fastft train --method M` for every method on a tiny Llama on the CPU: the loss falls, and what is saved loads
back (fastft.load_adapter, or the saved model folder for full fine-tuning) giving the trained model's logits.
Also DPO with every adapter method but lora (in test_train_objectives.py), and `--patch-model`."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import fastft
import fastft.integration.methods as methods
from fastft.apps.cli import main
from fastft.apps.training.config import ConfigError, TrainConfig
from fastft.apps.training.run_setup import maybe_patch
from tests.train_utils import save_tiny_checkpoint

# A learning rate per method that moves the loss within 3 steps (prompt-learning and IA3 parameters are few and
# need large steps, as in their papers).
LR = {"lora": 1e-2, "qlora": 1e-2, "dora": 1e-2, "prefix": 0.3, "prompt": 0.5, "ia3": 0.5, "adapter": 1e-2,
      "full": 1e-3}
assert set(LR) == set(methods.METHODS)
KNOBS = {"prefix": ["--num-virtual-tokens", "8"], "prompt": ["--num-virtual-tokens", "8"]}  # cheaper on the CPU


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _train(tiny, out, *extra, steps=3, eval_examples=4, monkeypatch=None):
    """Runs `fastft train` in process; returns (metrics, the trained model as apply_method built it)."""
    built = []
    if monkeypatch is not None:
        apply = methods.apply_method
        monkeypatch.setattr(methods, "apply_method", lambda *a, **k: built.append(apply(*a, **k)) or built[-1])
    argv = ["train", "--model", str(tiny), "--steps", str(steps), "--batch-size", "4", "--eval-examples",
            str(eval_examples), "--eval-batch-size", "8", "--max-length", "32", "--schedule", "constant",
            "--warmup-ratio", "0", "--dropout", "0", "--output-dir", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text()), (built[0] if built else None)


def _reloaded(method, tiny, out):
    base = AutoModelForCausalLM.from_pretrained(tiny)
    if method == "full":
        return AutoModelForCausalLM.from_pretrained(out / "model")
    if method == "qlora":
        fastft.quantize_model(base, "nf4", skip=["lm_head"])  # the same NF4 base the adapter was trained on
    return fastft.load_adapter(base, out / "adapter")


@pytest.mark.parametrize("method", methods.METHODS)
def test_method_trains_from_the_cli_and_its_save_loads_back(method, tiny, tmp_path, monkeypatch):
    out = tmp_path / method
    metrics, trained = _train(tiny, out, "--method", method, "--lr", str(LR[method]), *KNOBS.get(method, []),
                              monkeypatch=monkeypatch)
    losses = metrics["train_losses"]
    assert len(losses) == 3 and all(x == x for x in losses)
    assert losses[-1] < losses[0] - 0.05, losses
    before, after = metrics["eval_before"]["loss"], metrics["eval_after"]["loss"]
    assert after < before - 0.05, (before, after)  # the same 4 held-out examples before and after
    assert (metrics["trainable_parameters"] == metrics["total_parameters"]) == (method == "full")

    saved = out / ("model" if method == "full" else "adapter")
    assert (saved / ("config.json" if method == "full" else "adapter_config.json")).is_file()
    if method == "adapter":
        assert json.loads((saved / "adapter_config.json").read_text())["peft_type"] == "FASTFT_BOTTLENECK_ADAPTER"
    loaded = _reloaded(method, tiny, out)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained.eval()(input_ids=ids).logits
        got = loaded.eval()(input_ids=ids).logits
        untrained = AutoModelForCausalLM.from_pretrained(tiny).eval()(input_ids=ids).logits
    assert want.shape == got.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got[:, -ids.shape[1]:] - untrained).abs().max() > 1e-3  # what loaded is the trained method, not a no-op


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "ia3"])
def test_save_merged_writes_a_plain_checkpoint_with_the_trained_logits(method, tiny, tmp_path):
    """--save-merged: OUTPUT_DIR/merged loads with AutoModelForCausalLM alone (no peft, no fastft) and gives the
    trained model's logits (QLoRA: merged into its dequantized NF4 weights, so exactly the NF4 model's)."""
    out = tmp_path / method
    metrics, _ = _train(tiny, out, "--method", method, "--lr", str(LR[method]), "--save-merged", steps=2)
    assert metrics["merged_model"] == str(out / "merged") and (out / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    config = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and not any("lora" in n or "ia3" in n for n, _ in
                                                           merged.named_parameters())
    assert (out / "merged" / "tokenizer.json").is_file()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = _reloaded(method, tiny, out).eval()(input_ids=ids).logits  # the saved adapter on its base
        got = merged(input_ids=ids).logits
        untrained = AutoModelForCausalLM.from_pretrained(tiny).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - untrained).abs().max() > 1e-3


@pytest.mark.parametrize("argv, message", [
    (["--method", "prompt"], "--save-merged: --method prompt has no base weights to merge into"),
    (["--method", "adapter"], "--save-merged: --method adapter has no base weights"),
    (["--method", "full"], "--method full has no base weights to merge into .the trained model is saved whole"),
    (["--distributed", "fsdp"], "--save-merged merges the whole model in one process, not FSDP's shards"),
])
def test_save_merged_refuses_what_it_cannot_merge(argv, message):
    from fastft.apps.training.config import validate

    with pytest.raises(ConfigError, match=message):
        validate(TrainConfig(save_merged=True, **dict(zip([a[2:].replace("-", "_") for a in argv[::2]], argv[1::2]))))


@pytest.mark.parametrize("method", ["qlora", "adapter", "dora", "ia3", "prefix", "prompt"])
def test_dpo_with_adapter_methods(method, tiny, tmp_path):
    """DPO's reference is the model with its adapter disabled: bottleneck adapters now have disable_adapter,
    and qlora skips the merged evaluations (a merged model has no adapter-free reference). (lora: in
    test_train_objectives.py.)"""
    metrics, _ = _train(tiny, tmp_path / method, "--method", method, "--objective", "dpo", "--lr", "1e-2",
                        steps=1, eval_examples=2)
    if method in ("prefix", "prompt"):  # random virtual tokens: the policy starts away from the reference
        assert math.isfinite(metrics["eval_before"]["loss"]) and metrics["eval_before"]["loss"] > 0
    else:  # the adapter starts as a no-op: policy = reference
        assert metrics["eval_before"]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert metrics["eval_merged"] is None and "reward_accuracy" in metrics["eval_after"]
    assert (tmp_path / method / "adapter" / "adapter_config.json").is_file()


def test_patch_model_on_matches_the_unpatched_run(tiny, tmp_path, capsys):
    """--patch-model on: fastft.patch_model (fused RMSNorm/RoPE/SwiGLU, fastft attention) under the training
    objectives (backbone + separate head), same losses as the unpatched run in fp32."""
    patched, _ = _train(tiny, tmp_path / "on", "--method", "lora", "--lr", "1e-2", "--patch-model", "on", steps=2)
    printed = capsys.readouterr().out
    assert "patched by fastft.patch_model: llama:" in printed
    assert "attention: fastft (set by --patch-model), not --attn-implementation sdpa" in printed
    plain, _ = _train(tiny, tmp_path / "off", "--method", "lora", "--lr", "1e-2", "--patch-model", "off", steps=2)
    assert "patched by" not in capsys.readouterr().out
    assert patched["train_losses"] == pytest.approx(plain["train_losses"], rel=1e-5, abs=1e-5)
    for key in ("eval_before", "eval_after"):
        assert patched[key]["loss"] == pytest.approx(plain[key]["loss"], rel=1e-5, abs=1e-5)


def test_patch_model_unsupported_architecture(capsys):
    """auto (on a GPU) notes it and goes on unpatched; on is an error naming the flag; off does nothing."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16))
    lines = []
    cuda = torch.device("cuda")  # only read by maybe_patch: patch_model refuses GPT-2 before touching anything
    assert not maybe_patch(model, TrainConfig(patch_model="auto"), cuda, lines.append)
    assert len(lines) == 1 and lines[0].startswith("not patched:") and "'gpt2' is not supported" in lines[0]
    with pytest.raises(ConfigError, match="--patch-model on: .*'gpt2' is not supported; supported model types"):
        maybe_patch(model, TrainConfig(patch_model="on"), cuda, lines.append)
    assert not maybe_patch(model, TrainConfig(patch_model="off"), cuda, lines.append) and len(lines) == 1
    assert not maybe_patch(model, TrainConfig(patch_model="auto"), torch.device("cpu"), lines.append)
    assert "GPU only" in lines[-1]


def test_help_lists_every_method_and_its_knobs(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "|".join(methods.METHODS) in text
    for knob in ("--rank", "--num-virtual-tokens", "--ia3-target-modules", "--ia3-feedforward-modules",
                 "--adapter-size", "--adapter-placement", "--adapter-activation", "--patch-model"):
        assert knob in text


def test_every_method_knob_reaches_method_options():
    """Each MethodOptions knob has its `fastft train` flag, and a non-default value of it arrives."""
    import dataclasses

    from fastft.apps.training.run_setup import method_options

    values = dict(rank=3, alpha=7.0, dropout=0.25, rslora=True, target_modules=("q_proj",), num_virtual_tokens=5,
                  ia3_target_modules=("v_proj", "up_proj"), ia3_feedforward_modules=("up_proj",), adapter_size=9,
                  adapter_placement="houlsby", adapter_activation="silu", adapter_attn_output_modules=("self_attn.o_proj",),
                  adapter_mlp_output_modules=("mlp.down_proj",))
    knobs = {f.name for f in dataclasses.fields(methods.MethodOptions)} - {"quant_type", "extra"}  # qlora: nf4 only
    assert knobs == set(values)
    options = method_options(TrainConfig(**values))
    assert {k: getattr(options, k) for k in knobs} == values
    assert all(values[k] != getattr(methods.MethodOptions(), k) for k in knobs)


# ------------------------------------------------------------------ on a GPU (never run in the CPU-only sessions)

@pytest.mark.gpu
@pytest.mark.parametrize("method", methods.METHODS)
def test_method_trains_patched_on_gpu(method, tiny, tmp_path, capsys):
    """bf16 on CUDA with the default --patch-model auto: patched (Triton norms/RoPE/GLU, fastft attention) and
    fused method layers together; the loss falls and the save loads back."""
    metrics, _ = _train(tiny, tmp_path / method, "--method", method, "--lr", str(LR[method]))
    assert "patched by fastft.patch_model: llama:" in capsys.readouterr().out
    assert metrics["device"].startswith("cuda") and all(x == x for x in metrics["train_losses"])
    assert metrics["eval_after"]["loss"] < metrics["eval_before"]["loss"] - 0.05
    assert (tmp_path / method / ("model" if method == "full" else "adapter")).is_dir()


@pytest.mark.gpu
def test_patched_losses_match_unpatched_on_gpu(tiny, tmp_path):
    patched, _ = _train(tiny, tmp_path / "on", "--method", "lora", "--lr", "1e-2", "--patch-model", "on", steps=2)
    plain, _ = _train(tiny, tmp_path / "off", "--method", "lora", "--lr", "1e-2", "--patch-model", "off", steps=2)
    assert patched["train_losses"] == pytest.approx(plain["train_losses"], rel=2e-2)  # bf16
