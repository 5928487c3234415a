"""Sequence packing: several encoded samples (documents) per batch row, every row exactly seq_len long.

Format of a packed Batch (see mmfm.data.loader.Batch):
  input_ids/targets  each row is its samples' input_ids/targets concatenated, right-padded with pad_id /
                     IGNORE_INDEX. A sample's last target is already IGNORE_INDEX, so no target crosses a
                     document boundary (checked).
  document_ids       0, 1, 2, ... per sample within the row, -1 on padding (a document of its own).
  positions          0..len-1 restarting at each sample, 0 on padding.
  pixel_values       all images in reading order (row by row, sample by sample), or None.
  images_per_sample  images per ROW (the trainer and pixel_rows treat an entry as one batch row).
  captions/keys      one entry per sample, in order.

PackedBatchLoader fills `rows` rows greedily in stream order; the sample that does not fit any more is
held back ("pending") and opens the next batch. Resume: the loader keeps the stream's state from just
before it read the pending sample, and state_dict() returns that state. Loading it into a fresh stream
re-reads the pending sample first and then everything after it, so the fresh loader's batches are
exactly those the uninterrupted loader would have produced.
"""

from __future__ import annotations

import copy
from typing import Iterator, Optional

import torch

from mmfm.data.loader import IGNORE_INDEX, Batch, EncodedSample


def _check_row(row: list[EncodedSample], seq_len: int) -> None:
    for s in row:
        if not s.input_ids or len(s.targets) != len(s.input_ids):
            raise ValueError(f"sample {s.key}: {len(s.input_ids)} input ids but {len(s.targets)} targets")
        if s.targets[-1] != IGNORE_INDEX:  # else its last target would point into the next document
            raise ValueError(f"sample {s.key}: the last target must be IGNORE_INDEX, got {s.targets[-1]}")
    total = sum(len(s.input_ids) for s in row)
    if total > seq_len:
        raise ValueError(f"row of {total} tokens ({[s.key for s in row]}) does not fit in seq_len={seq_len}")


def pack(samples: list[list[EncodedSample]], seq_len: int, pad_id: int) -> Batch:
    """One batch row per inner list, its samples concatenated and right-padded to seq_len."""
    shape = (len(samples), seq_len)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    docs = torch.full(shape, -1, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(samples):
        _check_row(row, seq_len)
        start = 0
        for d, s in enumerate(row):
            end = start + len(s.input_ids)
            ids[r, start:end] = torch.tensor(s.input_ids)
            targets[r, start:end] = torch.tensor(s.targets)
            docs[r, start:end] = d
            positions[r, start:end] = torch.arange(end - start)
            start = end
    flat = [s for row in samples for s in row]
    images = [img for s in flat for img in s.images]
    return Batch(ids, targets, torch.stack(images) if images else None,
                 [sum(len(s.images) for s in row) for row in samples], [s.caption for s in flat],
                 [s.key for s in flat], document_ids=docs, positions=positions)


class PackedBatchLoader:
    """Packed batches of `rows` rows x `seq_len` positions from a sample stream; resumable through state_dict().

    The stream is a SampleStream (or any iterator of EncodedSample; without state_dict it cannot resume).
    After each batch: `tokens_per_row` (non-pad positions per row) and `fill` (their mean fraction).
    """

    def __init__(self, stream, rows: int, seq_len: int, pad_id: int):
        if rows < 1 or seq_len < 1:
            raise ValueError(f"need rows >= 1 and seq_len >= 1, got {rows} and {seq_len}")
        self.stream, self.rows, self.seq_len, self.pad_id = stream, rows, seq_len, pad_id
        self._pending: Optional[tuple[EncodedSample, Optional[dict]]] = None  # (sample, stream state before it)
        self.tokens_per_row: list[int] = []
        self.fill = 0.0

    def state_dict(self) -> dict:
        if self._pending is not None:
            return copy.deepcopy(self._pending[1])
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
        self._pending = None

    def _take(self) -> Optional[tuple[EncodedSample, Optional[dict]]]:
        """The next sample with the stream state from before it; None at the end of a finite stream."""
        if self._pending is not None:
            item, self._pending = self._pending, None
            return item
        state = self.stream.state_dict() if hasattr(self.stream, "state_dict") else None
        sample = next(self.stream, None)
        return None if sample is None else (sample, state)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        rows: list[list[EncodedSample]] = []
        used = 0  # tokens in the last row
        while (item := self._take()) is not None:
            n = len(item[0].input_ids)
            if n > self.seq_len:
                raise ValueError(f"sample {item[0].key} has {n} tokens > seq_len={self.seq_len}")
            if rows and used + n <= self.seq_len:
                rows[-1].append(item[0])
                used += n
            elif len(rows) < self.rows:
                rows.append([item[0]])
                used = n
            else:  # batch full: the sample opens the next one
                self._pending = item
                break
        if not rows:
            raise StopIteration
        self.tokens_per_row = [sum(len(s.input_ids) for s in row) for row in rows]
        self.fill = sum(self.tokens_per_row) / (len(rows) * self.seq_len)
        return pack(rows, self.seq_len, self.pad_id)
