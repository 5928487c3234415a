"""Model families keyed by `model.name`, each with its builder and analytic counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from mmfm.config.schema import ModelConfig
from mmfm.models import counts
from mmfm.models.init import init_parameters
from mmfm.models.vlm import VisionLanguageModel


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_cls: Callable[[ModelConfig], nn.Module]
    num_params: Callable[[ModelConfig], int]
    training_flops: Callable[..., float]
    # Containers whose children are the repeated blocks: the units of FSDP sharding, activation
    # checkpointing and pipeline splitting.
    block_containers: tuple[str, ...] = ()


MODEL_REGISTRY: dict[str, ModelSpec] = {
    "vlm": ModelSpec("vlm", VisionLanguageModel, counts.num_params, counts.training_flops,
                     block_containers=("vision.blocks", "language.layers")),
}


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """Build on the meta device (no memory), then materialize on `device` and initialize from `seed`.

    Passing device="meta" returns the unmaterialized model, e.g. to count or shard a 100B+ layout.
    """
    spec = MODEL_REGISTRY[cfg.name]
    with torch.device("meta"):
        model = spec.model_cls(cfg)
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    init_parameters(model, seed)
    return model
