"""Turn the plain model into this rank's parallel model parts, in one place and one order:

    meta model -> kernels -> pipeline stages -> tensor/sequence parallel -> LoRA adapters -> activation checkpointing
    -> compile
    -> FSDP2/HSDP -> context parallel -> materialize this rank's shards only -> seeded initialization
    -> model.pretrained's Hugging Face weights (this rank's slices; mmfm.checkpoint.hf_vlm)

No rank ever materializes the full model: parameters are created on the meta device, sharded there,
and each rank allocates and initializes only its own shards (mmfm.models.init).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from mmfm.checkpoint.hf_vlm import load_pretrained
from mmfm.config import JobConfig
from mmfm.kernels.apply import apply_kernels, loss_objective, resolve_kernels
from mmfm.models import build_model, model_spec
from mmfm.models.init import init_parameters
from mmfm.models.lora import apply_lora
from mmfm.parallel.activation_checkpoint import apply_activation_checkpointing
from mmfm.parallel.data_parallel import apply_fsdp, sharding_units
from mmfm.parallel.dims import ParallelDims
from mmfm.parallel.expert_parallel import apply_expert_parallel
from mmfm.parallel.pipeline_parallel import layer_assignment, split_stage, stage_indices, tied_embedding_groups
from mmfm.parallel.tensor_parallel import apply_tensor_parallel

log = logging.getLogger(__name__)


@dataclass
class ModelParts:
    """The model parts this rank holds (one, or one per pipeline stage) and their place in the layout."""

    parts: list[nn.Module]
    stages: list[int]
    num_stages: int
    dims: ParallelDims
    mesh: Optional[object] = None
    tied_group: Optional[dist.ProcessGroup] = None
    layers: list[list[int]] = field(default_factory=list)
    kernels: dict[str, str] = field(default_factory=dict)  # op -> implementation (mmfm.kernels.apply)

    @property
    def pipelined(self) -> bool:
        return self.dims.pp > 1

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stages

    @property
    def has_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stages

    def parameters(self):
        for part in self.parts:
            yield from part.parameters()

    def tied_copies(self) -> list[torch.Tensor]:
        """The last stage's copy of a tied embedding (its gradient norm is counted on the first stage)."""
        copies = []
        for stage, part in zip(self.stages, self.parts):
            weight = model_spec(part.cfg).tied_embedding(part)
            if stage == self.num_stages - 1 and stage != 0 and weight is not None:
                copies.append(weight)
        return copies

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    def reshard(self) -> None:
        """Free FSDP's gathered parameters after forward-only passes (evaluation has no backward to)."""
        for part in self.parts:
            if isinstance(part, FSDPModule):
                part.reshard()

    def group(self, name: str) -> Optional[dist.ProcessGroup]:
        if self.mesh is None or self.dims.sizes[name] == 1:
            return None
        return self.mesh.get_group(name) if name in self.mesh.mesh_dim_names else self.mesh[name].get_group()


def compute_dtype(cfg: JobConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def compile_blocks(model: nn.Module, containers: tuple[str, ...], backend: str = "inductor") -> int:
    """torch.compile each block in place (names and checkpoints unchanged); return how many. Blocks share
    their code, so one compiled graph serves them all."""
    units = sharding_units(model, containers)
    for block in units:
        block.compile(backend=backend)
    return len(units)


def parallelize(cfg: JobConfig, dims: ParallelDims, device: torch.device, mesh=None,
                materialize: bool = True, kernels: Optional[dict[str, str]] = None) -> ModelParts:
    """This rank's parts; materialize=False leaves them on the meta device (to check 100B+ layouts).
    kernels: the preflight's choice per op (resolved here when not given)."""
    containers = model_spec(cfg.model).block_containers(cfg.model)
    whole = build_model(cfg.model, "meta")
    if kernels is None:
        kernels = resolve_kernels(cfg.kernels, device, dims.tp, dims.pp, dims.cp, loss_objective(cfg.stage),
                                  compute_dtype(cfg))
    apply_kernels(whole, kernels)
    stages, layers = [0], []
    parts = [whole]
    if dims.pp > 1:
        layers = layer_assignment(cfg.model, cfg.data.seq_len, dims.num_stages, list(dims.pp_layers))
        stages = stage_indices(dims.coordinate(mesh, "pp"), dims.pp, dims.pp_virtual_stages)
        parts = [split_stage(whole, s, dims.num_stages, layers[s]) for s in stages]
        log.info("pipeline stages %s hold decoder layers %s", stages, [layers[s] for s in stages])
    t = cfg.train
    fsdp_mesh = dims.fsdp_mesh(mesh) if mesh is not None and dims.fsdp_size > 1 else None
    for part in parts:
        if dims.tp > 1:
            apply_tensor_parallel(part, mesh["tp"])
        if dims.ep > 1:
            apply_expert_parallel(part, mesh["ep"])
        if cfg.model.lora.enabled:  # after tp: the adapters take their base layer's placements
            adapted = apply_lora(part, cfg.model.lora)
            log.info("LoRA rank %d on %d linears; only the adapters train", cfg.model.lora.rank, len(adapted))
        apply_activation_checkpointing(part, containers, t.activation_checkpoint, t.activation_checkpoint_every)
        if t.compile:
            compile_blocks(part, containers, t.compile_backend)
        if fsdp_mesh is not None:
            # bf16: parameters gathered and computed in bf16, gradients reduced in fp32
            param_dtype = torch.bfloat16 if t.precision == "bf16" else None
            experts = (dims.expert_fsdp_mesh(mesh), dims.fsdp_size) if dims.ep > 1 else None
            apply_fsdp(part, fsdp_mesh, containers, param_dtype=param_dtype,
                       reshard_after_forward=dims.reshard_after_forward, experts=experts)
        if dims.cp > 1:
            from mmfm.parallel.context_parallel import apply_context_parallel

            apply_context_parallel(part, mesh["cp"])
    for part in parts if materialize else ():
        part.to_empty(device=device)
        init_parameters(part, cfg.seed)
        load_pretrained(part, cfg.model)  # model.pretrained's weights, this rank's slices (a resume loads over them)
    tied = None
    if dims.pp > 1 and cfg.model.language.tie_embeddings:
        tied = tied_embedding_groups(mesh, dims.pp)
    return ModelParts(parts, stages, dims.num_stages if dims.pp > 1 else 1, dims, mesh, tied, layers, kernels)
