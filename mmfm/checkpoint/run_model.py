"""A training run's model in one process, as its checkpoint describes it: the whole checkpoint for a full run;
for a LoRA run (model.lora.enabled: its checkpoints hold the adapters alone) the base model rebuilt as training
built it (the seeded initialization, model.pretrained's weights, stage.init_from's) with the adapters loaded onto
it. Used by `mmfm export`, `mmfm generate`, `mmfm data reference-logps` and evaluation of split models."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmfm.checkpoint.manager import CheckpointManager, find_checkpoint
from mmfm.config.schema import JobConfig
from mmfm.models import build_model
from mmfm.models.init import init_parameters
from mmfm.models.lora import apply_lora, is_adapter


def is_base(name: str) -> bool:
    return not is_adapter(name)


def load_base(model: nn.Module, cfg: JobConfig, no_dist: bool = False) -> None:
    """Into a LoRA model (materialized, initialized): stage.init_from's weights, its adapters left as they are."""
    if cfg.stage.init_from:
        CheckpointManager.load(find_checkpoint(Path(cfg.stage.init_from))[1], model, no_dist=no_dist, select=is_base)


def load_run_model(cfg: JobConfig, checkpoint: Path, device: str | torch.device = "cpu",
                   no_dist: bool = False) -> nn.Module:
    """The run's whole model on `device` with the checkpoint's weights (a LoRA run's: the base, adapters on it)."""
    if not cfg.model.lora.enabled:
        model = build_model(cfg.model, device)
        CheckpointManager.load(checkpoint, model, no_dist=no_dist)
        return model
    from mmfm.checkpoint.hf_vlm import load_pretrained

    model = build_model(cfg.model, "meta")
    apply_lora(model, cfg.model.lora)
    model.to_empty(device=device)
    init_parameters(model, cfg.seed)
    load_pretrained(model, cfg.model)
    load_base(model, cfg, no_dist)
    CheckpointManager.load(checkpoint, model, no_dist=no_dist, select=is_adapter)
    return model
