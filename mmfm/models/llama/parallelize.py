"""The llama family's parallel plans: tensor + sequence parallel (mmfm.parallel.tensor_parallel) and the
pipeline split (mmfm.parallel.pipeline_parallel)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInputOutput, RowwiseParallel, SequenceParallel,
                                               parallelize_module)

from mmfm.parallel.tensor_parallel import SumGradient, gather_sequence, local_input, scatter_sequence, sharded_sequence_in

# DecoderBlock and Attention take (x, ctx): only x is distributed.
BLOCK_ARGS = 2


def attention_plan() -> dict:
    """The pre-norm attention sub-block of a decoder block: q/k/v column-parallel, the output row-parallel into the
    sequence-parallel residual stream."""
    return {
        "attention_norm": SequenceParallel(),
        "attention": sharded_sequence_in(BLOCK_ARGS),
        "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
    }


def latent_attention_plan(attention: nn.Module) -> dict:
    """Multi-head latent attention: the down-projections to the latents (wq_a, wkv_a) and their norms run whole on
    every rank (plain weights, the same gradients on every peer); the up-projections out of the latents split by
    heads, as the output; the rotated key part all heads share has its gradient summed over the ranks."""
    queries = ({"attention.wq_a": local_input(), "attention.wq_b": ColwiseParallel()} if attention.q_latent
               else {"attention.wq": ColwiseParallel()})
    return {
        "attention_norm": SequenceParallel(),
        "attention": sharded_sequence_in(BLOCK_ARGS),
        **queries,
        "attention.wkv_a": local_input(), "attention.wkv_b": ColwiseParallel(),
        "attention.shared_key": SumGradient(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
    }


def experts_plan() -> dict:
    """A mixture-of-experts feed-forward runs whole on every tp rank: the sequence gathered in, the output cut back
    to this rank's slice. Its router and experts stay unsplit by tp (plain tensors, or split over ep), and the tp
    peers compute the same gradients for them."""
    return {"feed_forward": PrepareModuleInputOutput(
        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
        output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=True)}


def _block_plan(block: nn.Module) -> dict:
    plan = {
        **(latent_attention_plan(block.attention) if hasattr(block.attention, "wkv_a") else attention_plan()),
        "ffn_norm": SequenceParallel(),
        **(experts_plan() if hasattr(block.feed_forward, "router") else {
            "feed_forward": sharded_sequence_in(),
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1))}),
    }
    if getattr(block.attention, "k_norm", None) is not None:
        # q and k [B, T, heads, head_dim] arrive split by heads (dim 2); the norm weight is replicated, and its
        # gradient, a partial sum over each rank's heads, is all-reduced (DTensor does it)
        for norm in ("attention.q_norm", "attention.k_norm"):
            plan[norm] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def apply_tensor_parallel(lm: nn.Module, tp_mesh) -> None:
    """The embedding split by vocabulary (one all-reduce), the blocks Megatron-style with the residual
    stream split along the sequence, the logits left split over the vocabulary (`loss_parallel`). The q/k/v
    biases are split with their projections' outputs (ColwiseParallel), the q/k norms replicated."""
    if lm.tok_embeddings is not None:  # also on the last stage when tied: same vocabulary split
        parallelize_module(lm.tok_embeddings, tp_mesh,
                           RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    for block in lm.layers.values():
        parallelize_module(block, tp_mesh, _block_plan(block))
    if "0" in lm.layers:  # the embeddings (with the images spliced in) enter the sequence split here
        parallelize_module(lm.layers["0"], tp_mesh, scatter_sequence(BLOCK_ARGS))
    if lm.norm is not None:
        parallelize_module(lm.norm, tp_mesh, SequenceParallel())
        # full sequence, as a DTensor, so that the logits come out split over the vocabulary
        parallelize_module(lm.norm, tp_mesh, gather_sequence(use_local_output=False))
    if lm.output is not None:  # used as a weight only (F.linear): split its rows = the vocabulary
        parallelize_module(lm.output, tp_mesh, ColwiseParallel())


def keep_stage(lm: nn.Module, layers: list[int], first: bool, last: bool) -> None:
    """Drop the layers of other stages; the embedding lives on the first stage (and on the last when tied,
    for the output projection), the final norm and output on the last."""
    for name in list(lm.layers):
        if int(name) not in layers:
            del lm.layers[name]
    if not first and not (last and lm.output is None):
        lm.tok_embeddings = None
    if not last:
        lm.norm, lm.output = None, None


def tied_embedding(lm: nn.Module) -> Optional[torch.Tensor]:
    """The embedding weight this module holds when it doubles as the output projection."""
    if lm.output is None and lm.tok_embeddings is not None:
        return lm.tok_embeddings.weight
    return None
