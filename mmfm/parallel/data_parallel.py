"""FSDP2 (`fully_shard`) and HSDP applied to a model from outside, unit by unit, as its spec lists."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def sharding_units(model: nn.Module, containers: tuple[str, ...]) -> list[nn.Module]:
    """The blocks inside each named container (e.g. 'language.layers'): one FSDP unit each. A pipeline
    stage may lack a container (no vision tower after the first stage)."""
    units = []
    for path in containers:
        try:
            units += list(model.get_submodule(path).children())
        except AttributeError:
            continue
    return units


def apply_fsdp(model: nn.Module, dp_mesh, containers: tuple[str, ...], param_dtype: Optional[torch.dtype] = None,
               reduce_dtype: Optional[torch.dtype] = torch.float32, reshard_after_forward: bool = True) -> nn.Module:
    """Shard every block of `containers` as its own unit, then the rest of the model as the root unit.

    A 2-D dp_mesh (dp_replicate, dp_shard) gives HSDP: sharded within dp_shard, replicated across
    dp_replicate. The root keeps its parameters gathered after forward (it runs backward first).
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for unit in sharding_units(model, containers):
        fully_shard(unit, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
    return model
