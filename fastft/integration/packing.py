"""Padding-free batches: pack examples into one row, documents back to back, for varlen attention.

`PackingCollator` turns a list of tokenized examples into a single row (batch 1) with
- position_ids restarting at 0 for every example (RoPE sees each document from its start, and transformers /
  attn_implementation="fastft" read the document boundaries from them; not every architecture's sdpa/eager mask
  does: OPT, BioGPT and XGLM build one causal mask over the row, BLOOM and MPT take no position_ids, so there
  packed documents see each other: fastft.apps.training.objectives.packing_isolates tells),
- labels with -100 on each example's first token, so no example learns to predict across a boundary
  (causal-LM losses shift labels by one),
- cu_seq_lens_q / cu_seq_lens_k (int32 cumulative lengths) and max_length_q / max_length_k, the names of
  transformers' FlashAttentionKwargs: models forward them to the attention function, which then skips
  deriving the boundaries from position_ids.

The same cu_seqlens drive `fastft.ops.flash_attention(..., cu_seqlens=...)` directly.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

IGNORE_INDEX = -100


def _ids(x) -> list[int]:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).tolist()
    return list(x)


class PackingCollator:
    """Collate `[{"input_ids": [...], "labels": [...] (optional)}, ...]` into one packed row.

    pad_to_multiple_of: append a filler document (pad_token_id, labels -100) so the row length is a multiple
    of this; a stable length keeps shapes steady between steps. return_flash_kwargs: also return the
    cu_seq_lens_* / max_length_* entries (else only position_ids mark the documents).
    """

    def __init__(self, pad_to_multiple_of: int | None = None, pad_token_id: int = 0,
                 return_flash_kwargs: bool = True):
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError("PackingCollator: `pad_to_multiple_of` must be a positive int, got "
                             f"{pad_to_multiple_of!r}")
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = pad_token_id
        self.return_flash_kwargs = return_flash_kwargs

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("PackingCollator: got an empty list of examples")
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        lengths: list[int] = []
        for i, example in enumerate(features):
            if "input_ids" not in example:
                raise ValueError(f"PackingCollator: example {i} has no 'input_ids'")
            ids = _ids(example["input_ids"])
            if not ids:
                raise ValueError(f"PackingCollator: example {i} has no tokens")
            lab = _ids(example["labels"]) if example.get("labels") is not None else list(ids)
            if len(lab) != len(ids):
                raise ValueError(f"PackingCollator: example {i} has {len(ids)} input_ids but {len(lab)} labels")
            input_ids += ids
            labels += [IGNORE_INDEX] + lab[1:]
            position_ids += range(len(ids))
            lengths.append(len(ids))
        if self.pad_to_multiple_of:
            filler = -len(input_ids) % self.pad_to_multiple_of
            if filler:
                input_ids += [self.pad_token_id] * filler
                labels += [IGNORE_INDEX] * filler
                position_ids += range(filler)
                lengths.append(filler)

        batch: dict[str, Any] = {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
        }
        if self.return_flash_kwargs:
            cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
            cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
        return batch
