"""cluster=local: the job's ranks under torchrun on this machine, with the same per-rank logs as on Slurm."""

from __future__ import annotations

import os
import shlex
import subprocess

from mmfm.launch.job import Job
from mmfm.launch.template import launch_dir
from mmfm.train.preemption import PREEMPT_REQUEST, PREEMPT_SAVED


def local_env(job: Job) -> dict[str, str]:
    """What the ranks get on top of this process's environment."""
    return {**job.cfg.cluster.env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(job.omp_threads)}


def torchrun_command(job: Job) -> list[str]:
    return [job.python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={job.procs_per_node}",
            "--no-python", "bash", str(launch_dir() / "torchrun_rank.sh"), str(job.run_dir / "logs"),
            *job.train_command()]


def local_command(job: Job) -> str:
    """The command line (environment included) that run_local runs, as --dry-run prints it."""
    env = " ".join(f"{key}={shlex.quote(value)}" for key, value in local_env(job).items())
    return f"{env} {shlex.join(torchrun_command(job))}"


def run_local(job: Job) -> int:
    """Run the job to its end; torchrun's exit code."""
    for marker in (PREEMPT_REQUEST, PREEMPT_SAVED):  # left by an interrupted run in this run directory
        (job.run_dir / marker).unlink(missing_ok=True)
    return subprocess.run(torchrun_command(job), env={**os.environ, **local_env(job)}).returncode
