"""The world size a job runs on, and the parallel dims it resolves: parallel.dp_shard (or dp_replicate) = -1 is the
rest of the world, world / (the other dims), as TorchTitan's degree -1. `mmfm launch` takes the world from the
cluster config (cluster_world), `mmfm train` from torchrun's WORLD_SIZE (env_world). parallel=auto resolves the
whole layout with the planner (mmfm.plan.auto). docs/planning.md, docs/launching.md."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from omegaconf import OmegaConf

from mmfm.config.schema import ClusterConfig, JobConfig, ParallelConfig
from mmfm.errors import ConfigError

REST = -1  # a dim of this size takes the rest of the world
REST_DIMS = ("dp_shard", "dp_replicate")  # the dims that may
DIMS = ("dp_replicate", "dp_shard", "cp", "tp", "pp")


@dataclass(frozen=True)
class World:
    size: Optional[int]  # processes; None: not known here
    source: str  # where the size comes from (or, when unknown, how to give it), for messages
    per_node: int = 0  # processes per node, 0: not known


@dataclass(frozen=True)
class Resolved:
    """A config with its dims resolved, the overrides that resolved it (what `mmfm launch` passes to the ranks) and
    a line to print about it ("" when there is nothing to say)."""
    cfg: JobConfig
    overrides: tuple[str, ...] = ()
    note: str = ""


def env_world() -> World:
    """torchrun's WORLD_SIZE (and LOCAL_WORLD_SIZE); unset: this one process."""
    size = os.environ.get("WORLD_SIZE")
    if size is None:
        return World(1, "one process: WORLD_SIZE is unset", 1)
    return World(int(size), f"WORLD_SIZE={size}", int(os.environ.get("LOCAL_WORLD_SIZE", "0")))


def cluster_world(c: ClusterConfig) -> World:
    """cluster.nodes x the processes per node (cluster.procs_per_node, else cluster.gpus_per_node)."""
    key = "procs_per_node" if c.procs_per_node else "gpus_per_node" if c.gpus_per_node else None
    if key is None:
        return World(None, "cluster.procs_per_node=0 and cluster.gpus_per_node=0; set cluster.procs_per_node=N "
                           "(processes per node) or, on GPU nodes, cluster.gpus_per_node=N")
    per_node = getattr(c, key)
    return World(c.nodes * per_node, f"cluster.nodes={c.nodes} x cluster.{key}={per_node}", per_node)


def _check_sizes(p: ParallelConfig) -> list[str]:
    """The names of the dims set to -1, after refusing other sizes below 1 and -1 on any dim but one data dim."""
    for name in DIMS:
        size = getattr(p, name)
        if size < 1 and size != REST:
            raise ConfigError(f"parallel.{name}={size} must be >= 1 (or -1 on parallel.dp_shard or "
                              "parallel.dp_replicate: the rest of the world)")
    rest = [name for name in DIMS if getattr(p, name) == REST]
    for name in rest:
        if name not in REST_DIMS:
            raise ConfigError(f"parallel.{name}=-1: only parallel.dp_shard or parallel.dp_replicate may be -1 (the "
                              f"rest of the world); give parallel.{name} a size")
    if len(rest) > 1:
        raise ConfigError("parallel.dp_replicate=-1 and parallel.dp_shard=-1: only one dim may take the rest of the "
                          "world; give parallel.dp_replicate a size")
    return rest


def rest_of_world(p: ParallelConfig, world: World) -> list[str]:
    """The override that gives the -1 dim its size (none when no dim is -1), or a one-line ConfigError."""
    rest = _check_sizes(p)
    if not rest:
        return []
    name = rest[0]
    if world.size is None:
        raise ConfigError(f"parallel.{name}=-1 takes the rest of the world, but the world size is unknown: "
                          f"{world.source}")
    others = {n: getattr(p, n) for n in DIMS if n != name}
    product = math.prod(others.values())
    if world.size % product:
        named = " x ".join(f"{n}={s}" for n, s in others.items() if s != 1) or "1"
        raise ConfigError(f"parallel.{name}=-1 takes the rest of the world, but the world of {world.size} "
                          f"process(es) ({world.source}) does not divide by the other dims ({named} = {product}); "
                          "change parallel.* or the process count so that it does")
    return [f"parallel.{name}={world.size // product}"]


def apply_overrides(cfg: JobConfig, overrides: Sequence[str]) -> JobConfig:
    """cfg with `key=value` overrides of plain fields applied (the resolved dims: what the ranks get)."""
    from mmfm.config.load import to_job_config

    return to_job_config(OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(list(overrides))))


def resolve_layout(cfg: JobConfig, world: World) -> Resolved:
    """The planner's layout under parallel.auto=true, else the -1 dim resolved; cfg unchanged when neither."""
    if cfg.parallel.auto:
        from mmfm.plan.auto import plan_layout

        return plan_layout(cfg, world)
    overrides = rest_of_world(cfg.parallel, world)
    return Resolved(apply_overrides(cfg, overrides), tuple(overrides)) if overrides else Resolved(cfg)
