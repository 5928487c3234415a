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
               reduce_dtype: Optional[torch.dtype] = torch.float32, reshard_after_forward: bool = True,
               experts: Optional[tuple] = None) -> nn.Module:
    """Shard every block of `containers` as its own unit, then the rest of the model as the root unit.

    A 2-D dp_mesh (dp_replicate, dp_shard) gives HSDP: sharded within dp_shard, replicated across
    dp_replicate. The root keeps its parameters gathered after forward (it runs backward first).

    experts: (mesh, divide factor) under expert parallelism. Each layer's experts (DTensors sharded over ep) are
    their own unit on the data-parallel ranks left after ep; their gradients already sum the tokens of every ep
    peer, so they are divided by the whole data-parallel size as the other parameters' are, not by that mesh's.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if experts is not None:
        from mmfm.parallel.expert_parallel import expert_modules

        expert_mesh, divide_factor = experts
        for unit in expert_modules(model):
            fully_shard(unit, mesh=expert_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
            unit.set_gradient_divide_factor(float(divide_factor))
            if expert_mesh.size(-1) > 1:  # sum, then divide: gloo has no pre-multiplied sum (one shard: no
                unit.set_force_sum_reduction_for_comms(True)  # reduce-scatter, and torch would divide twice)
    for unit in sharding_units(model, containers):
        fully_shard(unit, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
    return model
