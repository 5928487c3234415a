"""The gpt family's parallel plans: tensor + sequence parallel (Megatron-style, as the vit blocks) and the pipeline
split (the llama family's, plus the position embeddings on the first stage)."""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

from mmfm.models.llama.parallelize import BLOCK_ARGS, attention_plan, keep_stage as keep_llama_stage
from mmfm.parallel.tensor_parallel import gather_sequence, scatter_sequence, sharded_sequence_in

BLOCK_PLAN = {
    **attention_plan(),
    "ffn_norm": SequenceParallel(),
    "feed_forward": sharded_sequence_in(),
    "feed_forward.fc1": ColwiseParallel(),
    "feed_forward.fc2": RowwiseParallel(output_layouts=Shard(1)),
}


def apply_tensor_parallel(lm: nn.Module, tp_mesh) -> None:
    """The token embedding split by vocabulary, the position embeddings replicated, the blocks Megatron-style
    (biases split with column-parallel outputs, replicated after row-parallel ones) with the residual stream and
    the LayerNorms split along the sequence, the logits left split over the vocabulary (`loss_parallel`)."""
    if lm.tok_embeddings is not None:
        parallelize_module(lm.tok_embeddings, tp_mesh,
                           RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    for block in lm.layers.values():
        parallelize_module(block, tp_mesh, BLOCK_PLAN)
    if "0" in lm.layers:  # the embeddings (positions added) enter the sequence split here
        parallelize_module(lm.layers["0"], tp_mesh, scatter_sequence(BLOCK_ARGS))
    if lm.norm is not None:
        parallelize_module(lm.norm, tp_mesh, SequenceParallel())
        parallelize_module(lm.norm, tp_mesh, gather_sequence(use_local_output=False))
    if lm.output is not None:
        parallelize_module(lm.output, tp_mesh, ColwiseParallel())


def keep_stage(lm: nn.Module, layers: list[int], first: bool, last: bool) -> None:
    """As the llama family's; the position embeddings stay on the first stage only."""
    keep_llama_stage(lm, layers, first, last)
    if not first:
        lm.pos_embeddings = None
