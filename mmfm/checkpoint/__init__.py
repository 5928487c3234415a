"""Distributed checkpoints (torch.distributed.checkpoint) with atomic 'latest' and exact resume."""

from mmfm.checkpoint.manager import CheckpointError, CheckpointManager, find_checkpoint

__all__ = ["CheckpointError", "CheckpointManager", "find_checkpoint"]
