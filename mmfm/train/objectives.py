"""Training objectives. Each returns the summed loss and the number of tokens it was summed over, so the
loop can average over every token of an optimizer step, whatever the micro-batching."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfm.data.loader import IGNORE_INDEX


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over positions whose target is not IGNORE_INDEX (computed in fp32)."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


OBJECTIVES = {"pretrain": next_token_loss}
