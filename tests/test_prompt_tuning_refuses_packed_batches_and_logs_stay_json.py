"""Prompt tuning on a packed batch: peft puts the virtual tokens in front of the whole row and passes the packing
collator's document bounds on unchanged, P tokens short; fastft's Triton attention then left those rows unwritten
(NaN, a loss changing call to call). Refused, naming the packed keys (fastft train pads prompt tuning's documents).
And logs.jsonl stays strict JSON when a step's gradient norm is inf (an fp16 step the scaler skipped): null."""
import json
import math

import peft
import pytest
import torch

import fastft
from fastft.apps.training.logs import RunLog
from fastft.integration.packing import PackingCollator
from tests.utils import tiny_llama


def _packed():
    g = torch.Generator().manual_seed(5)
    return PackingCollator()([{"input_ids": torch.randint(3, 128, (n,), generator=g).tolist()} for n in (5, 7, 4)])


@pytest.mark.parametrize("config", [peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
                                    peft.PromptEncoderConfig(num_virtual_tokens=4, task_type="CAUSAL_LM",
                                                             encoder_hidden_size=32)])
def test_a_packed_batch_is_refused_and_a_padded_one_runs(config):
    model = fastft.get_peft_model(tiny_llama(), config)
    with pytest.raises(ValueError, match=r"a packed batch \(cu_seq_lens_q, .*pad the batch"):
        model(**_packed())
    ids = torch.randint(3, 128, (2, 6))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    with model.disable_adapter(), torch.no_grad():  # the base model alone takes packed batches
        assert torch.isfinite(model(**_packed(), use_cache=False).loss)


def test_a_non_finite_gradient_norm_is_logged_as_null(tmp_path):
    log = RunLog(str(tmp_path), enabled=True)
    log.write({"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": math.inf, "nested": {"x": math.nan}})
    log.close()
    line = (tmp_path / "logs.jsonl").read_text().splitlines()[-1]
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert record["grad_norm"] is None and record["nested"]["x"] is None and record["loss"] == 2.5


@pytest.mark.parametrize("config", [peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
                                    peft.PromptEncoderConfig(num_virtual_tokens=4, task_type="CAUSAL_LM",
                                                             encoder_hidden_size=32)])
def test_a_batch_packed_by_position_ids_alone_is_refused(config):
    """transformers' DataCollatorWithFlattening marks documents by position_ids only (no cu_seq_lens), which peft
    drops with a warning: the documents of a row attended to each other (a loss 1e-2 off one document a row).
    Left-padded rows, whose positions restart under the padding only, still run."""
    from transformers import DataCollatorWithFlattening

    g = torch.Generator().manual_seed(5)
    batch = DataCollatorWithFlattening()([{"input_ids": torch.randint(3, 128, (n,), generator=g).tolist()}
                                          for n in (5, 7, 4)])
    assert "cu_seq_lens_q" not in batch
    model = fastft.get_peft_model(tiny_llama(), config)
    with pytest.raises(ValueError, match=r"a packed batch \(position_ids restarting inside a row\)"):
        model(**batch)
    ids, mask = torch.randint(3, 128, (2, 6)), torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() counts a left-padded row's
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=ids).loss)
