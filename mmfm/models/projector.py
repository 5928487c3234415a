"""LLaVA-1.5 style two-layer MLP that maps vision features to the language model's width."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class MLPProjector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, text_dim)
        self.fc2 = nn.Linear(text_dim, text_dim)

    def init_weights(self, std: float) -> None:
        for lin in (self.fc1, self.fc2):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))
