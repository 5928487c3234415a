"""The jobs `mmfm launch` starts: composed and validated configs with run directories fixed at launch time."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from mmfm.config import JobConfig, load_config, validate
from mmfm.config.schema import KernelsConfig
from mmfm.config.validate import procs_per_node, resolve, validate_before_layout
from mmfm.config.world import cluster_world
from mmfm.errors import MmfmError
from mmfm.launch.sweep import expand_sweep
from mmfm.parallel.dims import ParallelDims


class LaunchError(MmfmError):
    """A job that cannot be started or submitted; the message names the fix."""


@dataclass
class Job:
    overrides: list[str]  # the command-line overrides, ending with run_dir=<absolute path>
    cfg: JobConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def procs_per_node(self) -> int:
        return procs_per_node(self.cfg)

    @property
    def python(self) -> str:
        return self.cfg.cluster.python or sys.executable

    @property
    def omp_threads(self) -> int:
        """Threads per rank: the node's CPUs shared by its ranks."""
        c = self.cfg.cluster
        cpus = c.cpus_per_task or ((os.cpu_count() or 1) if c.kind == "local" else 0)
        return max(1, cpus // self.procs_per_node)

    def train_command(self) -> list[str]:
        return [self.python, "-m", "mmfm.cli.main", "train", *self.overrides]


@contextlib.contextmanager
def _world_size(world: int):
    """WORLD_SIZE as the job's processes will see it, for the config validation done before submitting."""
    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world)
    try:
        yield
    finally:
        if old is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = old


def check(cfg: JobConfig) -> tuple[str, ...]:
    """Validate the whole config before anything starts, its layout resolved on the cluster's processes
    (parallel=auto planned, a -1 dim sized); return the overrides that resolved it (none when nothing was open).
    A Slurm job's device and kernel choices are checked on its nodes (this host may have no GPU)."""
    validate_before_layout(cfg)
    resolved = resolve(cfg, cluster_world(cfg.cluster))
    cfg = resolved.cfg
    if cfg.cluster.kind == "slurm":
        cfg = dataclasses.replace(cfg, device="auto", kernels=KernelsConfig())
    with _world_size(ParallelDims.from_config(cfg.parallel).world_size):
        validate(cfg)
    return resolved.overrides


def override_key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def pin(overrides: list[str], resolved: tuple[str, ...]) -> list[str]:
    """The overrides with the resolved values in place of any the user gave for the same keys, so that the ranks
    run the layout chosen here (and a requeued job keeps it) instead of resolving or planning again."""
    keys = {override_key(o) for o in resolved}
    return [o for o in overrides if override_key(o) not in keys] + list(resolved)


def _hydra_value(path: Path) -> str:
    """The path as an override value, quoted when it holds characters such as the = and , of sweep names."""
    text = str(path)
    return text if re.fullmatch(r"[\w./:@+-]+", text) else '"' + text.replace('"', '\\"') + '"'


def make_job(overrides: list[str], run_dir: Path | None = None) -> Job:
    """The job of these overrides in run_dir (default: the config's run_dir, its timestamp fixed now)."""
    if run_dir is None:
        run_dir = Path(load_config(overrides).run_dir)
    overrides = [o for o in overrides if not o.startswith("run_dir=")]
    run = [f"run_dir={_hydra_value(run_dir.resolve())}"]
    cfg = load_config(overrides + run)
    resolved = check(cfg)
    if resolved:
        overrides = pin(overrides, resolved)
        cfg = load_config(overrides + run)
        check(cfg)  # the ranks' own config: nothing left open
    return Job(overrides + run, cfg)


def sweep_name(swept: list[str]) -> str:
    """A run directory name from a job's swept overrides, e.g. parallel=fsdp2,train.optim.lr=0.001."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(swept))


def plan_jobs(overrides: list[str], multirun: bool = False) -> list[Job]:
    """One job, or with multirun one per combination of the swept values, each in its own run directory under
    the sweep's (the config's run_dir). Every job is validated before any starts."""
    if not multirun:
        return [make_job(list(overrides))]
    fixed, combinations = expand_sweep(list(overrides))
    root = Path(load_config(fixed).run_dir)
    return [make_job(fixed + swept, root / sweep_name(swept)) for swept in combinations]
