"""Gradient-norm clipping over parameters sharded any way: plain tensors, DTensors on different meshes
(FSDP-only, FSDP x TP, TP-only), and pipeline stages on other ranks."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _is_expert_shard(g: torch.Tensor) -> bool:
    return (isinstance(g, DTensor) and "ep" in (g.device_mesh.mesh_dim_names or ())
            and not any(p.is_replicate() or p.is_partial() for p in g.placements))  # Shard or FSDP's _StridedShard


def _expert_squared_norm(grads: list[DTensor]) -> torch.Tensor:
    """The experts' gradients (sharded over every dim of their mesh): local sums of squares, summed over each mesh
    dim. DTensor's own reduction would flatten the mesh, which torch cannot do for (efsdp x cp, ep)."""
    mesh = grads[0].device_mesh
    local = sum(g.to_local().double().pow(2).sum() for g in grads)
    for dim in range(mesh.ndim):
        dist.all_reduce(local, group=mesh.get_group(dim))
    return local


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Squared 2-norm of the full (unsharded) gradients: one collective per DTensor mesh."""
    by_mesh: dict = defaultdict(list)
    experts: dict = defaultdict(list)
    for g in grads:
        if _is_expert_shard(g):
            experts[g.device_mesh].append(g)
        else:
            by_mesh[g.device_mesh if isinstance(g, DTensor) else None].append(g)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for mesh in sorted(experts, key=lambda m: m.mesh_dim_names):
        total += _expert_squared_norm(experts[mesh])
    for mesh in sorted(by_mesh, key=lambda m: () if m is None else m.mesh_dim_names):
        norm = torch.nn.utils.get_total_norm(by_mesh[mesh], 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total += norm.double() ** 2
    return total


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, pp_group: Optional[dist.ProcessGroup] = None,
                   exclude: Iterable[torch.Tensor] = ()) -> float:
    """Clip in place to `max_norm` (inf: measure only); return the total norm before clipping.

    `exclude`: parameters counted elsewhere (the last stage's copy of a tied embedding). Each pipeline
    stage adds its squared norm over `pp_group`.
    """
    params = [p for p in params if p.grad is not None]
    for p in params:  # e.g. sequence-parallel norm weights: partial sums, reduced once here
        if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
            p.grad = p.grad.redistribute(placements=p.placements)
    skip = {id(p) for p in exclude}
    device = params[0].grad.device if params else torch.device("cpu")
    squared = _squared_norm([p.grad for p in params if id(p) not in skip], device)
    if pp_group is not None:
        dist.all_reduce(squared, group=pp_group)
    total = squared.sqrt()
    if max_norm != float("inf"):
        coef = min(1.0, max_norm / (total.item() + 1e-6))  # the formula of torch.nn.utils.clip_grad_norm_
        for p in params:
            (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(coef)
    return total.item()
