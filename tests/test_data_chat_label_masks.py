"""Label masks of chats on the two tokenizing paths of Encoder._tokenized_pieces: a tokenizer without offsets (a
slow, Python one) trains only the assistant's text, piece by piece; a fast SentencePiece-style tokenizer whose token
across an answer's start stays whole trains that token with the answer (it overlaps the trained text)."""
import pytest

from fastft.apps.training.data import Encoder
from tests.test_train_data_edge_cases import ANSWER_AFTER_COLON_TEMPLATE, CHAT, _llama2_style_tokenizer

IGNORE = -100


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from fastft.apps.models import smollm2_checkpoint
    return AutoTokenizer.from_pretrained(smollm2_checkpoint())


class _WithoutOffsets:
    """The tokenizer as a slow one looks to the Encoder: no offsets (is_fast False), the rest delegated."""

    is_fast = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_a_tokenizer_without_offsets_trains_only_the_assistants_text(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}] + CHAT
    example = Encoder(_WithoutOffsets(tokenizer), 512).encode({"messages": messages})
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert example.labels[:n] == [IGNORE] * n
    assert example.labels[n:] == example.input_ids[n:]
    assert tokenizer.decode(example.input_ids[n:]) == "Paris.<|im_end|>\n"


def test_a_whole_token_across_the_answer_start_is_trained_with_the_answer():
    tok = _llama2_style_tokenizer()
    tok.chat_template = ANSWER_AFTER_COLON_TEMPLATE
    example = Encoder(tok, 512).encode({"messages": CHAT})
    prompt = tok(tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE)
    # the prompt's last token (":") merged with the answer's leading "▁" into one token, which is trained
    assert first == len(prompt) - 1 and example.input_ids[first] != prompt[first]
    assert example.labels[first:] == example.input_ids[first:]
    assert "Paris" in tok.decode(example.input_ids[first:])
