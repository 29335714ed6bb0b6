"""Evaluation of a classification task: ObjectiveModel's `hits` counts the documents whose highest-scoring label word
(among the batch's `choices`) is the target, as computed from the model's own logits."""
import torch

from fastft.apps.training.data import Example, pack
from fastft.apps.training.objectives import ObjectiveModel
from tests.utils import tiny_llama

IGNORE = -100
CHOICES = (17, 42, 99)


def test_hits_count_the_argmax_among_the_label_words():
    model = tiny_llama(seed=1)
    g = torch.Generator().manual_seed(0)
    docs, prompts = [], []
    for i in range(8):
        prompt = torch.randint(3, 120, (5 + i % 3,), generator=g).tolist()
        docs.append(Example(prompt + [CHOICES[i % 3]], [IGNORE] * len(prompt) + [CHOICES[i % 3]], CHOICES))
        prompts.append(prompt)
    want = 0
    with torch.no_grad():
        for prompt, doc in zip(prompts, docs):
            scores = model(torch.tensor([prompt])).logits[0, -1, list(CHOICES)]
            want += int(CHOICES[int(scores.argmax())] == doc.labels[-1])
    assert 0 < want < len(docs)  # neither all right nor all wrong: an argmin or a constant would show
    batch = pack(docs, pad_token_id=0, flash_kwargs=False)
    objective = ObjectiveModel(model, "sft").eval()
    with torch.no_grad():
        _, stats = objective(batch)
    assert int(stats["hits"]) == want
