"""Building a model from its config: on the meta device, then materialized and initialized."""

from __future__ import annotations

import torch
from torch import nn

from mmfm.config.schema import ModelConfig
from mmfm.models.init import init_parameters
from mmfm.models.spec import model_spec


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """Build on the meta device (no memory), then materialize on `device` and initialize from `seed`.

    Passing device="meta" returns the unmaterialized model, e.g. to count or shard a 100B+ layout.
    """
    with torch.device("meta"):
        model = model_spec(cfg).build(cfg)
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    init_parameters(model, seed)
    return model
