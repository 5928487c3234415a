"""ParallelDims: dp_replicate x dp_shard x cp x tp x pp = world size, checked against the model and
turned into one DeviceMesh with named dimensions."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from mmfm.config.schema import ModelConfig, ParallelConfig
from mmfm.errors import ConfigError

# Outermost to innermost: tp is innermost so that its frequent collectives stay within a node.
MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass
class ParallelDims(ParallelConfig):
    """The `parallel` config with what the layout implies: sizes, world size, checks and the mesh."""

    @classmethod
    def from_config(cls, cfg: ParallelConfig) -> "ParallelDims":
        return cls(**dataclasses.asdict(cfg))

    @property
    def sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_ORDER}

    @property
    def world_size(self) -> int:
        return math.prod(self.sizes.values())

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_size(self) -> int:
        """Ranks over which FSDP shards and averages gradients: data parallel and context parallel
        (context-parallel ranks hold the same parameters, each with the gradient of its chunk)."""
        return self.dp_size * self.cp

    @property
    def num_stages(self) -> int:
        return self.pp * self.pp_virtual_stages

    def validate(self, model: ModelConfig, world_size: Optional[int] = None) -> "ParallelDims":
        """Raise ConfigError naming the field and the fix; return self when the layout can work."""
        for name, size in self.sizes.items():
            if size == -1:
                raise ConfigError(f"parallel.{name}=-1 (the rest of the world) is not resolved here; give its size, "
                                  "or run through mmfm train / mmfm launch, which resolve it from the world size")
            if size < 1:
                raise ConfigError(f"parallel.{name}={size} must be >= 1")
        from mmfm.models import model_spec

        spec = model_spec(model)
        for field, value in spec.tp_divisible(model).items():
            if value % self.tp:
                pad = (f", or pad it to {-(-value // self.tp) * self.tp} (a pretrained checkpoint's embedding grows: "
                       "the new rows start at the mean of its rows)") if field.endswith("vocab_size") else ""
                raise ConfigError(f"{field}={value} is not divisible by parallel.tp={self.tp}; choose a tp that "
                                  f"divides it{pad}")
        self._validate_pipeline(spec.pipeline_layers(model))
        experts = model.language.moe.num_experts
        self._validate_experts(experts)
        if self.cp > 1 and (self.tp > 1 or self.pp > 1):
            raise ConfigError(f"parallel.cp={self.cp} together with tp or pp is not supported yet; combine context "
                              "parallelism with data parallelism only (parallel.dp_shard / dp_replicate)")
        if world_size is not None and self.world_size != world_size:
            raise ConfigError(f"parallel dims {self.sizes} multiply to {self.world_size} but the job has "
                              f"{world_size} processes; make their product equal the world size")
        return self

    def _validate_experts(self, experts: int) -> None:
        if self.ep < 1:
            raise ConfigError(f"parallel.ep={self.ep} must be >= 1")
        if self.ep == 1:
            return
        if not experts:
            raise ConfigError(f"parallel.ep={self.ep} needs a mixture of experts (model.language.moe.num_experts > 0); "
                              "set parallel.ep=1 for a dense model")
        if experts % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} does not divide model.language.moe.num_experts={experts}; every "
                              "ep rank holds num_experts / ep of them: pick an ep that divides it")
        if self.dp_shard % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} does not divide parallel.dp_shard={self.dp_shard}; the ep ranks "
                              "are data-parallel ranks: make dp_shard a multiple of ep")

    def _validate_pipeline(self, num_layers: int) -> None:
        from mmfm.parallel.pipeline_parallel import MULTI_STAGE_SCHEDULES, SCHEDULES

        if self.pp_schedule not in SCHEDULES:
            raise ConfigError(f"parallel.pp_schedule={self.pp_schedule!r} is unknown; use one of {sorted(SCHEDULES)}")
        multi = self.pp_schedule in MULTI_STAGE_SCHEDULES
        if self.pp > 1 and multi and self.pp_virtual_stages < 2:
            raise ConfigError(f"parallel.pp_schedule={self.pp_schedule} runs several stages per rank; set "
                              "parallel.pp_virtual_stages>=2")
        if self.pp > 1 and not multi and self.pp_virtual_stages != 1:
            raise ConfigError(f"parallel.pp_schedule={self.pp_schedule} runs one stage per rank; set "
                              "parallel.pp_virtual_stages=1 or pick interleaved_1f1b / zero_bubble")
        if self.num_stages > num_layers:
            raise ConfigError(f"parallel.pp={self.pp} x pp_virtual_stages={self.pp_virtual_stages} = "
                              f"{self.num_stages} stages exceed model.language.num_layers={num_layers}; every "
                              "pipeline stage needs at least one decoder layer")
        if self.pp_layers and (len(self.pp_layers) != self.num_stages or sum(self.pp_layers) != num_layers
                               or min(self.pp_layers) < 1):
            raise ConfigError(f"parallel.pp_layers={list(self.pp_layers)} must list {self.num_stages} stages of >= 1 "
                              f"decoder layer summing to model.language.num_layers={num_layers}, or be empty")

    @property
    def microbatches_per_batch(self) -> int:
        return self.pp_microbatches or self.pp

    def pipeline_microbatches(self, grad_accum_steps: int) -> int:
        """Micro-batches per optimizer step flowing through the pipeline."""
        return grad_accum_steps * self.microbatches_per_batch

    def validate_run(self, seq_len: int, grad_accum_steps: int, batch_size: int) -> "ParallelDims":
        """Checks against the data and the step: sequence splits and pipeline micro-batches."""
        if seq_len % (self.tp * self.cp):
            raise ConfigError(f"data.seq_len={seq_len} must be divisible by parallel.tp x parallel.cp = "
                              f"{self.tp * self.cp} (the sequence is split over them)")
        if self.pp == 1:
            return self
        per_batch, m = self.microbatches_per_batch, self.pipeline_microbatches(grad_accum_steps)
        if self.pp_microbatches < 0 or batch_size % per_batch:
            raise ConfigError(f"data.batch_size={batch_size} must split into parallel.pp_microbatches={per_batch} "
                              "equal pipeline micro-batches; change either")
        if m < self.pp:
            raise ConfigError(f"the pipeline gets {m} micro-batches per step (train.grad_accum_steps x parallel."
                              f"pp_microbatches), fewer than its {self.pp} ranks; raise parallel.pp_microbatches")
        if self.pp_virtual_stages > 1 and m % self.pp:
            raise ConfigError(f"the {self.pp_schedule} schedule needs a multiple of parallel.pp={self.pp} micro-"
                              f"batches per step, got {m} (train.grad_accum_steps x parallel.pp_microbatches)")
        return self

    def mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(sizes, names) of the dims larger than one, in MESH_ORDER; ((1,), ("dp_shard",)) for one process. With
        expert parallelism dp_shard is built as (efsdp, ep), efsdp = dp_shard / ep kept even at size 1: the mesh
        the experts' weights are sharded over by FSDP."""
        used = [(size, name) for name, size in self.sizes.items() if size > 1] or [(1, "dp_shard")]
        if self.ep > 1:
            at = [name for _, name in used].index("dp_shard")
            used[at:at + 1] = [(self.dp_shard // self.ep, "efsdp"), (self.ep, "ep")]
        sizes, names = zip(*used)
        return tuple(sizes), tuple(names)

    def build_mesh(self, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh

        sizes, names = self.mesh_shape()
        mesh = init_device_mesh(device_type, sizes, mesh_dim_names=names)
        if self.ep > 1:
            mesh[("efsdp", "ep")]._flatten("dp_shard")
        return mesh

    def fsdp_mesh(self, mesh):
        """The (1-D, or 2-D for HSDP) mesh FSDP runs on: dp_shard and cp flattened into one shard dim."""
        shard = [n for n in ("dp_shard", "cp") if self.sizes[n] > 1]
        if len(shard) == 2:
            mesh[tuple(shard)]._flatten("dp_shard_cp")
            shard = ["dp_shard_cp"]
        names = (["dp_replicate"] if self.dp_replicate > 1 else []) + shard
        return mesh[tuple(names)] if names else None

    def expert_fsdp_mesh(self, mesh):
        """The mesh FSDP shards the experts' weights over under expert parallelism: the ranks that hold the same
        experts, i.e. the data-parallel ranks left after ep (dp_replicate, efsdp) and the context-parallel ones."""
        shard = "efsdp"
        if self.cp > 1:
            mesh[("efsdp", "cp")]._flatten("efsdp_cp")
            shard = "efsdp_cp"
        return mesh[("dp_replicate", shard) if self.dp_replicate > 1 else (shard,)]

    def coordinate(self, mesh, name: str) -> int:
        """This rank's index along mesh dim `name` (0 when that dim has size 1)."""
        if self.sizes[name] == 1:
            return 0
        if name == "dp_shard" and self.ep > 1:  # built as (efsdp, ep), flattened in that order
            return mesh.get_local_rank("efsdp") * self.ep + mesh.get_local_rank("ep")
        return mesh.get_local_rank(name)

    def dp_rank(self, mesh) -> int:
        return self.coordinate(mesh, "dp_replicate") * self.dp_shard + self.coordinate(mesh, "dp_shard")
