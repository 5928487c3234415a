"""The hang watchdog: a rank that stops beating dumps every thread's stack and exits with EXIT_CODE (alone, and
blocked in a gloo all-reduce whose peer is stopped); a beating or paused rank lives on; SIGUSR2 dumps on demand."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mmfm.parallel.distributed import free_port
from mmfm.train.watchdog import EXIT_CODE, Watchdog, stacks_path

TIMEOUT_S = 1.0
MARGIN_S = 2.0  # the poll interval, a dump and the exit, on a loaded machine

BLOCKS_AFTER_BEATS = f"""
import sys, threading, time
from mmfm.train.watchdog import Watchdog

def blocked_forever():
    threading.Event().wait()

with Watchdog(sys.argv[1], 0, {TIMEOUT_S}) as watchdog:
    for step in range(1, 4):
        time.sleep(0.05)
        watchdog.beat(step)
    print("blocking", flush=True)
    blocked_forever()
"""

BEATS_THEN_PAUSES = f"""
import sys, time
from mmfm.train.watchdog import Watchdog

with Watchdog(sys.argv[1], 0, {TIMEOUT_S}) as watchdog:
    for step in range(1, 16):  # 1.5 s of 0.1 s steps
        time.sleep(0.1)
        watchdog.beat(step)
    with watchdog.paused():  # an evaluation longer than the timeout
        time.sleep(1.5)
"""

# Rank 1 stops itself once the group is up; rank 0 then waits in an all-reduce that never completes.
GLOO_PEER_STOPS = f"""
import datetime, os, signal, sys
import torch
import torch.distributed as dist
from mmfm.train.watchdog import Watchdog

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
if dist.get_rank() == 1:
    os.kill(os.getpid(), signal.SIGSTOP)
with Watchdog(sys.argv[1], 0, {TIMEOUT_S}) as watchdog:
    watchdog.beat(1)
    print("blocking", flush=True)
    dist.all_reduce(torch.ones(1))
"""


def python(script: str, run_dir, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env=env)


def kill_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILL ends stopped processes too."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def wait_until_blocking(proc: subprocess.Popen) -> float:
    """The time the child says it blocks (it prints 'blocking' first)."""
    assert proc.stdout.readline().strip() == "blocking", f"child ended early with code {proc.wait()}"
    return time.monotonic()


def assert_exits_with_dump(proc: subprocess.Popen, run_dir, blocking_function: str) -> None:
    blocked_at = wait_until_blocking(proc)
    assert proc.wait(timeout=TIMEOUT_S + MARGIN_S + 5) == EXIT_CODE
    waited = time.monotonic() - blocked_at
    assert waited < TIMEOUT_S + MARGIN_S, f"the watchdog took {waited:.1f} s"
    dump = stacks_path(run_dir, 0).read_text()
    assert "watchdog: rank 0 pid" in dump and "no progress for" in dump
    assert f"in {blocking_function}\n" in dump, dump


@pytest.mark.timeout(60)
def test_a_rank_that_stops_beating_dumps_its_stacks_and_exits(tmp_path):
    proc = python(BLOCKS_AFTER_BEATS, tmp_path)
    try:
        assert_exits_with_dump(proc, tmp_path, "blocked_forever")
        assert "after step 3" in stacks_path(tmp_path, 0).read_text()
    finally:
        kill_all([proc])


@pytest.mark.timeout(60)
def test_a_beating_or_paused_rank_lives_on(tmp_path):
    proc = python(BEATS_THEN_PAUSES, tmp_path)
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        kill_all([proc])
    assert stacks_path(tmp_path, 0).read_text() == ""


@pytest.mark.timeout(90)
def test_a_rank_blocked_in_a_collective_with_a_stopped_peer_exits(tmp_path):
    port = free_port()
    procs = [python(GLOO_PEER_STOPS, tmp_path,
                    env=dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                             WORLD_SIZE="2", LOCAL_RANK=str(rank), OMP_NUM_THREADS="1"))
             for rank in range(2)]
    try:
        assert_exits_with_dump(procs[0], tmp_path, "all_reduce")
        assert procs[1].poll() is None  # stopped, not ended: the watchdog did it, not a gloo error
    finally:
        kill_all(procs)


def test_sigusr2_dumps_the_stacks_of_a_live_rank(tmp_path):
    with Watchdog(tmp_path, 3, 60.0):
        os.kill(os.getpid(), signal.SIGUSR2)
        dump = wait_for_text(stacks_path(tmp_path, 3))
    assert "in test_sigusr2_dumps_the_stacks_of_a_live_rank\n" in dump
    assert "in _watch\n" in dump  # every thread: the watchdog's own too


def wait_for_text(path, seconds: float = 5.0) -> str:
    deadline = time.monotonic() + seconds
    while not path.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    return path.read_text()


def test_a_disabled_watchdog_is_a_no_op(tmp_path):
    threads = threading.active_count()
    with Watchdog(tmp_path, 0, 0.0) as watchdog:
        watchdog.beat(1)
        with watchdog.paused():
            assert threading.active_count() == threads
    assert not (tmp_path / "stacks").exists()
