"""The clip family's tensor-parallel plan (pieces from mmfm.parallel.tensor_parallel).

Every block is Megatron-style: q/k/v and fc1 split by output (heads, MLP columns), the attention output
projection and fc2 by input. Between them the residual stream is split along the sequence (sequence
parallel, as in the vit family) when tp divides the positions; the real towers' positions rarely allow it
(CLIP-L/14 at 336 px: 576 patches + the class token = 577, a prime; SigLIP at 384 px: 27^2 = 729, odd), so
otherwise the residual stream and the norms stay whole on every rank and each block ends in two all-reduces.
The embeddings run whole on every rank; the tower's output is whole on every rank (for the projector).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from mmfm.models.clip.model import num_positions
from mmfm.models.vit.parallelize import block_plan
from mmfm.parallel.tensor_parallel import gather_sequence, scatter_sequence


def replicated_block_plan() -> dict:
    """One block with its input, output and norms whole on every rank."""
    return {"attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.proj": RowwiseParallel(), "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()}


def sequence_parallel(tower: nn.Module, tp_mesh) -> bool:
    """Whether the plan splits the sequence: when tp divides the positions the layers run on."""
    return num_positions(tower.cfg) % tp_mesh.size() == 0


def apply_tensor_parallel(tower: nn.Module, tp_mesh) -> None:
    blocks = list(tower.blocks.values())
    if not sequence_parallel(tower, tp_mesh):
        for block in blocks:
            parallelize_module(block, tp_mesh, replicated_block_plan())
        return
    for block in blocks:
        parallelize_module(block, tp_mesh, block_plan())
    parallelize_module(blocks[0], tp_mesh, scatter_sequence(1))
    parallelize_module(blocks[-1], tp_mesh, gather_sequence(use_local_output=True))
