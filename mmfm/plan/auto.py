"""parallel=auto: the layout `mmfm plan` ranks first for the run's model, hardware=, world size, global batch and
data.seq_len replaces parallel.*, data.batch_size, train.grad_accum_steps and train.activation_checkpoint before
validation (docs/planning.md). The global batch is train.global_batch, or when 0 data.batch_size x
train.grad_accum_steps x the devices: the batch the config's own layout (parallel/auto.yaml: dp_shard=-1, pure
data parallelism) would train with."""

from __future__ import annotations

import dataclasses

from mmfm.config.schema import JobConfig, ParallelConfig
from mmfm.config.world import Resolved, World, apply_overrides
from mmfm.errors import ConfigError, MmfmError
from mmfm.plan.report import GIB, NothingFits, describe, layout_overrides, nothing_fits

OPEN_DIMS = {"dp_replicate": 1, "dp_shard": -1, "tp": 1, "pp": 1, "cp": 1}  # parallel/auto.yaml's: all for the plan


def check_open(p: ParallelConfig) -> None:
    """The dims are the planner's to choose: a fixed one would be silently replaced, so it is refused."""
    for name, open_value in OPEN_DIMS.items():
        if getattr(p, name) != open_value:
            raise ConfigError(f"parallel.auto=true chooses every dim, but parallel.{name}={getattr(p, name)} is fixed; "
                              f"drop that override (parallel=auto leaves the dims open), or drop parallel=auto and "
                              "give the whole layout")


def global_batch(cfg: JobConfig, devices: int) -> tuple[int, str]:
    """(samples per optimizer step, where the number comes from)."""
    if cfg.train.global_batch:
        return cfg.train.global_batch, "train.global_batch"
    return (cfg.data.batch_size * cfg.train.grad_accum_steps * devices,
            f"data.batch_size={cfg.data.batch_size} x train.grad_accum_steps={cfg.train.grad_accum_steps} x "
            f"{devices} device(s)")


def announce(best, result, wl, hw, world: World) -> str:
    """One line: the chosen layout, its predicted step time, MFU and memory."""
    return (f"parallel=auto chose {describe(best.layout)} ({best.layout.microbatches} micro-batch(es) per step and "
            f"data-parallel rank) for {best.params / 1e9:.3g}B parameters on {wl.devices} x {hw.name} "
            f"({world.source}), global batch {wl.global_batch} x {wl.seq_len} tokens: predicted step "
            f"{best.time['step']:.3g} s, MFU {best.mfu:.1%}, {best.memory['total'] / GIB:.3g} of "
            f"{hw.hbm_bytes / GIB:.0f} GiB per device ({len(result.plans)} of {result.considered} layouts fit; "
            f"mmfm plan devices={wl.devices} global_batch={wl.global_batch} seq_len={wl.seq_len} ranks them)")


def plan_layout(cfg: JobConfig, world: World) -> Resolved:
    """cfg with the top plan's layout (and parallel.auto=false, train.global_batch pinned), the overrides that give
    it, and the line announcing it; a one-line error when the world is unknown or nothing fits."""
    from mmfm.plan.search import Workload, search

    check_open(cfg.parallel)
    if world.size is None:
        raise ConfigError(f"parallel=auto plans for the device count, which is unknown here: {world.source}")
    batch, batch_source = global_batch(cfg, world.size)
    # the cluster's processes per node, when known, are the node the plan keeps tensor parallelism in
    hw = dataclasses.replace(cfg.hardware, devices_per_node=world.per_node or cfg.hardware.devices_per_node)
    wl = Workload(world.size, batch, cfg.data.seq_len)
    try:
        result = search(dataclasses.replace(cfg, hardware=hw), wl)
        if not result.plans:
            raise NothingFits(nothing_fits(result, hw))
    except MmfmError as exc:
        raise type(exc)(f"parallel=auto on {world.size} device(s) ({world.source}), global batch {batch} "
                        f"({batch_source}) x {wl.seq_len} tokens: {exc}") from None
    best = result.plans[0]
    overrides = ("parallel.auto=false", *layout_overrides(best.layout), f"train.global_batch={batch}")
    return Resolved(apply_overrides(cfg, overrides), overrides, announce(best, result, wl, hw, world))
