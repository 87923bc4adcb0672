"""Quarantine: turn an untrusted upload into canonical safetensors in a short-lived subprocess.

The parent (the API) never parses the upload. It starts ``python -m clipguard.app.quarantine`` with a
scrubbed environment (no credentials, no GPU, ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``); the
child lowers its own resource limits (address space, CPU time, file size, open files, no
core dumps) *before* importing torch or opening the upload, then calls the engine's
``canonicalize``, which loads weights only and checks keys, shapes and finiteness against
the architecture. This is the only module of ``app`` that imports torch, and only in the child.
The limits are set by the child rather than through ``preexec_fn`` because the parent is a
multi-threaded server, where ``preexec_fn`` is unsafe.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ENV_KEEP = ("PATH", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH")
log = logging.getLogger("clipguard.api")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    sha256: str | None = None
    reason: str | None = None


def quarantine(
    upload: Path,
    *,
    arch: str,
    num_classes: int,
    mean: list[float] | None,
    std: list[float] | None,
    blobs: Path,
    tmp: Path,
    timeout_s: int,
    memory_bytes: int,
) -> Verdict:
    """Check ``upload`` and, if it passes, store its canonical form as ``blobs/<sha256>.safetensors``."""
    staged = tmp / f"{uuid.uuid4().hex}.safetensors"
    request = {
        "upload": str(upload),
        "arch": arch,
        "num_classes": num_classes,
        "mean": mean,
        "std": std,
        "out": str(staged),
        "cpu_s": timeout_s,
        "memory_bytes": memory_bytes,
        "file_bytes": 4 * upload.stat().st_size + 2**20,
    }
    env = {k: os.environ[k] for k in ENV_KEEP if k in os.environ}
    env.update(CUDA_VISIBLE_DEVICES="", TORCH_FORCE_WEIGHTS_ONLY_LOAD="1", OMP_NUM_THREADS="1", HOME=str(tmp))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "clipguard.app.quarantine", json.dumps(request)],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        staged.unlink(missing_ok=True)
        return Verdict(False, reason=f"checking the checkpoint took longer than {timeout_s} s")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        staged.unlink(missing_ok=True)
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        return Verdict(False, reason=f"the checkpoint could not be checked within the resource limits ({why})")
    answer = json.loads(lines[-1])
    if not answer["ok"]:
        return Verdict(False, reason=answer["reason"])
    os.replace(staged, blobs / f"{answer['sha256']}.safetensors")
    return Verdict(True, sha256=answer["sha256"])


def _limit_self(cpu_s: int, memory_bytes: int, file_bytes: int) -> None:
    import resource

    for which, value in (
        (resource.RLIMIT_AS, memory_bytes),
        (resource.RLIMIT_CPU, cpu_s),
        (resource.RLIMIT_FSIZE, file_bytes),
        (resource.RLIMIT_NOFILE, 256),
        (resource.RLIMIT_CORE, 0),
    ):
        hard = resource.getrlimit(which)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))  # hard limit too, so the child cannot raise it back


def _child(request: dict) -> dict:
    _limit_self(request["cpu_s"], request["memory_bytes"], request["file_bytes"])
    from clipguard.app.words import api_words

    from clipguard.checkpoint import canonicalize
    from clipguard.errors import ClipguardError
    from clipguard.models import resolve_spec

    try:
        spec = resolve_spec(request["arch"], request["num_classes"], request["mean"], request["std"])
        return {"ok": True, "sha256": canonicalize(request["upload"], spec, request["out"])}
    except ClipguardError as exc:
        return {"ok": False, "reason": exc.worded(api_words)}


class QueueFull(Exception):
    """The tenant already has as many checkpoints waiting or in quarantine as one tenant may."""


class QuarantineQueue:
    """Where checkpoint checks wait for a slot: ``concurrency`` threads of their own, tenants served in turn.

    Why not FastAPI's background tasks: those run on the thread pool every synchronous route also
    runs on, so a burst of uploads (each check holds a thread for seconds to minutes, and a
    subprocess with gigabytes of address space) queued everyone's requests behind it and ran any
    number of checks at once. Here at most ``concurrency`` checks run; a tenant may hold at most
    ``per_tenant`` places (waiting or running) and the next upload gets 429; and the threads take
    tenants round-robin, so one tenant's burst delays another tenant's check by at most one check
    per running slot. ``peak`` is the most checks that have run at once.
    """

    def __init__(self, concurrency: int, per_tenant: int) -> None:
        self.concurrency, self.per_tenant = concurrency, per_tenant
        self._cond = threading.Condition()
        self._waiting: OrderedDict[str, deque[Callable[[], None]]] = OrderedDict()
        self._held: Counter[str] = Counter()
        self.running = self.peak = 0
        self._closed = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"clipguard-quarantine-{i}", daemon=True)
            for i in range(concurrency)
        ]
        for thread in self._threads:
            thread.start()

    def reserve(self, tenant: str) -> None:
        """Take one of the tenant's places before its upload is stored; QueueFull when it has none left."""
        with self._cond:
            if self._held[tenant] >= self.per_tenant:
                raise QueueFull(tenant)
            self._held[tenant] += 1

    def unreserve(self, tenant: str) -> None:
        """Give back a place whose upload failed before it was submitted."""
        with self._cond:
            self._held[tenant] -= 1

    def submit(self, tenant: str, check: Callable[[], None], *, reserved: bool = True) -> None:
        """Queue ``check`` in the tenant's place (``reserved=False``: one taken now, beyond the cap, for a check
        resumed after a restart)."""
        with self._cond:
            if not reserved:
                self._held[tenant] += 1
            self._waiting.setdefault(tenant, deque()).append(check)
            self._cond.notify()

    def close(self, wait_s: float) -> None:
        """Take no more checks and wait up to ``wait_s`` for the running ones (the API is stopping). A check
        cut off here, or still waiting, leaves its model ``validating``: the next start checks it again."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while self.running and time.monotonic() < deadline:
                self._cond.wait(timeout=max(deadline - time.monotonic(), 0.01))

    def _next(self) -> tuple[str, Callable[[], None]] | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            tenant, checks = self._waiting.popitem(last=False)  # the tenant served longest ago
            check = checks.popleft()
            if checks:
                self._waiting[tenant] = checks  # back of the line
            self.running += 1
            self.peak = max(self.peak, self.running)
            return tenant, check

    def _serve(self) -> None:
        while (taken := self._next()) is not None:
            tenant, check = taken
            try:
                check()
            except Exception as exc:
                if self._closed:  # the process is going down under it; the check is run again at the next start
                    log.warning("a quarantine check was cut off by shutdown (%s: %s)", type(exc).__name__, exc)
                else:
                    log.exception("a quarantine check failed unexpectedly")
            finally:
                with self._cond:
                    self.running -= 1
                    self._held[tenant] -= 1
                    self._cond.notify_all()


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
