"""Tensor parallelism with sequence parallelism (Megatron-style), applied to the plain model from outside.

In every decoder block and every ViT block, q/k/v and the MLP's first projections are split by output
(column-wise, i.e. by heads and by FFN columns), the attention output and the MLP's last projection by
input (row-wise); between them the residual stream and the norms are split along the sequence
(sequence parallel), so activations outside attention and MLP are 1/tp per rank. Entering attention or
the MLP all-gathers the sequence; leaving it reduce-scatters.

The token embedding is split by vocabulary (each rank looks up its rows, one all-reduce), and the
output projection too, so the logits stay split over the vocabulary: the loss is computed on them
without gathering (`loss_parallel`). The vision tower's output is gathered for the projector.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

# DecoderBlock and Attention take (x, cos, sin, attn_mask, cache, layer, document_ids): only x is distributed.
_DECODER_ARGS = 7


def _sharded_sequence_in(num_args: int = 1) -> PrepareModuleInput:
    """Gather the sequence into attention / the MLP. The gathered input stays a DTensor, so that the
    column-parallel projections' input gradients add up as one partial sum and leave backward in one
    reduce-scatter (a local tensor would cost an all-reduce per projection)."""
    rest = (None,) * (num_args - 1)
    return PrepareModuleInput(input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest))


def _decoder_block_plan() -> dict:
    return {
        "attention_norm": SequenceParallel(),
        "attention": _sharded_sequence_in(_DECODER_ARGS),
        "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": _sharded_sequence_in(),
        "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
    }


def _vision_block_plan() -> dict:
    return {
        "norm1": SequenceParallel(),
        "attn": _sharded_sequence_in(),
        "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
        "attn.proj": RowwiseParallel(output_layouts=Shard(1)),
        "norm2": SequenceParallel(),
        "mlp": _sharded_sequence_in(),
        "mlp.fc1": ColwiseParallel(),
        "mlp.fc2": RowwiseParallel(output_layouts=Shard(1)),
    }


def _scatter_sequence(num_args: int) -> PrepareModuleInput:
    """Full-sequence input (computed on every rank) -> this rank's slice of the sequence."""
    rest = (None,) * (num_args - 1)
    return PrepareModuleInput(input_layouts=(Replicate(), *rest), desired_input_layouts=(Shard(1), *rest),
                              use_local_output=True)


def _gather_sequence(use_local_output: bool) -> PrepareModuleOutput:
    return PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate(),
                               use_local_output=use_local_output)


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> nn.Module:
    """Parallelize whichever parts of the vision-language model this module holds (a pipeline stage may
    hold only some decoder layers) over the 1-D `tp_mesh`."""
    if getattr(model, "vision", None) is not None:
        blocks = model.vision.blocks
        for name, block in blocks.items():
            parallelize_module(block, tp_mesh, _vision_block_plan())
        parallelize_module(blocks[next(iter(blocks))], tp_mesh, _scatter_sequence(1))
        parallelize_module(model.vision.norm, tp_mesh, SequenceParallel())
        parallelize_module(model.vision.norm, tp_mesh, _gather_sequence(use_local_output=True))
        # the projector as a Megatron MLP: columns, then rows with one all-reduce of its output
        parallelize_module(model.projector, tp_mesh, {"fc1": ColwiseParallel(),
                                                      "fc2": RowwiseParallel(output_layouts=Replicate())})
    lm = model.language
    if lm.tok_embeddings is not None:  # also on the last stage when tied: same vocabulary split
        parallelize_module(lm.tok_embeddings, tp_mesh,
                           RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    for name, block in lm.layers.items():
        parallelize_module(block, tp_mesh, _decoder_block_plan())
    if "0" in lm.layers:  # the embeddings (with the images spliced in) enter the sequence split here
        parallelize_module(lm.layers["0"], tp_mesh, _scatter_sequence(_DECODER_ARGS))
    if lm.norm is not None:
        parallelize_module(lm.norm, tp_mesh, SequenceParallel())
        # full sequence, as a DTensor, so that the logits come out split over the vocabulary
        parallelize_module(lm.norm, tp_mesh, _gather_sequence(use_local_output=False))
    if lm.output is not None:  # used as a weight only (F.linear): split its rows = the vocabulary
        parallelize_module(lm.output, tp_mesh, ColwiseParallel())
    return model


def loss_context(tp: int):
    """Cross-entropy on vocabulary-split logits without gathering them (when tp > 1)."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()
