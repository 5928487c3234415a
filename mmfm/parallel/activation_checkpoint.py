"""Activation checkpointing applied from outside: recompute a block's activations in backward instead
of keeping them. `full` wraps every block, `selective` every k-th (k = train.activation_checkpoint_every)."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

MODES = ("none", "full", "selective")


def apply_activation_checkpointing(model: nn.Module, containers: tuple[str, ...], mode: str, every: int = 2) -> int:
    """Wrap the chosen blocks of each container in place; return how many were wrapped.

    Checkpoint keys are unchanged: torch.distributed.checkpoint strips the wrapper's name prefix.
    """
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is unknown; use one of {MODES}")
    wrapped = 0
    for path in containers if mode != "none" else ():
        container = model.get_submodule(path)
        for index, (name, block) in enumerate(list(container.named_children())):
            if mode == "full" or index % every == 0:
                container.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False))
                wrapped += 1
    return wrapped
