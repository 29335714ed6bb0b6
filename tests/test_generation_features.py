"""transformers 5's generation and serving features on fastft's prompt-learning models (audit: generation features).
Tiny random Llama (hidden 64, 2 layers), CPU, torch backend, deterministic. Continuous batching on a model patched
with fastft attention is transformers' refusal ("Implementation fastft is not supported"): set_attn_implementation
("sdpa") or patch_model(attention=False) first (README)."""
import warnings

import peft
import pytest
import torch
from peft import PromptEncoderConfig, PromptTuningConfig, LoraConfig
from transformers import ContinuousBatchingConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM

import fastft

warnings.filterwarnings("ignore")
N = 5


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def perturb(model, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def tokens(length, seed):
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def greedy_by_forward(model, ids, n):
    """The tokens repeated whole forwards choose (fastft's forward is peft's for prompt tuning)."""
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq


PROMPT_CONFIGS = {
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "p-tuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32),
}


def prompt_model(kind="prompt"):
    model = fastft.get_peft_model(tiny_llama(), PROMPT_CONFIGS[kind]())
    perturb(model)
    return model.eval()


def small_cb_config():
    import inspect

    # transformers 5.17 (the GPU machine's) names the page size block_size; 5.24 page_size (block_size deprecated)
    size = "page_size" if "page_size" in inspect.signature(ContinuousBatchingConfig).parameters else "block_size"
    return ContinuousBatchingConfig(**{size: 16}, num_blocks=16, max_batch_tokens=64, use_async_batching=False,
                                    use_cuda_graph=False)


# ---- 1. silent wrong tokens: a cached conversation continued with only the new tokens (transformers' documented
# "input_ids are only the new tokens, the attention_mask the FULL sequence" restart) loses its history -------------

@pytest.mark.parametrize("kind", ["prompt", "p-tuning"])
def test_prompt_learning_continues_a_cached_conversation_from_the_new_tokens_only(kind):
    model = prompt_model(kind)
    with torch.no_grad():
        first = model.generate(input_ids=tokens(6, 7), max_new_tokens=N, do_sample=False,
                               return_dict_in_generate=True)
        full = torch.cat([first.sequences, tokens(3, 11)], 1)  # the next user turn
        want = greedy_by_forward(model, full, N)[0, -N:]
        want_logits = model(input_ids=full).logits[0, -1]
        # the tokens the cache does not hold yet: the last generated one and the new turn
        new = full[:, first.sequences.shape[1] - 1:]
        got = model.generate(input_ids=new, attention_mask=torch.ones_like(full),
                             past_key_values=first.past_key_values, max_new_tokens=N, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    err = float((got.logits[0][0] - want_logits).abs().max())
    assert err < 1e-4 and torch.equal(got.sequences[0, -N:], want), (
        f"{kind}: continuing from the cache with the new tokens only: first-step logits {err:.3f} off the whole "
        f"conversation's forward; tokens {got.sequences[0, -N:].tolist()}, want {want.tolist()} (the history "
        "was dropped)")


def test_lora_continues_a_cached_conversation_from_the_new_tokens_only_control():
    """Control (passes): the same restart on a fastft LoRA model is exact."""
    model = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    perturb(model)
    model.eval()
    with torch.no_grad():
        first = model.generate(input_ids=tokens(6, 7), max_new_tokens=N, do_sample=False,
                               return_dict_in_generate=True)
        full = torch.cat([first.sequences, tokens(3, 11)], 1)
        want = greedy_by_forward(model, full, N)[0, -N:]
        got = model.generate(input_ids=full[:, first.sequences.shape[1] - 1:], attention_mask=torch.ones_like(full),
                             past_key_values=first.past_key_values, max_new_tokens=N, do_sample=False)
    assert torch.equal(got[0, -N:], want)


# ---- 2. silent wrong tokens: continuous batching / paged generation runs the base model without the virtual tokens

def _refused(run):
    """Continuous batching runs the base model's forward per request: refused, saying why (it gave the base model's
    tokens, silently, as peft's model does)."""
    with torch.no_grad(), pytest.raises(NotImplementedError,
                                        match="continuous batching runs the base model without the adapter"):
        run()


def _generate_batch(model, inputs):
    config = GenerationConfig(max_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=0)
    return model.generate_batch(inputs, generation_config=config, continuous_batching_config=small_cb_config(),
                                max_new_tokens=N, warmup=False)


@pytest.mark.parametrize("kind", ["prompt", "p-tuning"])
def test_prompt_learning_generate_batch_is_refused(kind):
    model = prompt_model(kind)
    _refused(lambda: _generate_batch(model, [tokens(6, 7)[0].tolist(), tokens(4, 9)[0].tolist()]))


def test_prompt_tuning_generate_with_a_paged_cache_is_refused():
    """generate(cache_implementation="paged") is transformers' switch to continuous batching: fastft's generate
    took its no-cache path, whose base generate handed the ids alone to it."""
    model = prompt_model()
    _refused(lambda: model.generate(tokens(6, 7), max_new_tokens=N, do_sample=False, cache_implementation="paged",
                                    continuous_batching_config=small_cb_config(), warmup=False))


def test_prefix_generate_batch_after_leaving_fastft_attention_is_refused():
    """On fastft attention transformers refuses continuous batching; after set_attn_implementation("sdpa")
    (what its message asks for) generate_batch ran the base model without the prefix."""
    model = fastft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    perturb(model)
    model.eval()
    model.get_base_model().set_attn_implementation("sdpa")
    _refused(lambda: _generate_batch(model, [tokens(6, 7)[0].tolist()]))


# ---- 4. unclear messages on prompt tuning's no-cache path -----------------------------------------------------------

@pytest.mark.parametrize("options", [{"use_cache": False}, {"cache_implementation": "static"}])
def test_prompt_tuning_inputs_embeds_on_the_recompute_path_runs_as_the_cached_one(options):
    """fastft's default cached path takes inputs_embeds (peft's generate does not); its no-cache path (use_cache=False,
    and the static cache it turns into it) fails with transformers' "LlamaForCausalLM doesn't have its forwarding
    implemented", which names neither prompt tuning nor the cache."""
    model = prompt_model()
    ids = tokens(6, 7)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        want = model.generate(inputs_embeds=embeds, max_new_tokens=N, do_sample=False)[0, -N:]
        try:
            got = model.generate(inputs_embeds=embeds, max_new_tokens=N, do_sample=False, **options)[0, -N:]
        except ValueError as e:
            assert "prompt" in str(e).lower() or "virtual" in str(e).lower(), f"unclear refusal: {e}"
            return
    assert torch.equal(got, want)


# ---- 5. silent wrong logits: a second request on the no-cache path (peft's generate) removes the first request's
# per-call wrapper from the shared base model ---------------------------------------------------------------------

@pytest.mark.parametrize("second", [{"use_cache": False}, {"cache_implementation": "static"}])
def test_prompt_tuning_request_without_cache_leaves_a_cached_request_in_flight_alone(second):
    """What a second thread serving the same model does, interleaved deterministically: a logits processor of request
    A runs request B between A's steps. B on FastftPromptModel.generate's no-cache path is peft's generate, which
    assigns base.prepare_inputs_for_generation and then restores peft's saved original, deleting fastft's wrapper
    that A's remaining steps need (positions P short)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model = prompt_model()
    perturb(model, std=2.0, seed=5)
    ids = tokens(6, 3)

    class SecondRequest(LogitsProcessor):
        calls = 0

        def __call__(self, input_ids, scores):
            self.calls += 1
            if self.calls == 2:
                model.generate(tokens(5, 3), max_new_tokens=1, do_sample=False, **second)
            return scores

    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, logits_processor=LogitsProcessorList([SecondRequest()]))
        err = max(float((out.logits[t][0] - model(input_ids=out.sequences[:, :6 + t]).logits[0, -1]).abs().max())
                  for t in range(10))
    assert err < 1e-4, f"request A's logits {err:.1e} off its own forward after request B ran without a cache"


@pytest.mark.parametrize("options", [{"cache_implementation": "static"}, {"use_cache": False}])
def test_prompt_tuning_without_a_cache_names_why_assisted_decoding_cannot_run(options):
    """The no-cache path with prompt lookup failed in transformers ("Assisted decoding requires a cache") although a
    static cache was asked for; the default dynamic cache runs it."""
    model = prompt_model()
    ids = tokens(6, 7)
    with torch.no_grad(), pytest.raises(ValueError, match="prompt / P-tuning with a static or passed cache.*"
                                                          "drop cache_implementation.*leave use_cache on"):
        model.generate(ids, max_new_tokens=N, do_sample=False, prompt_lookup_num_tokens=2, **options)
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=N, do_sample=False, prompt_lookup_num_tokens=2)
    assert torch.equal(got, greedy_by_forward(model, ids, N))
