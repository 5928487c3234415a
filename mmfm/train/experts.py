"""After each optimizer step: the mixture-of-experts layers' balancing-bias update (from the tokens every expert
received on every data-parallel rank) and their load figures for metrics.jsonl (docs/moe.md)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mmfm.models.init import canonical_name
from mmfm.models.moe import MoE
from mmfm.parallel.distributed import is_distributed


def expert_layers(parts: list[nn.Module]) -> list[tuple[str, MoE]]:
    """(layer id, module) of every mixture-of-experts layer this rank holds."""
    return [(canonical_name(name).split(".layers.")[-1].split(".")[0], module)
            for part in parts for name, module in part.named_modules() if isinstance(module, MoE)]


def scale_aux_losses(parts: list[nn.Module], micro_batches: int) -> None:
    """Weigh each layer's auxiliary losses by 1 / micro_batches: their mean over a step's micro-batches."""
    for _, module in expert_layers(parts):
        module.aux_scale = 1.0 / micro_batches


def expert_step(parts: list[nn.Module], updated: bool) -> dict[str, float]:
    """Sum each layer's token counts (and dropped tokens) over the ranks, update the balancing bias when the step
    was taken (`updated`), reset the counts; return the step's load figures ({} for a dense model). Under data
    parallelism only (tensor, pipeline and context parallelism are refused with experts), so every rank holds
    every layer and the sum is over data-parallel ranks."""
    layers = expert_layers(parts)
    if not layers:
        return {}
    counts = torch.stack([torch.cat([m.tokens_per_expert, m.dropped_tokens.view(1)]) for _, m in layers])
    if is_distributed():
        dist.all_reduce(counts)
    metrics: dict[str, float] = {}
    for (layer, module), row in zip(layers, counts):
        load, dropped = row[:-1], row[-1]
        metrics[f"moe_load_max_over_mean/{layer}"] = float(load.max() / load.mean().clamp_min(1e-9))
        metrics["moe_dropped_tokens"] = metrics.get("moe_dropped_tokens", 0.0) + float(dropped)
        if updated:
            module.update_expert_bias(load)
        module.reset_counts()
    metrics["moe_load_max_over_mean"] = max(v for k, v in metrics.items() if k.startswith("moe_load_max_over_mean/"))
    metrics["moe_aux_loss"] = float(sum(m.stats.get("aux_loss", 0.0) for _, m in layers)) / len(layers)
    metrics["moe_z_loss"] = float(sum(m.stats.get("z_loss", 0.0) for _, m in layers)) / len(layers)
    return metrics
