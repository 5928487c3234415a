"""Preemption requests: by signal or by file, agreed by every rank at the same call; handlers restored on close;
the saved marker."""

import datetime
import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from mmfm.parallel.distributed import free_port
from mmfm.train.preemption import PREEMPT_REQUEST, PREEMPT_SAVED, PreemptionMonitor

WORLD = 2


def test_sigusr1_requests_a_stop(tmp_path):
    with PreemptionMonitor(tmp_path) as monitor:
        assert not monitor.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert monitor.requested()


def test_the_request_file_alone_requests_a_stop(tmp_path):
    with PreemptionMonitor(tmp_path) as monitor:
        assert not monitor.requested()
        (tmp_path / PREEMPT_REQUEST).touch()
        assert monitor.requested()


def test_a_second_sigterm_only_logs(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mmfm.train.preemption"), PreemptionMonitor(tmp_path) as monitor:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert monitor.requested()
    assert "SIGTERM received" in caplog.text and "SIGTERM again; ignored" in caplog.text


def test_close_restores_the_previous_handlers(tmp_path):
    def previous(signum, frame):
        pass

    old_usr1 = signal.signal(signal.SIGUSR1, previous)
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        with PreemptionMonitor(tmp_path):
            assert signal.getsignal(signal.SIGUSR1) is not previous
            assert signal.getsignal(signal.SIGTERM) != old_term
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.getsignal(signal.SIGTERM) == old_term
    finally:
        signal.signal(signal.SIGUSR1, old_usr1)


def test_disabled_monitor_catches_nothing_and_ignores_the_file(tmp_path):
    handlers = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    (tmp_path / PREEMPT_REQUEST).touch()
    with PreemptionMonitor(tmp_path, enabled=False) as monitor:
        assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == handlers
        assert not monitor.requested()


def test_mark_saved_writes_the_step(tmp_path):
    with PreemptionMonitor(tmp_path) as monitor:
        monitor.mark_saved(1234)
    record = json.loads((tmp_path / PREEMPT_SAVED).read_text())
    assert record["step"] == 1234 and datetime.datetime.fromisoformat(record["time"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [PREEMPT_SAVED]  # no temporary file left


def worker(rank: int, port: int, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    with PreemptionMonitor(run_dir) as monitor:  # only rank 1 is signalled, before its second call
        by_signal = []
        for call in range(3):
            if rank == 1 and call == 1:
                os.kill(os.getpid(), signal.SIGUSR1)
            by_signal.append(monitor.requested("cpu"))
    with PreemptionMonitor(run_dir) as monitor:  # the file appears between two calls
        by_file = [monitor.requested("cpu")]
        dist.barrier()
        if rank == 1:
            Path(run_dir, PREEMPT_REQUEST).touch()
        dist.barrier()
        by_file.append(monitor.requested("cpu"))
    with open(os.path.join(run_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"by_signal": by_signal, "by_file": by_file}, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_every_rank_sees_one_ranks_request_at_the_same_call(tmp_path):
    mp.start_processes(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    for rank in range(WORLD):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"by_signal": [False, True, True], "by_file": [False, True]}, f"rank {rank}: {got}"
