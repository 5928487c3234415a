"""The attention core, softmax(q k^T / sqrt(d)) v, as a module of its own so that parallelism and kernels
can replace it from outside (context parallelism swaps it for one that gathers keys and values)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class CoreAttention(nn.Module):
    """q [B, H, Tq, D], k and v [B, H, Tk, D] -> [B, H, Tq, D]; causal unless given a mask or built with
    causal=False. attn_mask is boolean, True where a query may attend to a key. document_ids [B, T]
    (packed sequences: contiguous runs of one id per document) keeps attention inside each document."""

    def __init__(self, causal: bool = True):
        super().__init__()
        self.causal = causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: Optional[torch.Tensor] = None, document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if document_ids is not None:
            if attn_mask is not None or q.shape[2] != k.shape[2]:
                raise ValueError("document_ids cannot be combined with an attention mask or a KV cache")
            attn_mask = document_mask(document_ids, self.causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.causal and attn_mask is None)


def document_mask(document_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Boolean [B, 1, T, T]: True where a query may attend to a key of its own document (not a later one)."""
    mask = document_ids[:, :, None] == document_ids[:, None, :]
    if causal:
        t = document_ids.shape[1]
        mask = mask & torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
    return mask[:, None]
