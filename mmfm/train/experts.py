"""After each optimizer step: the mixture-of-experts layers' balancing-bias update (from the tokens every expert
received on every rank) and their load figures for metrics.jsonl (docs/moe.md)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from mmfm.config.schema import LanguageConfig
from mmfm.models.init import canonical_name
from mmfm.models.moe import MoE, is_moe_layer
from mmfm.parallel.distributed import is_distributed


def expert_layers(parts: list[nn.Module]) -> dict[str, MoE]:
    """{layer id: module} of every mixture-of-experts layer this rank holds."""
    return {canonical_name(name).split(".layers.")[-1].split(".")[0]: module
            for part in parts for name, module in part.named_modules() if isinstance(module, MoE)}


def scale_aux_losses(parts: list[nn.Module], forwards: int) -> None:
    """Weigh each layer's auxiliary losses by 1 / forwards (the step's micro-batches): their mean over the step."""
    for module in expert_layers(parts).values():
        module.aux_scale = 1.0 / forwards


def expert_table(parts: list[nn.Module], lm: LanguageConfig) -> tuple[list[str], dict[str, MoE], torch.Tensor]:
    """Every mixture-of-experts layer of the model (this rank's or not), a row each: the tokens each expert
    received, the dropped tokens, the balance and z losses; zero in the rows of layers held elsewhere."""
    held = expert_layers(parts)
    ids = [str(i) for i in range(lm.num_layers) if is_moe_layer(lm, i)]
    device = next(iter(held.values())).tokens_per_expert.device if held else torch.device("cpu")
    table = torch.zeros(len(ids), lm.moe.num_experts + 3, dtype=torch.float64, device=device)
    for row, layer in enumerate(ids):
        if layer in held:
            m = held[layer]
            zero = m.dropped_tokens.new_zeros(())
            stats = torch.stack([m.dropped_tokens, m.stats.get("aux_loss", zero), m.stats.get("z_loss", zero)])
            table[row] = torch.cat([m.tokens_per_expert, stats.to(m.tokens_per_expert.dtype)]).double()
    return ids, held, table


class LoadWindow:
    """Each layer's tokens per expert summed over the steps since the last logged one: the balance that metrics.jsonl
    reports (one step's few thousand tokens are a noisy sample of it, above all with top-1 routing)."""

    def __init__(self):
        self.total: Optional[torch.Tensor] = None

    def add(self, loads: torch.Tensor) -> torch.Tensor:
        """Add one step's [layers, experts] counts; return the window's."""
        self.total = loads.clone() if self.total is None else self.total + loads
        return self.total

    def reset(self) -> None:
        self.total = None


def max_over_mean(loads: torch.Tensor) -> list[float]:
    """Per layer (row): the busiest expert's tokens over the mean expert's."""
    return (loads.max(1).values / loads.mean(1).clamp_min(1e-9)).tolist()


def expert_step(parts: list[nn.Module], lm: LanguageConfig, updated: bool, holders: int = 1,
                copies: int = 1, window: Optional[LoadWindow] = None, logged: bool = True) -> dict[str, float]:
    """Sum each layer's token counts over the ranks, update the balancing bias when the step was taken
    (`updated`), reset the counts; return the load figures ({} for a dense model): `moe_load_max_over_mean` over the
    steps since the last logged one (window; this step alone without it), `moe_step_load_max_over_mean` this step's.
    A logged step closes the window.

    One all-reduce over all ranks of a table with a row per layer, so that pipeline stages report the layers
    they hold: `holders` ranks hold each layer (the world / pp), of which `copies` (the tp peers) route the same
    tokens."""
    if not lm.moe.num_experts:
        return {}
    ids, held, table = expert_table(parts, lm)
    if is_distributed():
        dist.all_reduce(table)
    num_experts = lm.moe.num_experts
    loads, dropped = table[:, :num_experts] / copies, table[:, num_experts] / copies
    losses = table[:, num_experts + 1:] / holders
    for layer, load in zip(ids, loads):
        if layer in held:
            if updated:
                held[layer].update_expert_bias(load.to(held[layer].tokens_per_expert.dtype))
            held[layer].reset_counts()
    ratios = max_over_mean(window.add(loads) if window is not None else loads)
    if window is not None and logged:
        window.reset()
    metrics = {f"moe_load_max_over_mean/{layer}": ratio for layer, ratio in zip(ids, ratios)}
    aux, z = losses.mean(0).tolist()
    return {**metrics, "moe_load_max_over_mean": max(ratios), "moe_step_load_max_over_mean": max(max_over_mean(loads)),
            "moe_dropped_tokens": float(dropped.sum()), "moe_aux_loss": aux, "moe_z_loss": z}
