"""A language-only model: the language part chosen by model.language.kind, over token ids."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mmfm.config.schema import ModelConfig
from mmfm.models.spec import part_spec


class CausalLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.language = part_spec(cfg, "language").build(cfg)
        self.first_stage = True  # a later pipeline stage takes hidden states, not token ids

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """Initialize the full tensor of parameter `name` (e.g. 'language.layers.0.attention.wq.weight')."""
        self.language.init_parameter(name.split(".", 1)[1], tensor, generator, self.cfg.init_std)

    def init_buffers(self) -> None:
        self.language.init_buffers()

    def forward(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, cache=None, document_ids: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, T, V], or with targets the summed next-token loss (the language part's forward)."""
        h = self.language.embed(input_ids) if self.first_stage else input_ids
        return self.language(h, positions, attn_mask, cache, document_ids, targets)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        return self.language.new_cache(batch, max_len, dtype, device)
