"""load_causal_lm gives a tokenizer without a pad token its eos token as one (Llama-style tokenizers ship none; the
collators pad with it). Mutation run 18: dropping that passed every test (SmolLM2's tokenizer has a pad token).
A tiny checkpoint whose tokenizer has none, against transformers' own loading of it."""
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fastft.apps.models import load_causal_lm


def test_eos_becomes_the_pad_token(tmp_path):
    vocab = {"[UNK]": 0, "</s>": 1, "a": 2, "b": 3}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")), eos_token="</s>",
                            unk_token="[UNK]").save_pretrained(tmp_path)
    LlamaForCausalLM(LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    _, tokenizer = load_causal_lm(str(tmp_path))
    assert tokenizer.pad_token == tokenizer.eos_token
