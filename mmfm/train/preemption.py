"""Stopping at a step boundary with a checkpoint when the job is about to lose its allocation, for a requeue.

Contract with the Slurm batch script:
1. on its pre-timeout signal the script creates <run_dir>/preempt.request (SIGUSR1 or SIGTERM sent to any
   rank does the same);
2. every rank sees requested() turn true at the same step boundary: all ranks save a checkpoint there,
   rank 0 then calls mark_saved(step), which writes <run_dir>/preempt.saved, and all ranks exit 0;
3. the script requeues the job if preempt.saved exists, deleting both files.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from mmfm.parallel.distributed import is_distributed

log = logging.getLogger(__name__)

PREEMPT_REQUEST = "preempt.request"
PREEMPT_SAVED = "preempt.saved"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionMonitor:
    """Catches SIGUSR1/SIGTERM (main thread only) and watches for <run_dir>/preempt.request.

    The handlers are installed on construction and the previous ones restored by close() (or on leaving the
    `with` block). Keep it open until the checkpoint is saved: a signal while the monitor is open only logs,
    so a second SIGTERM cannot kill a save in progress. enabled=False: requested() is always false.
    """

    def __init__(self, run_dir: Path | str, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.signalled = False
        self._previous: dict[int, object] = {}
        if enabled:
            self._install_handlers()

    def __enter__(self) -> "PreemptionMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def request_path(self) -> Path:
        return self.run_dir / PREEMPT_REQUEST

    @property
    def saved_path(self) -> Path:
        return self.run_dir / PREEMPT_SAVED

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption: not on the main thread, so SIGUSR1/SIGTERM are not caught; only %s is watched",
                        self.request_path)
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def close(self) -> None:
        """Restore the signal handlers found on construction."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signalled:
            log.warning("preemption: %s again; ignored, the checkpoint at the next step boundary goes on", name)
            return
        self.signalled = True
        log.warning("preemption: %s received; saving a checkpoint at the next step boundary, then stopping", name)

    def _local_request(self) -> bool:
        """A signal here, or the request file (looked up by rank 0 only: one file-system query per step)."""
        if self.signalled:
            return True
        reads_file = not is_distributed() or dist.get_rank() == 0
        return reads_file and self.request_path.exists()

    def requested(self, device: torch.device | str = "cpu") -> bool:
        """Whether any rank was asked to stop. A collective when distributed: every rank calls it every step,
        and all get the same answer (device: where the all-reduce runs, the training device for NCCL)."""
        if not self.enabled:
            return False
        local = self._local_request()
        if not is_distributed():
            return local
        flag = torch.tensor([int(local)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def mark_saved(self, step: int) -> None:
        """Rank 0, once the checkpoint of `step` is saved: write preempt.saved atomically (step and time)."""
        tmp = self.saved_path.with_name(PREEMPT_SAVED + ".tmp")
        record = {"step": step, "time": datetime.datetime.now().isoformat(timespec="seconds")}
        with open(tmp, "w") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.saved_path)
        log.warning("preemption: checkpoint of step %d saved; wrote %s", step, self.saved_path)
