"""The ops of model code that kernels replace from outside (mmfm.kernels.apply swaps these classes): every
family builds its blocks from them, so a kernel serves every family without naming its attributes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def rotary_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """The [head_dim // 2] inverse frequencies theta^(-2i / head_dim) of rotary embeddings."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def rotary_tables(head_dim: int, max_len: int, theta: float, device=None,
                  inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [max_len, head_dim // 2] for rotate-half rotary embeddings; inv_freq: rescaled
    frequencies (e.g. Llama 3.1's) instead of rotary_frequencies(head_dim, theta)."""
    if inv_freq is None:
        inv_freq = rotary_frequencies(head_dim, theta, device)
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by per-position angles cos/sin: [B, T, D/2], or [T, D/2] for every row."""
    x1, x2 = x.float().chunk(2, dim=-1)
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class Rotary(nn.Module):
    """Rotary embeddings of q and k."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class SiluMul(nn.Module):
    """The SwiGLU gate: silu(gate) * up."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up


class LinearCrossEntropy(nn.Module):
    """Summed next-token cross-entropy of the output projection (fp32, ignore_index positions skipped)."""

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=self.ignore_index,
                               reduction="sum")
