"""Slurm: render templates/sbatch.sh for a job (one torchrun per node, preemption and requeue) and submit it."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

from mmfm.launch.job import Job, LaunchError
from mmfm.launch.template import launch_dir, render
from mmfm.train.preemption import PREEMPT_REQUEST, PREEMPT_SAVED


def _srun_flags(job: Job) -> list[str]:
    c = job.cfg.cluster
    flags = [f"--cpus-per-task={c.cpus_per_task}"] if c.cpus_per_task else []  # srun does not inherit sbatch's
    if c.container_image:
        flags += [f"--container-image={c.container_image}", f"--container-workdir={os.getcwd()}"]
    if c.container_mounts:
        flags.append(f"--container-mounts={c.container_mounts}")
    return flags + list(c.srun_flags)


def sbatch_values(job: Job) -> dict[str, str]:
    """The values of sbatch.sh's placeholders ("" leaves an optional directive out)."""
    c, q = job.cfg.cluster, shlex.quote
    for name, path in (("run_dir", str(job.run_dir)), ("the working directory", os.getcwd())):
        if any(ch.isspace() for ch in path):
            raise LaunchError(f"{name} {path!r} contains whitespace, which #SBATCH lines cannot hold; "
                              "use a path without spaces")
    return {
        "job_name": c.job_name, "nodes": str(c.nodes), "gpus_per_node": str(c.gpus_per_node or ""),
        "cpus_per_task": str(c.cpus_per_task or ""), "mem": c.mem, "partition": c.partition,
        "account": c.account, "qos": c.qos, "time": c.time, "signal_lead_s": str(c.signal_lead_s or ""),
        "requeue_flag": "--requeue" if c.requeue else "--no-requeue", "requeue": str(c.requeue).lower(),
        "run_dir": str(job.run_dir), "run_dir_q": q(str(job.run_dir)), "workdir": os.getcwd(),
        "sbatch_flags": "\n".join(f"#SBATCH {flag}" for flag in c.sbatch_flags),
        "setup": "\n".join(c.setup),
        "env": "\n".join(f"export {key}={q(value)}" for key, value in c.env.items()),
        "omp_threads": str(job.omp_threads), "master_port": str(c.master_port),
        "preempt_request": PREEMPT_REQUEST, "preempt_saved": PREEMPT_SAVED,
        "srun_flags": " ".join(q(flag) for flag in _srun_flags(job)), "python": q(job.python),
        "procs_per_node": str(job.procs_per_node), "rank_wrapper": q(str(launch_dir() / "torchrun_rank.sh")),
        "overrides": " \\\n  ".join(q(o) for o in job.overrides),
    }


def render_sbatch(job: Job) -> str:
    return render((launch_dir() / "sbatch.sh").read_text(), sbatch_values(job))


def submit(job: Job) -> str:
    """Write <run_dir>/sbatch.sh, submit it and return the Slurm job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError("sbatch is not on PATH: run `mmfm launch` on a Slurm login node, use cluster=local to "
                          "run on this machine, or --dry-run to print the script")
    script = job.run_dir / "sbatch.sh"
    (job.run_dir / "logs").mkdir(parents=True, exist_ok=True)  # Slurm opens the output file there
    script.write_text(render_sbatch(job))
    result = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        raise LaunchError(f"sbatch rejected {script}: {reason}")
    return result.stdout.strip().split(";")[0]
