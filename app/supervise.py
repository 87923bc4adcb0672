"""The worker ``clipguard serve`` embeds: restarted when it dies, killed when ``serve`` dies, one per home.

Three failures this guards against, each seen with a bare ``subprocess.Popen``:

* the worker is killed (OOM killer, ``kill -9``): jobs were accepted and sat ``queued`` for ever.
  A supervisor thread restarts it, after a pause that doubles up to ``MAX_BACKOFF_S`` while it keeps
  dying young; ``/readyz`` says 503 meanwhile (``clipguard.app.presence``).
* ``serve`` is killed: the worker lived on as an orphan, still running jobs. The child asks the
  kernel for ``SIGKILL`` when its parent thread ends (``PR_SET_PDEATHSIG``) before it becomes the
  Celery worker, and Celery's pool processes ask the same of it. A job cut off this way is
  requeued by the sweeper once its heartbeat is stale, like any lost worker's.
* a second ``serve`` started on the same home while an orphan still ran: two jobs at once on a setup
  meant to run one. The child holds an exclusive ``flock`` on ``<home>/embedded-worker.lock`` for the
  worker's whole life (the descriptor survives ``exec``), and waits for it before starting.

The kernel sends the parent-death signal when the *thread* that forked the child ends, so the
supervisor thread starts every worker and is also the one that stops it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("clipguard.serve")
PR_SET_PDEATHSIG = 1
MAX_BACKOFF_S = 60.0
HEALTHY_AFTER_S = 60.0
"""A worker that ran this long before dying is restarted at once; one dying sooner, after a growing pause."""
STOP_TIMEOUT_S = 30.0


class EmbeddedWorker:
    """One supervised Celery worker process consuming the ``gpu`` queue (``-c 1``)."""

    def __init__(self, home: Path, celery_args: list[str]) -> None:
        self.lock = home / "embedded-worker.lock"
        self.celery_args = celery_args
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="clipguard-worker-supervisor", daemon=True)

    def start(self) -> EmbeddedWorker:
        self._thread.start()
        return self

    def _spawn(self) -> None:
        argv = [sys.executable, "-m", "clipguard.app.supervise", str(os.getpid()), str(self.lock), *self.celery_args]
        self.proc = subprocess.Popen(argv)
        self.starts += 1

    def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            started = time.monotonic()
            self._spawn()
            assert self.proc is not None
            while self.proc.poll() is None:
                if self._stopping.wait(0.5):
                    self._terminate()
                    return
            lived = time.monotonic() - started
            backoff = 1.0 if lived >= HEALTHY_AFTER_S else min(backoff * 2, MAX_BACKOFF_S)
            log.error(
                "the embedded worker exited (%s) after %.0f s; starting another in %.0f s",
                _status(self.proc.returncode),
                lived,
                backoff,
            )
            if self._stopping.wait(backoff):
                return

    def _terminate(self) -> None:
        """Warm shutdown (the running job finishes, up to ``STOP_TIMEOUT_S``), then kill."""
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()


def _status(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _die_with(parent: int) -> None:
    """Ask for SIGKILL when the thread that started us ends; if it already has, go now."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _child(parent: int, lock_path: str, celery_args: list[str]) -> None:
    """Become the embedded worker: die with the parent, take the home's worker lock, exec Celery."""
    _die_with(parent)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"clipguard: another embedded worker holds {lock_path}; waiting for it to exit", file=sys.stderr)
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.set_inheritable(fd, True)  # held by the worker for its whole life, released when it exits
    os.execv(sys.executable, [sys.executable, "-m", "celery", *celery_args])


if __name__ == "__main__":
    _child(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
