"""`mmfm launch` on a real one-node Slurm cluster (launch/local-slurm/start.sh: Debian's slurm-wlm, started here
as root): a 2-rank training job runs to completion, and a job that gets the pre-timeout signal mid-run
checkpoints, is requeued, resumes and ends with the losses of the uninterrupted job."""

import contextlib
import io
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from mmfm.cli.launch import main as launch
from mmfm.parallel.distributed import free_port
from mmfm.train.metrics import read_metrics
from test_launch import job_overrides

REPO = Path(__file__).resolve().parents[1]
STEPS = 24
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="session")
def slurm():
    """The local cluster, started (and installed) if needed; a cluster that does not start fails the tests."""
    start = REPO / "launch/local-slurm/start.sh"
    try:
        result = subprocess.run(["bash", str(start)], capture_output=True, text=True, timeout=540)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{start} did not finish in 9 minutes; see /var/log/slurmctld.log and /var/log/slurmd.log",
                    pytrace=False)
    if result.returncode != 0:
        pytest.fail(f"the local Slurm cluster did not start ({start}, exit {result.returncode}): "
                    f"{result.stderr.strip()[-2000:]}\nlogs: /var/log/slurmctld.log, /var/log/slurmd.log",
                    pytrace=False)


def submit(run_dir: Path, data: Path, *extra) -> str:
    """`mmfm launch` of the 2-rank FSDP job of the small model on the local cluster; the Slurm job id."""
    cluster = ["cluster=slurm", "cluster.gpus_per_node=0", f"cluster.cpus_per_task={min(2, os.cpu_count() or 1)}",
               "cluster.mem=", "cluster.time=10", "cluster.signal_lead_s=60", f"cluster.master_port={free_port()}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert launch([*cluster, "parallel=fsdp2", *job_overrides(data, STEPS), "checkpoint.every=8",
                       "checkpoint.keep_last=10", *extra, f"run_dir={run_dir}"]) == 0
    return re.search(r"submitted Slurm job (\d+)", out.getvalue())[1]


def job_fields(job_id: str) -> dict:
    line = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(token.split("=", 1) for token in line.split() if "=" in token)


def job_outputs(run_dir: Path) -> str:
    logs = sorted((run_dir / "logs").glob("*")) if (run_dir / "logs").is_dir() else []
    return "\n".join(f"==> {p} <==\n{p.read_text()[-3000:]}" for p in logs) or f"no logs in {run_dir}/logs"


def wait_for(job_id: str, run_dir: Path, done, what: str, timeout: float = 240) -> dict:
    """Poll the job until done(fields) holds; fail with its output files when it ends otherwise or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = job_fields(job_id)
        if done(fields):
            return fields
        if fields.get("JobState") in FINAL_STATES:
            break
        time.sleep(0.3)
    pytest.fail(f"Slurm job {job_id} never got to {what} (state {fields.get('JobState')}, restarts "
                f"{fields.get('Restarts')}):\n{job_outputs(run_dir)}", pytrace=False)


def completed(fields: dict) -> bool:
    return fields.get("JobState") == "COMPLETED"


@pytest.fixture(scope="module")
def uninterrupted(slurm, synth_dir, tmp_path_factory):
    """(run directory, job id, final job fields) of the job run straight through."""
    run_dir = tmp_path_factory.mktemp("slurm") / "straight"
    job_id = submit(run_dir, synth_dir)
    return run_dir, job_id, wait_for(job_id, run_dir, completed, "COMPLETED")


def test_two_rank_job_runs_to_completion(uninterrupted):
    run_dir, job_id, fields = uninterrupted
    assert fields["ExitCode"] == "0:0" and fields["Restarts"] == "0"
    logs = run_dir / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["rank_0.log", "rank_1.log", f"slurm-{job_id}.out"]
    assert "kernels:" in (logs / "rank_1.log").read_text()  # rank 1's own output
    assert "final validation loss" in (logs / "rank_0.log").read_text()
    assert f"mmfm launch: job {job_id} (restart 0) on 1 node(s)" in (logs / f"slurm-{job_id}.out").read_text()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        ["latest", "step_00000008", "step_00000016", "step_00000024"]
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step_00000024"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, STEPS + 1))


def test_preempted_job_checkpoints_requeues_and_resumes(uninterrupted, synth_dir, tmp_path):
    run_dir = tmp_path / "preempted"
    job_id = submit(run_dir, synth_dir)
    metrics = run_dir / "metrics.jsonl"
    wait_for(job_id, run_dir, lambda f: metrics.exists() and metrics.read_text().count("\n") >= 3,
             "training step 3")
    # What Slurm sends --signal lead seconds before the time limit: USR1 to the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    wait_for(job_id, run_dir, lambda f: f.get("Restarts") == "1", "a requeue")
    # A requeued job waits Slurm's requeue delay (about two minutes) before it may start: start it now instead,
    # though not in the second of the requeue (slurmd refuses a credential issued in the second it revoked one).
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
    fields = wait_for(job_id, run_dir, completed, "COMPLETED after the requeue")
    assert fields["Restarts"] == "1" and fields["ExitCode"] == "0:0"

    out = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert "pre-timeout signal, asking the ranks to checkpoint" in out
    assert f"checkpoint saved, requeueing job {job_id}" in out and f"job {job_id} (restart 1)" in out
    preempted_at = int(re.search(r"preempted at step (\d+): checkpoint saved", out)[1])
    assert 3 <= preempted_at < STEPS and (run_dir / f"checkpoints/step_{preempted_at:08d}").is_dir()
    assert f"resumed from {run_dir}/checkpoints/step_{preempted_at:08d} at step {preempted_at}" in \
        (run_dir / "logs" / "rank_0.log").read_text()
    assert not (run_dir / "preempt.request").exists() and not (run_dir / "preempt.saved").exists()

    straight = uninterrupted[0]
    losses = {r["step"]: r["loss"] for r in read_metrics(metrics)}
    assert losses == {r["step"]: r["loss"] for r in read_metrics(straight / "metrics.jsonl")}
    final = [json.loads((d / "summary.json").read_text())["val_loss"] for d in (run_dir, straight)]
    assert final[0] == final[1]
