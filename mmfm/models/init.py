"""Layout-independent initialization: every parameter is drawn from its own generator, seeded by the run's
seed and the parameter's name, as a full tensor; each rank then keeps only its own shard of it.

So a model initializes to the same values in one process and under any parallel layout (sharded,
split into pipeline stages, wrapped for activation checkpointing or compilation), and no rank ever holds
more than one full parameter at a time on top of its shards.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from mmfm.models.lora import init_adapter, is_adapter

# Name prefixes that wrappers insert and that are not part of a parameter's identity.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def parameter_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def copy_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the full tensor into a (possibly sharded) parameter."""
    if isinstance(param, DTensor):
        local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int) -> None:
    """Initialize every parameter of `model` (materialized, possibly sharded) by `model.init_parameter`
    rules (LoRA adapters by mmfm.models.lora's), then its buffers."""
    for name, param in model.named_parameters():
        name = canonical_name(name)
        # drawn in fp32 at least, so that a bf16 parameter (a LoRA base) is the fp32 draw rounded
        full = torch.empty(param.shape, dtype=torch.promote_types(param.dtype, torch.float32))
        generator = torch.Generator().manual_seed(parameter_seed(seed, name))
        if is_adapter(name):
            init_adapter(name, full, generator)
        else:
            model.init_parameter(name, full, generator)
        copy_shard(param, full)
    model.init_buffers()
