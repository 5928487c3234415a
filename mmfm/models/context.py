"""What a decoder block needs per call besides its input: one object, so that wrappers (tensor and context
parallelism, activation checkpointing, compile) pass it along without knowing its fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class BlockContext:
    """cos/sin: rotary tables, [T, D/2] for positions 0..T-1 of every row or [B, T, D/2] per position (None: a
    family without rotary embeddings).
    attn_mask: boolean [B, 1, T, S], True where a query may attend (None: causal). cache: a KV cache for
    incremental decoding. document_ids: [B, T] packed documents, which never attend to each other."""

    cos: Optional[torch.Tensor] = None
    sin: Optional[torch.Tensor] = None
    attn_mask: Optional[torch.Tensor] = None
    cache: Optional[object] = None
    document_ids: Optional[torch.Tensor] = None

    def rotary_rows(self, start: int, length: int) -> "BlockContext":
        """The same context with the rotary tables of sequence positions [start, start + length) only."""
        if self.cos is None:
            return self
        if self.cos.dim() == 2:
            cos, sin = self.cos[start:start + length], self.sin[start:start + length]
        else:
            cos, sin = self.cos[:, start:start + length], self.sin[:, start:start + length]
        return dataclasses.replace(self, cos=cos, sin=sin)
