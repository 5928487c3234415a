"""`mmfm launch`: run a training job (or a sweep of them) with torchrun on this machine or through Slurm."""

from mmfm.launch.job import Job, LaunchError, plan_jobs
from mmfm.launch.local import local_command, run_local
from mmfm.launch.slurm import render_sbatch, submit

__all__ = ["Job", "LaunchError", "local_command", "plan_jobs", "render_sbatch", "run_local", "submit"]
