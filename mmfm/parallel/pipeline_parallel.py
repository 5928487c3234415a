"""Pipeline parallelism with torch.distributed.pipelining, applied to the plain model from outside.

The model is split into stages by a contiguous assignment of decoder layers; the model's spec says what
else each stage holds (for the VLM: the vision tower, the projector and the token embedding on the first
stage, the final norm and output projection on the last). Each stage is a copy of the model with the parts of other stages removed, so parameter names
(and so checkpoints) are those of the whole model. With tied embeddings the last stage keeps its own
copy of the embedding matrix for the output projection; the two copies receive the sum of both
gradients (one all-reduce between first and last stage per step), so they stay identical.

A rank holds `pp_virtual_stages` stages, placed round-robin ("loop" placement): rank r holds stages
r, r + pp, r + 2 pp, ... Each loader batch is split into parallel.pp_microbatches micro-batches; those of
a step's train.grad_accum_steps loader batches flow through the schedule chosen by parallel.pp_schedule.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

from mmfm.config.schema import ModelConfig
from mmfm.models import model_spec

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
             "zero_bubble": ScheduleInterleavedZeroBubble}
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "zero_bubble")


def balanced_layers(costs: list[float], first: float, last: float, num_stages: int) -> list[int]:
    """Layers per stage (contiguous, each >= 1) minimizing the most expensive stage."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, lo: int, hi: int) -> float:
        return prefix[hi] - prefix[lo] + (first if stage == 0 else 0.0) + (last if stage == num_stages - 1 else 0.0)

    # best[s][i]: (max cost, split) of stages 0..s-1 covering layers [0, i)
    best = {(0, 0): (0.0, [])}
    for s in range(num_stages):
        for i in range(s, n - (num_stages - s) + 1):
            if (s, i) not in best:
                continue
            worst, split = best[(s, i)]
            for j in range(i + 1, n - (num_stages - s - 1) + 1):
                cand = (max(worst, cost(s, i, j)), split + [j - i])
                if (s + 1, j) not in best or cand[0] < best[(s + 1, j)][0]:
                    best[(s + 1, j)] = cand
    return best[(num_stages, n)][1]


def layer_assignment(cfg: ModelConfig, seq_len: int, num_stages: int,
                     override: Optional[list[int]] = None) -> list[list[int]]:
    """Decoder layer indices of each stage: `override` (layers per stage, checked by ParallelDims) or
    balanced by cost."""
    sizes = list(override) if override else balanced_layers(*model_spec(cfg).stage_costs(cfg, seq_len), num_stages)
    starts = [sum(sizes[:i]) for i in range(num_stages)]
    return [list(range(s, s + k)) for s, k in zip(starts, sizes)]


def stage_indices(pp_rank: int, pp: int, virtual: int) -> list[int]:
    return [pp_rank + k * pp for k in range(virtual)]


def split_stage(model: nn.Module, stage: int, num_stages: int, layers: list[int]) -> nn.Module:
    """A copy of the (meta) model holding only what `stage` computes."""
    part = copy.deepcopy(model)
    model_spec(part.cfg).split_stage(part, stage == 0, stage == num_stages - 1, layers)
    return part


def build_schedule(name: str, stages: list[PipelineStage], microbatches: int, loss_fn):
    cls = SCHEDULES[name]
    if name in MULTI_STAGE_SCHEDULES:
        return cls(stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)


def tied_embedding_groups(mesh, pp: int) -> Optional[dist.ProcessGroup]:
    """This rank's group {first stage, last stage} with the same coordinates on the other mesh dims.

    Collective: every rank creates every group, in the same order.
    """
    ranks = mesh.mesh.transpose(0, mesh.mesh_dim_names.index("pp")).reshape(pp, -1)
    mine = None
    for column in range(ranks.shape[1]):
        members = sorted({int(ranks[0, column]), int(ranks[-1, column])})
        group = dist.new_group(members)
        if dist.get_rank() in members:
            mine = group
    return mine


def sync_tied_embedding(parts: list[nn.Module], group: Optional[dist.ProcessGroup]) -> None:
    """Sum the gradients of the tied embedding's two copies (first and last stage)."""
    if group is None:
        return
    from torch.distributed.tensor import DTensor

    grads = []
    for part in parts:
        weight = model_spec(part.cfg).tied_embedding(part)
        if weight is None or weight.grad is None:
            continue
        if isinstance(weight.grad, DTensor) and weight.grad.placements != weight.placements:
            # e.g. a partial sum from the vocabulary-parallel lookup: lay it out like the weight first
            weight.grad = weight.grad.redistribute(placements=weight.placements)
        grads.append(weight.grad)
    for grad in grads:
        dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=group)


def pixel_rows(pixel_values: Optional[torch.Tensor], images_per_sample: list[int], max_images: int,
               image_shape: tuple[int, int, int]) -> torch.Tensor:
    """[N, C, H, W] images in reading order -> [B, max_images, C, H, W], zero-padded per sample: the form
    that splits into pipeline micro-batches along dim 0 (the model takes either)."""
    rows = torch.zeros(len(images_per_sample), max_images, *image_shape,
                       device=None if pixel_values is None else pixel_values.device)
    start = 0
    for row, n in enumerate(images_per_sample):
        if n:
            rows[row, :n] = pixel_values[start:start + n]
            start += n
    return rows
