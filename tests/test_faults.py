"""Fault tolerance, end to end. A 2-rank FSDP job launched with `mmfm launch` ends non-zero within a stated bound
when one rank is stopped (SIGSTOP: the live rank's watchdog dumps its stacks to the run directory) or killed
(SIGKILL). A NaN batch's update is skipped and training goes on; faults.max_bad_steps bad steps in a row stop the
run naming the last good checkpoint, which loads. The loss guard's rules on their own."""

import dataclasses
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import SMALL_MODEL, TEST_SEED
from mmfm.checkpoint import CheckpointManager
from mmfm.models import build_model
from mmfm.train.loss_guard import LossGuard, TrainingDiverged
from mmfm.train.metrics import read_metrics
from mmfm.train.trainer import Trainer
from mmfm.train.watchdog import EXIT_CODE, MAX_POLL_S, PEER_DUMP_WAIT_S, stacks_path

REPO = Path(__file__).resolve().parents[1]

# -- a hung or dead rank ends the job ----------------------------------------------------------------------------

HANG_TIMEOUT_S = 5.0
MARGIN_S = 5.0  # process teardown and torchrun's 0.1 s monitor interval, on a loaded machine
# The watchdog that fires asks its local peers for their stacks, waits PEER_DUMP_WAIT_S, then kills them, so
# torchrun's 30 s shutdown grace is never waited out by a stopped rank.
STOPPED_RANK_BOUND_S = HANG_TIMEOUT_S + MAX_POLL_S + PEER_DUMP_WAIT_S + MARGIN_S
KILLED_RANK_BOUND_S = HANG_TIMEOUT_S + MAX_POLL_S + MARGIN_S  # gloo notices a dead peer at once; the watchdog if not


def job_overrides(data: Path, run_dir: Path) -> list[str]:
    """A 2-rank FSDP run of the small model, far longer than the test lets it go."""
    return [*SMALL_MODEL, f"data.path={data}", "parallel=fsdp2", "train.max_steps=100000",
            "train.schedule.warmup_steps=1", "logger.log_every=1", "logger.wandb.enabled=false",
            "logger.progress_bar=false", "eval.num_samples=0", "train.val_every=0", "checkpoint.every=0",
            f"faults.hang_timeout_s={HANG_TIMEOUT_S:g}", f"run_dir={run_dir}"]


