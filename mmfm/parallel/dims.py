"""ParallelDims: dp_replicate x dp_shard x cp x tp x pp = world size, checked against the model and
turned into one DeviceMesh with named dimensions."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from mmfm.config.schema import ModelConfig, ParallelConfig
from mmfm.config.validate import ConfigError

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

    def validate(self, model: ModelConfig, world_size: Optional[int] = None) -> "ParallelDims":
        """Raise ConfigError naming the field and the fix; return self when the layout can work."""
        for name, size in self.sizes.items():
            if size < 1:
                raise ConfigError(f"parallel.{name}={size} must be >= 1")
        lm, v = model.language, model.vision
        divisible = {
            "model.language.num_heads": lm.num_heads, "model.language.num_kv_heads": lm.num_kv_heads,
            "model.language.intermediate_size": lm.intermediate_size, "model.language.vocab_size": lm.vocab_size,
            "model.vision.num_heads": v.num_heads, "model.vision.hidden_size": v.hidden_size,
        }
        for field, value in divisible.items():
            if value % self.tp:
                raise ConfigError(f"{field}={value} is not divisible by parallel.tp={self.tp}; choose a tp that "
                                  f"divides it")
        if self.pp > lm.num_layers:
            raise ConfigError(f"parallel.pp={self.pp} exceeds model.language.num_layers={lm.num_layers}; every "
                              "pipeline stage needs at least one decoder layer")
        if world_size is not None and self.world_size != world_size:
            raise ConfigError(f"parallel dims {self.sizes} multiply to {self.world_size} but the job has "
                              f"{world_size} processes; make their product equal the world size")
        return self

    def mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(sizes, names) of the dims larger than one, in MESH_ORDER; ((1,), ("dp_shard",)) for one process."""
        used = [(size, name) for name, size in self.sizes.items() if size > 1] or [(1, "dp_shard")]
        sizes, names = zip(*used)
        return tuple(sizes), tuple(names)

    def build_mesh(self, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh

        sizes, names = self.mesh_shape()
        return init_device_mesh(device_type, sizes, mesh_dim_names=names)

    def dp_mesh_names(self) -> tuple[str, ...]:
        """The mesh dims FSDP shards and replicates over: ('dp_replicate', 'dp_shard') for HSDP."""
        names = tuple(n for n in ("dp_replicate", "dp_shard") if self.sizes[n] > 1)
        return names or ("dp_shard",)
