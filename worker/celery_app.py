"""The Celery application: broker from ``CLIPGUARD_BROKER_URL``, reliability settings for long GPU jobs.

Start a GPU worker with::

    CUDA_VISIBLE_DEVICES=0 celery -A clipguard.worker.celery_app:celery_app worker -Q gpu -c 1 -P prefork -n gpu0@%h

(one worker per GPU; ``max_tasks_per_child=1`` recycles the child after each job so the CUDA
context and allocator cache go with it). The application
itself is built by ``clipguard.app.queues.make_celery``, which the API shares; this module adds the worker
process's signal handlers.
"""

from __future__ import annotations

import contextlib
import os
import resource
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery import Celery, signals
from clipguard.app.queues import make_celery
from clipguard.app.settings import Settings, get_settings


@signals.setup_logging.connect
def _setup_logging(loglevel: int | None = None, **_: Any) -> None:
    """The worker logs like the API (``CLIPGUARD_LOG_FORMAT``); connecting here replaces Celery's own setup."""
    from clipguard.app.logs import configure

    configure(get_settings().log_format, loglevel or "INFO")


@signals.worker_init.connect
def _preload_engine(**_: Any) -> None:
    """Import the engine (and torch) once, in the worker's main process, before the pool forks.

    Each job runs in a fresh pool child (``max_tasks_per_child=1``); forked from a parent that
    already holds torch, a child starts its job at once instead of importing it again (about
    2 s of CPU per job on a 2-core machine). Importing runs no torch op and touches no GPU, so
    the children inherit no threads and no CUDA context: recycling them still frees both.
    """
    import clipguard.purify  # noqa: F401


def job_memory_limit(settings: Settings) -> int | None:
    """Bytes a job's process may hold (``Settings.worker_memory_bytes``; by default three quarters of the
    machine's memory, or of the container's where a cgroup limit is lower); None: no limit."""
    if settings.worker_memory_bytes is not None:
        return settings.worker_memory_bytes or None
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):
        total = min(total, int(Path("/sys/fs/cgroup/memory.max").read_text().strip()))  # "max": no cgroup limit
    return total * 3 // 4


@signals.worker_process_init.connect
def _limit_job_memory(**_: Any) -> None:
    """Cap the memory of each pool process (one per job: ``max_tasks_per_child=1``) with ``RLIMIT_DATA``.

    A job that would take the machine (a dataset that decodes to more than it has, a runaway
    allocation) then gets a failed allocation, which the task turns into a failed job saying
    "memory limit exceeded", and the worker lives on. ``RLIMIT_DATA`` rather than ``RLIMIT_AS``:
    it counts the memory a process writes to (heap, anonymous mappings), not address space that
    is only reserved, which CUDA reserves by the terabyte.
    """
    limit = job_memory_limit(get_settings())
    if limit is None:
        return
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
    resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


_presence: list = []


@signals.worker_ready.connect
def _announce(sender: Any = None, **_: Any) -> None:
    """Beat this worker's row in the job store (``clipguard.app.presence``) from its main process, for ``/readyz``."""
    from clipguard.app.db import make_engine
    from clipguard.app.presence import Presence
    from sqlalchemy.orm import sessionmaker

    settings = get_settings()
    sessions = sessionmaker(make_engine(settings.database_url, pooled=False))  # nothing open when the pool forks
    name = getattr(sender, "hostname", None) or f"worker-{os.getpid()}"
    _presence.append(Presence(sessions, name, settings.heartbeat_s).start())


@signals.worker_shutdown.connect
def _withdraw(**_: Any) -> None:
    while _presence:
        _presence.pop().stop()


@lru_cache
def _default_app() -> Celery:
    return make_celery(get_settings())


def __getattr__(name: str) -> Any:
    """``celery_app`` is built on first use, so importing the task names reads no settings."""
    if name == "celery_app":
        return _default_app()
    raise AttributeError(name)
