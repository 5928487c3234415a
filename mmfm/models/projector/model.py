"""mlp2x_gelu: the LLaVA-1.5 two-layer MLP that maps vision features to the language model's width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLPProjector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, text_dim)
        self.fc2 = nn.Linear(text_dim, text_dim)

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator, std: float) -> None:
        if name.endswith("bias"):
            nn.init.zeros_(tensor)
        else:
            nn.init.normal_(tensor, std=std, generator=generator)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))
