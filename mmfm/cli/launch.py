"""`mmfm launch [--dry-run] [--multirun] [overrides]`: the training job of `mmfm train` with the same overrides,
run by torchrun on this machine (cluster=local) or submitted to Slurm (cluster=slurm); docs/launching.md."""

from __future__ import annotations

import argparse

from mmfm.cli.errors import one_line_errors
from mmfm.launch import Job, LaunchError, local_command, plan_jobs, render_sbatch, run_local, submit


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mmfm launch",
        description="Run `mmfm train` with these overrides on nodes x processes per node: cluster=local starts "
                    "torchrun here, cluster=slurm renders the sbatch template (mmfm/launch/templates/sbatch.sh: one "
                    "torchrun per node, rendezvous on the first, checkpoint and requeue before the time limit) and "
                    "submits it. The run directory (run_dir) is fixed now; rank logs go to "
                    "<run_dir>/logs/rank_<RANK>.log.",
        epilog="examples: mmfm launch parallel=fsdp2 | mmfm launch cluster=slurm cluster.nodes=16 "
               "cluster.partition=gpu parallel=fsdp2 parallel.dp_shard=128 | mmfm launch cluster=slurm "
               "cluster.nodes=16 model=vlm_7b hardware=h100 data.seq_len=2048 parallel=auto (the planner's layout; "
               "parallel.dp_shard=-1: the rest of the world) | mmfm launch -m parallel=single,fsdp2")
    p.add_argument("--dry-run", action="store_true",
                   help="print the sbatch script (Slurm) or the torchrun command (local); start nothing")
    p.add_argument("-m", "--multirun", action="store_true",
                   help="one job per combination of swept values (key=a,b, range(), choice(), glob()), each in "
                        "<run_dir>/<swept overrides>; Slurm: one sbatch each, local: one after another")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for `mmfm train`")
    return p.parse_intermixed_args(argv)


def dry_run(jobs: list[Job]) -> None:
    for i, job in enumerate(jobs, 1):
        if len(jobs) > 1:
            print(f"# ---- job {i}/{len(jobs)}: {job.run_dir}")
        print(render_sbatch(job) if job.cfg.cluster.kind == "slurm" else local_command(job))


def start(job: Job) -> bool:
    """Submit or run one job; False when a local run failed."""
    if job.cfg.cluster.kind == "slurm":
        job_id = submit(job)
        print(f"submitted Slurm job {job_id}: run directory {job.run_dir}, logs in {job.run_dir / 'logs'}")
        return True
    print(f"mmfm launch: {job.procs_per_node} process(es) on this machine, run directory {job.run_dir}, "
          f"rank logs in {job.run_dir / 'logs'}", flush=True)
    return run_local(job) == 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with one_line_errors("mmfm launch"):
        jobs = plan_jobs(args.overrides, args.multirun)
        if args.dry_run:
            dry_run(jobs)
            return 0
        failed = [job.run_dir for job in jobs if not start(job)]
        if failed:
            raise LaunchError(f"{len(failed)} of {len(jobs)} run(s) failed: {', '.join(map(str, failed))}; "
                              "see logs/rank_*.log in each")
    return 0