def launch_job(data: Path, run_dir: Path, out) -> subprocess.Popen:
    """`mmfm launch` (cluster=local: torchrun) as a child; its output to `out`."""
    command = [sys.executable, "-m", "mmfm.cli.main", "launch", *job_overrides(data, run_dir)]
    return subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def process_table() -> dict[int, int]:
    """pid -> parent pid of every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            table[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return table


def descendants(root: int) -> set[int]:
    table, found, todo = process_table(), set(), [root]
    while todo:
        parent_pid = todo.pop()
        children = [pid for pid, parent in table.items() if parent == parent_pid]
        found.update(children)
        todo += children
    return found


def alive(pid: int) -> bool:
    """Running or stopped (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rank_pids(run_dir: Path) -> dict[int, int]:
    """rank -> pid, from the line each rank's watchdog logs when it starts."""
    pids = {}
    for log_file in (run_dir / "logs").glob("rank_*.log"):
        for rank, pid in re.findall(r"watchdog: rank (\d+) pid (\d+)", log_file.read_text()):
            pids[int(rank)] = int(pid)
    return pids


def wait_for_training(proc: subprocess.Popen, run_dir: Path, steps: int = 3, timeout: float = 60) -> None:
    """Until rank 0 has logged `steps` steps to metrics.jsonl."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().count("\n") >= steps):
        assert proc.poll() is None, f"the job ended with code {proc.returncode} before step {steps}"
        assert time.monotonic() < deadline, f"no step {steps} after {timeout} s"
        time.sleep(0.1)


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def end_everything(proc: subprocess.Popen, seen: dict[int, bytes]) -> None:
    """Whatever of the job is left: continued (a stopped process dies on SIGKILL only, but must not stay
    stopped), then killed. `seen`: pid -> command line of the job's processes seen earlier (orphans by now)."""
    ours = {**seen, **{pid: command_line(pid) for pid in descendants(proc.pid)}}
    for pid, command in ours.items():
        if alive(pid) and command_line(pid) == command:  # not a new process that reuses the pid
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def wait_until_gone(pids, seconds: float = 3.0) -> set[int]:
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {p for p in pids if alive(p)}


def wait_for_text(path: Path, needle: str = "", seconds: float = 5.0) -> str:
    """The file's text once it holds `needle` (a dump is written while it is read), or after `seconds`."""
    deadline = time.monotonic() + seconds
    while not (path.read_text() and needle in path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return path.read_text()


def main_thread_stack(dump: str) -> str:
    """The stack (faulthandler's format) of the thread that runs the training loop."""
    stacks = [s for s in dump.split("\n\n") if " in fit\n" in s]
    assert stacks, f"no thread in Trainer.fit:\n{dump}"
    return stacks[0]


class Job:
    """A launched job: its process, its run directory, every process it started so far."""

    def __init__(self, data: Path, run_dir: Path):
        self.run_dir = run_dir
        self.output = open(run_dir.parent / f"{run_dir.name}-launch.out", "wb")
        self.proc = launch_job(data, run_dir, self.output)
        self.pids: dict[int, bytes] = {}  # pid -> command line

    def ranks_under_way(self) -> dict[int, int]:
        wait_for_training(self.proc, self.run_dir)
        self.pids = {pid: command_line(pid) for pid in descendants(self.proc.pid)}
        ranks = rank_pids(self.run_dir)
        assert set(ranks) == {0, 1} and set(ranks.values()) <= set(self.pids), (ranks, self.pids)
        return ranks

    def seconds_to_exit(self, started: float, bound: float) -> float:
        """Seconds from `started` to the job's exit; fails (the job killed after) when it is not over by bound."""
        try:
            self.proc.wait(timeout=bound - (time.monotonic() - started))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still runs {bound:.0f} s after the fault:\n{self.text()[-3000:]}")
        return time.monotonic() - started

    def text(self) -> str:
        return Path(self.output.name).read_text(errors="replace")

    def close(self) -> None:
        end_everything(self.proc, self.pids)
        self.output.close()


@pytest.mark.timeout(120)
def test_a_stopped_rank_ends_the_job_with_the_stacks_in_the_run_directory(synth_dir, tmp_path):
    job = Job(synth_dir, tmp_path / "run")
    try:
        ranks = job.ranks_under_way()
        os.kill(ranks[1], signal.SIGUSR2)  # on demand: the stacks of a live rank, which keeps running
        on_demand = wait_for_text(stacks_path(job.run_dir, 1), " in fit\n")
        assert "mmfm/train/trainer.py" in main_thread_stack(on_demand) and "watchdog:" not in on_demand
        os.kill(ranks[1], signal.SIGSTOP)
        stopped_at = time.monotonic()
        seconds = job.seconds_to_exit(stopped_at, STOPPED_RANK_BOUND_S)
        print(f"SIGSTOP of rank 1 to job exit: {seconds:.1f} s")
        assert job.proc.returncode != 0
        assert re.search(rf"exitcode\s*: {EXIT_CODE} \(pid: {ranks[0]}\)", job.text()), job.text()[-3000:]
        assert seconds > HANG_TIMEOUT_S
        assert "killed the other ranks on this machine" in job.text()  # the stopped one, without torchrun's grace
        assert not wait_until_gone(job.pids), "processes of the job are left"
        dump = stacks_path(job.run_dir, 0).read_text()
        header = re.search(rf"watchdog: rank 0 pid {ranks[0]} made no progress for ([\d.]+) s "
                           rf"\(timeout {HANG_TIMEOUT_S:g} s\) after step (\d+)", dump)
        assert header and float(header[1]) >= HANG_TIMEOUT_S and int(header[2]) >= 3, dump[:500]
        stack = main_thread_stack(dump)
        assert "mmfm/train/trainer.py" in stack and "torch/distributed/" in stack, stack  # waits in a collective
    finally:
        job.close()


@pytest.mark.timeout(120)
def test_a_killed_rank_ends_the_job(synth_dir, tmp_path):
    job = Job(synth_dir, tmp_path / "run")
    try:
        ranks = job.ranks_under_way()
        os.kill(ranks[0], signal.SIGKILL)
        seconds = job.seconds_to_exit(time.monotonic(), KILLED_RANK_BOUND_S)
        print(f"SIGKILL of rank 0 to job exit: {seconds:.1f} s")
        assert job.proc.returncode != 0
        assert re.search(rf"exitcode\s*: -9 \(pid: {ranks[0]}\)", job.text()), job.text()[-3000:]
        assert not wait_until_gone(job.pids), "processes of the job are left"
    finally:
        job.close()


# -- a bad batch skips its update; too many in a row stop the run -------------------------------------------------

# Short steps and a short final validation.
GUARDED = ["train.grad_accum_steps=1", "train.schedule.warmup_steps=1", "data.batch_size=4", "logger.log_every=1",
           "train.val_batches=1", "data.val_batch_size=8"]
BAD_STEP = 3
STEPS = 8


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def optimizer_steps(optimizer) -> int:
    """The updates the optimizer has applied (AdamW counts them per parameter)."""
    return max((int(state["step"]) for state in optimizer.state.values()), default=0)


class PoisonedLoader:
    """The trainer's loader, with NaN pixel values in the batches of `bad_steps`. At each draw (a step's start)
    it records the parameters and optimizer updates that the steps before left."""

    def __init__(self, trainer: Trainer, bad_steps):
        self.trainer, self.loader, self.bad_steps = trainer, trainer.loader, set(bad_steps)
        self.params_before: dict[int, dict] = {}  # step -> parameters at its start
        self.updates_before: dict[int, int] = {}

    def __iter__(self):
        return self

    def __next__(self):
        step = self.trainer.step + 1
        self.params_before[step] = parameters(self.trainer.model)
        self.updates_before[step] = optimizer_steps(self.trainer.optimizers[0])
        batch = next(self.loader)
        if step in self.bad_steps:
            batch = dataclasses.replace(batch, pixel_values=torch.full_like(batch.pixel_values, float("nan")))
        return batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def changed(before: dict, after: dict) -> list[str]:
    return [name for name in before if not torch.equal(before[name], after[name])]


def assert_finite(params: dict) -> None:
    for name, p in params.items():
        assert torch.isfinite(p).all(), name


@pytest.mark.convergence
def test_a_nan_batch_skips_its_update_and_training_goes_on(make_cfg, tmp_path, caplog, record_figures):
    trainer = Trainer(make_cfg(*GUARDED, f"train.max_steps={STEPS}", f"seed={TEST_SEED}"), tmp_path / "run")
    loader = trainer.loader = PoisonedLoader(trainer, [BAD_STEP])
    with caplog.at_level(logging.WARNING, logger="mmfm.train.trainer"):
        losses = trainer.fit()["losses"]

    assert math.isnan(losses[BAD_STEP]) and math.isnan(read_metrics(tmp_path / "run/metrics.jsonl")[BAD_STEP - 1]["loss"])
    assert f"step {BAD_STEP}: update skipped (loss is nan)" in caplog.text
    # the bad step changed nothing, a good one does
    assert_same(loader.params_before[BAD_STEP + 1], loader.params_before[BAD_STEP])
    assert loader.updates_before[BAD_STEP + 1] == loader.updates_before[BAD_STEP] == BAD_STEP - 1
    assert changed(loader.params_before[BAD_STEP - 1], loader.params_before[BAD_STEP])
    later = [losses[s] for s in range(BAD_STEP + 1, STEPS + 1)]
    record_figures(last_three_over_before_bad=sum(later[-3:]) / 3 / losses[BAD_STEP - 1])
    assert all(math.isfinite(v) for v in later) and sum(later[-3:]) / 3 < losses[BAD_STEP - 1], losses  # 5.69 < 6.01
    assert optimizer_steps(trainer.optimizers[0]) == STEPS - 1
    assert_finite(parameters(trainer.model))


def test_max_bad_steps_in_a_row_stop_the_run_naming_the_last_good_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg(*GUARDED, "train.max_steps=20", "checkpoint.every=3", "checkpoint.keep_last=5",
                   "faults.max_bad_steps=3")
    trainer = Trainer(cfg, tmp_path / "run")
    loader = trainer.loader = PoisonedLoader(trainer, range(4, 21))
    with pytest.raises(TrainingDiverged) as stopped:
        trainer.fit()

    last_good = tmp_path / "run/checkpoints/step_00000003"
    assert str(stopped.value) == (
        f"training stopped at step 6: 3 consecutive steps skipped (last: loss is nan); the last good checkpoint is "
        f"{last_good} (faults.max_bad_steps=3); lower train.optim.lr or check the data read around this step")
    model = build_model(cfg.model, "cpu")
    assert CheckpointManager.load(last_good, model, no_dist=True)["step"] == 3
    saved = parameters(model)
    assert_finite(saved)
    # steps 4-6 changed nothing: the checkpoint holds what the model holds now
    assert_same(saved, loader.params_before[4])
    assert_same(saved, parameters(trainer.model))


# -- the loss guard's rules ---------------------------------------------------------------------------------------

def test_finite_losses_pass_and_nan_or_inf_are_skipped():
    guard = LossGuard(spike_factor=0.0, window=3, max_bad_steps=5)
    assert guard.check(1e6, 2.0) is None  # no spike check at factor 0
    assert guard.check(float("nan"), 1.0) == "loss is nan"
    assert guard.check(float("inf"), 1.0) == "loss is inf"
    assert guard.check(2.0, float("inf")) == "gradient norm is inf"
    assert guard.consecutive_bad == 3 and list(guard.recent) == [1e6]  # bad steps stay out of the mean


def test_a_spike_above_the_factor_of_the_window_mean_is_skipped():
    guard = LossGuard(spike_factor=2.0, window=3, max_bad_steps=5)
    assert [guard.check(v, 1.0) for v in (1.0, 100.0)] == [None, None]  # the window is not full: no spike check
    guard = LossGuard(spike_factor=2.0, window=3, max_bad_steps=5)
    for loss in (4.0, 4.0, 4.0):
        assert guard.check(loss, 1.0) is None
    assert guard.check(8.0, 1.0) is None  # not above 2 x 4
    assert guard.check(11.0, 1.0) == "loss 11 is above 2.0 x the mean 5.333 of the last 3 steps"  # (4+4+8)/3


def test_the_mean_is_over_the_last_window_steps():
    history = (1.0, 1.0, 1.9, 2.8)
    recent, longer = LossGuard(2.0, window=2), LossGuard(2.0, window=4)
    for loss in history:
        assert recent.check(loss, 1.0) is None and longer.check(loss, 1.0) is None
    assert recent.check(4.6, 1.0) is None  # 2 x mean(1.9, 2.8) = 4.7
    assert longer.check(4.6, 1.0) == "loss 4.6 is above 2.0 x the mean 1.675 of the last 4 steps"


def test_a_good_step_resets_the_count_and_max_bad_steps_in_a_row_stop():
    guard = LossGuard(spike_factor=0.0, window=3, max_bad_steps=3)
    nan = float("nan")
    for loss in (1.0, nan, nan, 1.0, nan, nan):
        guard.check(loss, 1.0)
    assert guard.consecutive_bad == 2
    with pytest.raises(TrainingDiverged, match=r"^3 consecutive steps skipped \(last: loss is nan\)$"):
        guard.check(nan, 1.0)
