"""A per-rank hang watchdog: a rank that makes no progress for `timeout_s` seconds writes the Python stack of
every thread to <run_dir>/stacks/rank{rank}.txt and exits with EXIT_CODE, so that torchrun ends the whole job
instead of letting it hang until the collective timeout (or forever, outside a collective).

Before it exits, it asks the other ranks on its machine for their stacks (SIGUSR2, PEER_DUMP_WAIT_S to write
them) and then SIGKILLs them: a rank that cannot run (stopped, or stuck outside Python) would otherwise hold
the job for torchrun's 30 s shutdown grace. Ranks find each other through <run_dir>/stacks/rank{rank}.pid
(host, pid and process start time, so a reused pid is never signalled); other machines' ranks end when
their torchrun does (srun --kill-on-bad-exit).

Stacks of a live rank on demand: `kill -USR2 <pid>` appends every thread's stack to the same file (no header
line; the process keeps running). The file is created when the watchdog starts and stays empty until a dump.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

# The exit code of a rank that the watchdog ends (EX_TEMPFAIL: a requeue may succeed).
EXIT_CODE = 75
# The longest the watchdog thread sleeps between two looks at the last beat, seconds.
MAX_POLL_S = 1.0
# How long the other local ranks get to write their stacks before they are killed, seconds.
PEER_DUMP_WAIT_S = 1.0


def stacks_path(run_dir: Path | str, rank: int) -> Path:
    return Path(run_dir) / "stacks" / f"rank{rank}.txt"


def process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), None if unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def local_peers(folder: Path, own: Path) -> list[int]:
    """Pids of the other ranks' processes on this machine, from their pid files, still the same processes."""
    peers = []
    for path in folder.glob("rank*.pid"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        same_process = record["start"] is not None and process_start(record["pid"]) == record["start"]
        if path != own and record["host"] == socket.gethostname() and same_process:
            peers.append(record["pid"])
    return peers


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class Watchdog:
    """Call beat(step) after every step; wrap long phases (evaluation, checkpoints) in paused().

    A context manager: entering starts the daemon thread and the SIGUSR2 dump, leaving stops both.
    timeout_s <= 0 disables it: every method is then a no-op.
    """

    def __init__(self, run_dir: Path | str, rank: int, timeout_s: float):
        self.path = stacks_path(run_dir, rank)
        self.pid_path = self.path.with_suffix(".pid")
        self.rank = rank
        self.timeout_s = timeout_s
        self.enabled = timeout_s > 0
        self.last_step: Optional[int] = None
        self._last_beat = time.monotonic()
        self._paused = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._file = None

    def __enter__(self) -> "Watchdog":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        faulthandler.register(signal.SIGUSR2, self._file, all_threads=True)
        pid = os.getpid()
        self.pid_path.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "start": process_start(pid)}))
        self._last_beat = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name=f"watchdog-rank{self.rank}", daemon=True)
        self._thread.start()
        log.info("watchdog: rank %d pid %d exits with code %d after %g s without a step; stacks go to %s "
                 "(kill -USR2 %d appends them now)", self.rank, os.getpid(), EXIT_CODE, self.timeout_s, self.path,
                 os.getpid())

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        faulthandler.unregister(signal.SIGUSR2)
        self._file.close()
        self.pid_path.unlink(missing_ok=True)

    def beat(self, step: Optional[int] = None) -> None:
        """Progress: the timeout starts again (step: the last finished step, for the dump's header)."""
        self._last_beat = time.monotonic()
        if step is not None:
            self.last_step = step

    @contextlib.contextmanager
    def paused(self):
        """No timeout inside (a phase of unknown length); the timeout starts again on leaving."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False
            self.beat()

    def seconds_since_beat(self) -> float:
        return time.monotonic() - self._last_beat

    def _watch(self) -> None:
        poll = min(self.timeout_s / 4, MAX_POLL_S)
        while not self._stop.wait(poll):
            if not self._paused and self.seconds_since_beat() > self.timeout_s:
                self._dump_and_exit()

    def _dump_and_exit(self) -> None:
        idle = self.seconds_since_beat()
        now = datetime.datetime.now().isoformat(timespec="seconds")
        self._file.write(f"{now} watchdog: rank {self.rank} pid {os.getpid()} made no progress for {idle:.1f} s "
                         f"(timeout {self.timeout_s:g} s) after step {self.last_step}; stacks of every thread:\n")
        self._file.flush()
        faulthandler.dump_traceback(self._file, all_threads=True)
        self._file.flush()
        log.error("rank %d made no progress for %.1f s after step %s: stacks of every thread in %s; exiting with "
                  "code %d", self.rank, idle, self.last_step, self.path, EXIT_CODE)
        self._end_local_peers()
        os._exit(EXIT_CODE)

    def _end_local_peers(self) -> None:
        peers = local_peers(self.path.parent, self.pid_path)
        if not peers:
            return
        signal_all(peers, signal.SIGUSR2)  # live ones append their stacks to their own files
        time.sleep(PEER_DUMP_WAIT_S)
        signal_all(peers, signal.SIGKILL)
        log.error("rank %d: killed the other ranks on this machine (pids %s) so the job ends now", self.rank, peers)
