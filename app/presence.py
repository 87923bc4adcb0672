"""Which workers consume the job queue: each beats a row in the job store, ``/readyz`` counts the fresh ones.

Why the job store and not Celery's own ``inspect``/``ping``: those are broadcast over the broker,
which the embedded transport (kombu's SQLAlchemy one) cannot do, and they cost a round trip to
every worker on every probe. A row per worker, written every ``heartbeat_s`` by a thread in the
worker's main process (the one that takes messages off the queue, not the per-job child), works
on every broker and is one indexed query to read.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import timedelta

from clipguard.app.db import Worker, utcnow
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import sessionmaker

log = logging.getLogger("clipguard.worker")
FRESH_BEATS = 3
"""A worker counts as consuming the queue while its last heartbeat is younger than this many intervals."""


def beat(sessions: sessionmaker, name: str, pid: int) -> None:
    """Record that worker ``name`` is alive now (insert on its first beat)."""
    with sessions.begin() as s:
        if not s.execute(update(Worker).where(Worker.name == name).values(heartbeat_at=utcnow(), pid=pid)).rowcount:
            s.add(Worker(name=name, pid=pid))


def forget(sessions: sessionmaker, name: str) -> None:
    """A worker shutting down cleanly removes itself."""
    with sessions.begin() as s:
        s.execute(delete(Worker).where(Worker.name == name))


def forget_stale(sessions: sessionmaker, older_than_s: float) -> int:
    """Remove the rows of workers silent for ``older_than_s`` (killed ones never remove their own)."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    with sessions.begin() as s:
        return s.execute(delete(Worker).where(Worker.heartbeat_at < cutoff)).rowcount


def live_workers(sessions: sessionmaker, heartbeat_s: float) -> int:
    """Workers whose heartbeat is fresh: younger than ``FRESH_BEATS * heartbeat_s``."""
    cutoff = utcnow() - timedelta(seconds=FRESH_BEATS * heartbeat_s)
    with sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Worker).where(Worker.heartbeat_at >= cutoff)) or 0)


class Presence:
    """The heartbeat thread of one worker process; :meth:`stop` removes its row."""

    def __init__(self, sessions: sessionmaker, name: str, every_s: float) -> None:
        self.sessions, self.name, self.every_s = sessions, name, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clipguard-presence", daemon=True)

    def start(self) -> Presence:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                beat(self.sessions, self.name, os.getpid())
            except Exception as exc:  # the job store is down: readiness says so once the row goes stale
                log.warning("worker heartbeat failed (%s: %s); will retry", type(exc).__name__, exc)
            if self._stop.wait(self.every_s):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            forget(self.sessions, self.name)
        except Exception as exc:
            log.warning("could not remove worker %s from the job store (%s); its row goes stale", self.name, exc)
