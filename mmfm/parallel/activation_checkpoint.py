"""Activation checkpointing applied from outside: recompute a block's activations in backward instead
of keeping them.

- `full`: every block;
- `selective`: every k-th block (k = train.activation_checkpoint_every);
- `op`: every block, but the outputs of matrix multiplications and attention are kept and only the
  cheap ops between them (norms, activations, rotary, residual adds) are recomputed: most of full
  checkpointing's memory saving on the elementwise activations for a small share of its recompute.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective", "op")

# Ops whose outputs `op` mode keeps: the expensive ones.
SAVED_OPS = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _keep_expensive_ops(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _wrap(block: nn.Module, mode: str) -> nn.Module:
    if mode == "op":
        context = functools.partial(create_selective_checkpoint_contexts, _keep_expensive_ops)
        return checkpoint_wrapper(block, preserve_rng_state=False, context_fn=context)
    return checkpoint_wrapper(block, preserve_rng_state=False)


def apply_activation_checkpointing(model: nn.Module, containers: tuple[str, ...], mode: str, every: int = 2) -> int:
    """Wrap the chosen blocks of each container in place; return how many were wrapped.

    Checkpoint keys are unchanged: torch.distributed.checkpoint strips the wrapper's name prefix. A
    pipeline stage may lack a container (no vision tower after the first stage).
    """
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is unknown; use one of {MODES}")
    wrapped = 0
    for path in containers if mode != "none" else ():
        try:
            container = model.get_submodule(path)
        except AttributeError:
            continue
        for index, (name, block) in enumerate(list(container.named_children())):
            if mode != "selective" or index % every == 0:
                container.register_module(name, _wrap(block, mode))
                wrapped += 1
    return wrapped
