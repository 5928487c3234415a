"""The attention core, softmax(q k^T / sqrt(d)) v, as a module of its own so that parallelism and kernels
can replace it from outside (context parallelism swaps it for one that gathers keys and values)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class CoreAttention(nn.Module):
    """q [B, H, Tq, D], k and v [B, H, Tk, D] -> [B, H, Tq, D]; causal unless given a mask or built with
    causal=False. attn_mask is boolean, True where a query may attend to a key."""

    def __init__(self, causal: bool = True):
        super().__init__()
        self.causal = causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.causal and attn_mask is None)
