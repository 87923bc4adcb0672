"""How many CPU threads one job's torch may use.

torch's CPU kernels split each operation across an OpenMP team, and every operation ends at a
barrier where the team waits for its slowest thread. With the cores to itself that is fast; with
another process on the same cores (``clipguard serve`` runs the API and a worker on one machine,
and the worker can run beside anything) a team as large as the machine waits at every barrier for
a thread the scheduler has set aside. The passes that cut their work into many small operations
(the fast statistics path's cache-sized pieces) suffer most: each piece is a dozen barriers.

So a job's thread count is bounded, never left at torch's default of every core:

* ``auto`` (the default): the cores this process may run on, less the ones other processes
  keep busy when the job starts (:func:`busy_cores`), never fewer than one. On an idle machine
  that is every core, as before; beside a process burning the cores it is one.
* a number: exactly that many threads (a worker running ``-c N`` jobs on a machine would use
  ``cores // N``).
* ``all``: every usable core, torch's own default.

The inter-op pool (threads that run independent operators at once, unused by these sequential
passes) is bounded to the same number, where torch still allows it (before its first use).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from clipguard.errors import ClipguardError

THREADS_ENV = "CLIPGUARD_THREADS"
"""The default of ``--threads`` and of the worker's ``Settings.threads``."""


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and ``taskset`` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def busy_cores(samples: int = 5, every_s: float = 0.01) -> float:
    """Cores other processes keep busy now: the median of a few reads of the kernel's count of
    runnable threads, less the reading one. The load average would be simpler, but it remembers
    the last minute: a command started right after another on an idle machine would take one core.
    Where there is no ``/proc/loadavg``, the one-minute load average; 0 when neither is known."""
    counts = []
    for i in range(samples):
        try:
            counts.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            break
        if i + 1 < samples:
            time.sleep(every_s)
    if counts:
        return max(0.0, float(statistics.median(counts)))
    try:
        return max(0.0, os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def parse_threads(value: int | str | None) -> int | str:
    """``auto``, ``all`` or a positive whole number; None means ``auto``."""
    if value is None:
        return "auto"
    if isinstance(value, int):
        n = value
    else:
        text = str(value).strip().lower()
        if text in ("auto", "all"):
            return text
        try:
            n = int(text)
        except ValueError:
            raise ClipguardError(f"threads must be auto, all or a whole number, got {value!r}") from None
    if n < 1:
        raise ClipguardError(f"threads must be at least 1, got {n}")
    return n


def choose_threads(value: int | str | None = None, *, cores: int | None = None, busy: float | None = None) -> int:
    """The thread count ``value`` means on this machine now (see the module doc)."""
    setting = parse_threads(value)
    cores = usable_cores() if cores is None else cores
    if setting == "all":
        return cores
    if setting == "auto":
        busy = busy_cores() if busy is None else busy
        return max(1, min(cores, cores - round(busy)))
    return int(setting)


def bound_threads(value: int | str | None = None) -> int:
    """Bound this process's torch to :func:`choose_threads` threads (intra- and, where still possible,
    inter-op); returns the count. ``value`` None reads ``CLIPGUARD_THREADS`` (default ``auto``)."""
    import torch

    if value is None:
        value = os.environ.get(THREADS_ENV) or "auto"
    n = choose_threads(value)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # the inter-op pool has started (or been sized) already: it stays as it is
        pass
    return n
