"""Training and evaluation records → packed micro-batches on the device, for `fastft train` (fastft.apps.training.loop).

Records are tokenized when a step first uses them and cached compactly; a later step's micro-batches are built
while the device runs the current one (prefetch); every token id is checked on the host (Batches.token_rows) so
the fused losses need no device read; which records --max-length cut is tracked for the run's notes.
"""
from __future__ import annotations

from array import array

import torch

from fastft.apps.training.config import ConfigError
from fastft.apps.training.data import Encoder, Example, Pair, pack


def compact(item):
    """An Example / Pair with its token lists as array('i'): 4 bytes a token instead of a list slot (8) and an int
    object (28), since the cache holds every training record's tokens. pack reads arrays as it reads lists."""
    if isinstance(item, Pair):
        return Pair(compact(item.chosen), compact(item.rejected))
    return Example(array("i", item.input_ids), array("i", item.labels), item.choices)


class Batches:
    """Records → packed micro-batches on the device (records are tokenized when first used, then cached)."""

    def __init__(self, encoder: Encoder, device, flash_kwargs: bool, bucket: bool = False,
                 token_rows: int | None = None):
        self.encoder, self.device, self.flash_kwargs = encoder, device, flash_kwargs
        self.bucket = bucket  # training micro-batches padded to bucket lengths (data.pack); evaluation's are not
        # the fewest rows of the embedding and the heads (objectives.token_rows): every id is checked below it here,
        # on the host, so the fused losses skip their device read (batch["checked_on_host"])
        self.token_rows = token_rows
        self.cache: dict[int, object] = {}
        self.cut: set[int] = set()  # indices of cached (training) records --max-length cut
        self.ready = None  # (micro-batch indices, their batches or the error building them), from prefetch
        self.pending: set[int] = set()  # records first tokenized by that prefetch, in no step taken yet

    def __call__(self, records, indices, cache: bool = True) -> dict:
        items = []
        for i in indices:
            item = self.cache.get(i) if cache else None
            if item is None:
                item = self.encoder.encode(records[i])
                if cache:
                    item = self.cache[i] = compact(item)
                    if self.encoder.last_cut:
                        self.cut.add(i)
            items.append(item)
        batch = pack(items, pad_token_id=self.encoder.tokenizer.pad_token_id, flash_kwargs=self.flash_kwargs,
                     bucket=self.bucket and cache)  # (uncached: evaluation's, not padded)
        if self.token_rows is not None:
            self._check_ids(batch, items, indices, "training" if cache else "evaluation")
            batch["checked_on_host"] = True
        return {k: self._to_device(v) if isinstance(v, torch.Tensor) and k != "choices" else v
                for k, v in batch.items()}

    def _check_ids(self, batch: dict, items, indices, which: str) -> None:
        """Every token id (inputs, labels, label words) below token_rows, checked on the host: past it the embedding
        and the losses would read out of bounds (on a GPU a device-side assert, which ends the process)."""
        held = [batch["input_ids"], batch["labels"]] + ([batch["choices"]] if "choices" in batch else [])
        if all(int(t.max()) < self.token_rows for t in held if t.numel()):  # labels' ignore index is negative
            return
        for i, item in zip(indices, items):
            parts = (item.chosen, item.rejected) if isinstance(item, Pair) else (item,)
            top = max(max(max(p.input_ids, default=0), max(p.labels, default=0), *(p.choices or ())) for p in parts)
            if top >= self.token_rows:
                raise ConfigError(
                    f"{which} record {i} holds token id {top}, but the model has {self.token_rows} token rows (its "
                    f"embeddings and lm_head, and the teacher's): the tokenizer ({len(self.encoder.tokenizer)} ids) "
                    "does not fit the model; train with the model's own tokenizer, or resize the model's embeddings "
                    "to len(tokenizer) (model.resize_token_embeddings) and save it first")

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return t.to(self.device)
        # from pinned memory the copy is queued behind the device's work instead of waiting for it (a pageable
        # copy may sync the stream): a batch prefetched while a step runs does not stall it
        return t.pin_memory().to(self.device, non_blocking=True)

    def step(self, records, micro_indices: list[list[int]]) -> list[dict]:
        """This process's micro-batches of a step (BatchPlan.next_step's indices) on the device: those `prefetch`
        built for the same records, or built now."""
        ready, self.ready, self.pending = self.ready, None, set()
        if ready is not None and ready[0] == micro_indices:
            if isinstance(ready[1], Exception):
                raise ready[1]
            return ready[1]
        return [self(records, indices) for indices in micro_indices]

    def prefetch(self, records, micro_indices: list[list[int]]) -> None:
        """Build a later step's micro-batches now, on the host while the device runs this step's queued work (the
        tokenizing, packing and copies then no longer leave it idle between steps). An error building them is
        raised when that step takes them, as if built then."""
        self.pending = {i for indices in micro_indices for i in indices if i not in self.cache}
        try:
            self.ready = (micro_indices, [self(records, indices) for indices in micro_indices])
        except Exception as e:  # noqa: BLE001 (re-raised by step)
            self.ready = (micro_indices, e)

    def tokenized(self) -> tuple[set[int], set[int]]:
        """(cut, tokenized) indices of the training records the steps taken so far trained on: a checkpoint's
        record flags and the notes leave out the prefetched step's (a run may end, or resume, before it)."""
        return self.cut - self.pending, set(self.cache) - self.pending


# what a cut keeps, for the notes that count cut records
CUT_RULE = ("a chat or completion keeps the tokens that end with its last answer, a text record its start, a dpo "
             "pair its answers' starts, with what the prompt leaves and at least half of --max-length, and the "
             "prompt's end")


def record_flags(make_batch: Batches, count: int, earlier: torch.Tensor | None, accelerator) -> torch.Tensor:
    """[cut by --max-length, tokenized] per training record (bool, 2 × count) over the whole run: this process's,
    the other processes' (one all-reduce: a record two processes tokenized, as a later epoch's order may hand it to
    the other, counts once) and, after --resume, those of the run before it (its checkpoint keeps them)."""
    flags = torch.zeros(2, count, dtype=torch.int32)
    cut, tokenized = make_batch.tokenized()
    flags[0, list(cut)] = 1
    flags[1, list(tokenized)] = 1
    if earlier is not None:
        flags |= earlier.to(torch.int32)
    return (accelerator.reduce(flags.to(accelerator.device), "sum") > 0).cpu()
