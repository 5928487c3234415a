"""The vit family's tensor + sequence-parallel plan (pieces from mmfm.parallel.tensor_parallel)."""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

from mmfm.parallel.tensor_parallel import gather_sequence, scatter_sequence, sharded_sequence_in


def block_plan() -> dict:
    """One block, Megatron-style, its residual stream split along the sequence (also the clip family's)."""
    return {
        "norm1": SequenceParallel(),
        "attn": sharded_sequence_in(),
        "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
        "attn.proj": RowwiseParallel(output_layouts=Shard(1)),
        "norm2": SequenceParallel(),
        "mlp": sharded_sequence_in(),
        "mlp.fc1": ColwiseParallel(),
        "mlp.fc2": RowwiseParallel(output_layouts=Shard(1)),
    }


def apply_tensor_parallel(tower: nn.Module, tp_mesh) -> None:
    """Blocks Megatron-style with the patches split along the sequence; the output gathered whole."""
    blocks = tower.blocks
    for block in blocks.values():
        parallelize_module(block, tp_mesh, block_plan())
    parallelize_module(blocks[next(iter(blocks))], tp_mesh, scatter_sequence(1))
    parallelize_module(tower.norm, tp_mesh, SequenceParallel())
    parallelize_module(tower.norm, tp_mesh, gather_sequence(use_local_output=True))
