"""Step time of a layout: compute at peak x achievable, the pipeline bubble, and the communication left exposed
(docs/planning.md). Bandwidths are per device and direction; a collective over n ranks moves, per rank, on a ring:
all-gather and reduce-scatter (n - 1) / n of the full buffer, all-reduce twice that (Patarasuk & Yuan 2009).
"""

from __future__ import annotations

from mmfm.config.schema import HardwareConfig

WIRE_FACTOR = {"all_gather": 1.0, "reduce_scatter": 1.0, "all_reduce": 2.0}


def ring_bytes(kind: str, payload: float, ranks: int) -> float:
    """Bytes one rank sends for a ring collective whose full buffer is `payload` bytes."""
    return 0.0 if ranks <= 1 else WIRE_FACTOR[kind] * payload * (ranks - 1) / ranks


def compute_seconds(flops: float, hw: HardwareConfig) -> float:
    """FLOPs at the bf16 dense peak times the achievable fraction."""
    return flops / (hw.peak_bf16_flops * hw.achievable)


def bubble_fraction(pp: int, microbatches: int, virtual: int = 1) -> float:
    """Idle share of a pipelined step: (pp - 1) / (v m + pp - 1) (GPipe and 1F1B: v = 1; interleaved: v stages per
    rank, Narayanan et al. 2021). The zero-bubble schedule is counted as interleaved (an upper bound)."""
    return 0.0 if pp == 1 else (pp - 1) / (virtual * microbatches + pp - 1)


def recompute_factor(checkpoint: str) -> float:
    """Full activation checkpointing runs each block's forward again in backward: (1 + 1 + 2) / (1 + 2) = 4/3 of the
    blocks' training FLOPs (forward 1/3, backward 2/3)."""
    return 4 / 3 if checkpoint == "full" else 1.0


def fsdp_step_bytes(block_total: int, root: int, microbatches: int, reshard_after_forward: bool = True) -> dict:
    """Full buffers FSDP2 moves per rank and step (mmfm.parallel.comm.fsdp_expected_bytes): all-gather in bf16 each
    block twice per micro-batch (forward, and again in backward after resharding) and the root once; reduce-scatter
    every gradient once per step in fp32. Elements are the rank's tp-local ones."""
    gathers = 2 if reshard_after_forward else 1
    return {"all_gather": microbatches * (gathers * block_total + root) * 2, "reduce_scatter": (block_total + root) * 4}


def exposed_overlapped(comm_seconds: float, compute_seconds_: float, first_and_last: float) -> float:
    """A collective that overlaps with compute (FSDP's prefetched all-gathers and its reduce-scatters run on their
    own streams) costs only what exceeds the compute plus what cannot overlap: the first block's gather before
    any compute and the last block's reduce-scatter after it."""
    return max(0.0, comm_seconds - compute_seconds_) + first_and_last
