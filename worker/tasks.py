"""The purify task: claim the job row, run the engine's ``purify``, publish the artifacts.

torch and the engine are imported inside the task, never at module import, so the prefork
parent never touches CUDA before it forks (``clipguard.stages``, plain names, is the exception).
Only the job id travels in the message; every input is read from the job store, and everything
the API shows is written back there.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import signal
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from clipguard.app import store
from clipguard.app.db import Artifact, Dataset, Job, Model, make_sessionmaker
from clipguard.app.logs import binds_job
from clipguard.app.queues import PURIFY_TASK
from clipguard.app.settings import Settings, get_settings
from clipguard.app.storage import StorageError, StorageUnavailable, local_data_ref, storage_for
from clipguard.app.words import api_words
from clipguard.worker.celery_app import celery_app
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

from clipguard.files import file_sha256
from clipguard.methods import DEFAULTS
from clipguard.stages import Tracker

log = logging.getLogger("clipguard.worker")

MEDIA_TYPES = {
    "purified.pt": "application/octet-stream",
    "purified.pt2": "application/octet-stream",
    "bounds.safetensors": "application/octet-stream",
    "report.json": "application/json",
    "report.html": "text/html; charset=utf-8",
}
RUNNING_MAX_PERCENT = 99.0
"""The most a running job shows: the artifacts are stored after the engine is done; success alone says 100."""
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""Write errors that mean "out of room" (device full, quota, file-size limit): the job fails with that reason."""
OUTPUT_SIZE_FACTOR, OUTPUT_SIZE_MARGIN = 3, 4 * 1024**2
"""Room a job's outputs need: two exports of the weights (``.pt``, ``.pt2``) and change, plus the reports."""
PROGRESS_EVERY_S = 1.0
"""At most one progress write (and one cancel check) per second, whatever the batch rate."""


@lru_cache
def _sessions(url: str) -> sessionmaker:
    return make_sessionmaker(url, migrate=False)


# Retries are unbounded here on purpose: the job store bounds them. ``store.claim`` counts every delivery
# and fails the job with the last fault once ``max_attempts`` is spent; a Celery ``max_retries`` below that
# would drop the message while the row still says "queued" (released), and nothing would pick it up again.
@celery_app.task(
    name=PURIFY_TASK,
    bind=True,
    autoretry_for=(OperationalError, StorageUnavailable),
    retry_backoff=True,
    retry_backoff_max=get_settings().retry_backoff_max_s,
    retry_jitter=True,
    max_retries=None,
)
@binds_job  # every line this attempt logs, the engine's and the libraries' included, carries the job id
def purify_task(self: Any, job_id: str) -> None:
    """Run one attempt of a purify job. Safe to deliver twice: the claim decides who runs."""
    settings = get_settings()
    sessions = _sessions(settings.database_url)
    claim = store.claim(sessions, job_id, settings.max_attempts, task_id=self.request.id)
    if claim is None:
        return
    try:
        run_attempt(sessions, settings, claim)
    except OperationalError:
        # The job store blinked: give the job back and let Celery retry with backoff.
        store.release(sessions, claim)
        raise
    except StorageUnavailable as exc:  # the object store is down or throttling: the same, with the reason kept
        log.warning("job %s: %s; handing it back for a retry", claim.job_id, exc)
        store.release(sessions, claim, str(exc))
        raise
    except Exception as exc:  # never leave the row "running" behind a bug: fail it with a reason
        log.exception("job %s failed", claim.job_id)
        store.finish(sessions, claim, "failed", f"internal error ({type(exc).__name__}); see the worker log")


class _Interrupted(BaseException):
    """Raised in the job's thread by :class:`_Reporter`'s watchdog: a cancel the engine did not act on, or a stall.

    A ``BaseException``, like ``KeyboardInterrupt``, so no ``except Exception`` in the engine or a library
    mistakes it for a bad input and carries on.
    """

    def __init__(self, cancelled: bool, reason: str) -> None:
        super().__init__(reason)
        self.cancelled, self.reason = cancelled, reason


INTERRUPT_SIGNAL = signal.SIGUSR2
"""Sent to the job's own thread to interrupt it (Celery's pool uses SIGUSR1 for its soft time limit)."""


class _Reporter:
    """Throttled progress writes and cancel checks, plus a watchdog thread that keeps the heartbeat.

    The heartbeat is what the sweeper watches: a job whose heartbeat stops is one whose
    worker died, even if the broker never redelivers its message. It is written only while the
    engine shows signs of life (a progress report or a cancel check within ``stall_s``), so a job
    stuck in a read that never returns looks stuck, not alive. The watchdog also reads the cancel
    flag itself, and interrupts the job's thread (a signal, whose handler raises
    :class:`_Interrupted` even out of a blocking system call) when a cancel has gone unheeded for
    ``cancel_grace_s`` or the engine has been silent for ``stall_s``: cancel works in every stage.
    """

    def __init__(
        self,
        sessions: sessionmaker,
        claim: store.Claim,
        heartbeat_s: float,
        *,
        stall_s: float = math.inf,
        cancel_grace_s: float = math.inf,
    ) -> None:
        self.sessions, self.claim = sessions, claim
        self.stall_s, self.cancel_grace_s = stall_s, cancel_grace_s
        self._last_write = 0.0
        self._last_stage: str | None = None
        self.percent = Tracker(ceiling=RUNNING_MAX_PERCENT)
        """The job's overall percent; ``run_attempt`` narrows it to the stages the job's options give."""
        self._last_check = 0.0
        self._last_sign = time.monotonic()
        self._cancel = False
        self._interrupt: _Interrupted | None = None
        self._armed = False
        self._previous_handler: Any = None
        self._main = threading.get_ident()
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous_handler = signal.signal(INTERRUPT_SIGNAL, self._on_signal)
            self._armed = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(heartbeat_s,), daemon=True)
        self._thread.start()

    @property
    def stage(self) -> str | None:
        return self._last_stage

    def _on_signal(self, _signum: int, _frame: object) -> None:
        if self._armed and self._interrupt is not None:
            self._armed = False  # once
            raise self._interrupt

    def _watch(self, every: float) -> None:
        cancel_seen: float | None = None
        while not self._stop.wait(every):
            now = time.monotonic()
            quiet = now - self._last_sign
            try:
                if quiet < self.stall_s:
                    store.report_progress(self.sessions, self.claim)
                if cancel_seen is None and store.cancel_requested(self.sessions, self.claim):
                    cancel_seen = now
            except OperationalError:
                log.warning("heartbeat for job %s failed; will retry", self.claim.job_id)
            if cancel_seen is not None and now - cancel_seen >= self.cancel_grace_s:
                self._fire(_Interrupted(True, "cancelled"))
            elif quiet >= self.stall_s:
                self._fire(
                    _Interrupted(
                        False,
                        f"no progress for {int(quiet)} s in stage {self._last_stage or 'start'}"
                        f" (limit {self.stall_s:g} s); the job was stopped",
                    )
                )

    def _fire(self, interrupt: _Interrupted) -> None:
        if self._interrupt is None and self._armed:
            log.warning("job %s: interrupting it: %s", self.claim.job_id, interrupt.reason)
            self._interrupt = interrupt
            signal.pthread_kill(self._main, INTERRUPT_SIGNAL)

    def progress(self, stage: str, fraction: float) -> None:
        now = self._last_sign = time.monotonic()
        if stage == self._last_stage and now - self._last_write < PROGRESS_EVERY_S:
            return
        percent = self.percent(stage, fraction)
        if stage != self._last_stage:
            log.info("job %s: stage %s", self.claim.job_id, stage)
        self._last_stage, self._last_write = stage, now
        store.report_progress(self.sessions, self.claim, str(stage), percent)

    def should_cancel(self) -> bool:
        now = self._last_sign = time.monotonic()
        if not self._cancel and now - self._last_check >= PROGRESS_EVERY_S:
            self._last_check = now
            self._cancel = store.cancel_requested(self.sessions, self.claim)
        return self._cancel

    def stop(self) -> None:
        """Disarm first: from here on no interrupt is raised, even one already on its way."""
        self._armed = False
        self._stop.set()
        self._thread.join()
        if self._previous_handler is not None:
            signal.signal(INTERRUPT_SIGNAL, self._previous_handler)


def run_attempt(sessions: sessionmaker, settings: Settings, claim: store.Claim) -> None:
    """Run the engine for a claimed job and record how it ended."""
    reporter = _Reporter(
        sessions, claim, settings.heartbeat_s, stall_s=settings.stall_timeout_s, cancel_grace_s=settings.cancel_grace_s
    )
    try:
        _run_attempt(sessions, settings, claim, reporter)
    except _Interrupted as stop:  # raised in the engine, in a handler below, or in reporter.stop()
        reporter.stop()
        store.finish(
            sessions, claim, "cancelled" if stop.cancelled else "failed", None if stop.cancelled else stop.reason
        )


def _run_attempt(sessions: sessionmaker, settings: Settings, claim: store.Claim, reporter: _Reporter) -> None:
    from clipguard.data import trim_cache
    from clipguard.errors import Cancelled, ClipguardError
    from clipguard.purify import purify, stages_of
    from clipguard.threads import bound_threads

    job_dir = settings.jobs_dir / claim.job_id
    out = job_dir / f"attempt-{claim.attempt}"
    public = _Redactor(settings)
    try:
        options = _options(sessions, settings, claim.job_id, out, public)
        _check_room(settings.jobs_dir, options.weights)
        reporter.percent = Tracker(stages_of(options), ceiling=RUNNING_MAX_PERCENT)
        bound_threads(settings.threads)  # "auto" reads the load now, when the job starts, not when the child forked
        result = purify(options, progress=reporter.progress, should_cancel=reporter.should_cancel)
    except Cancelled:
        store.finish(sessions, claim, "cancelled")
        return
    except StorageUnavailable:
        raise  # transient: purify_task hands the job back
    except (ClipguardError, StorageError) as exc:
        store.finish(
            sessions, claim, "failed", public(exc.worded(api_words) if isinstance(exc, ClipguardError) else str(exc))
        )
        return
    except SoftTimeLimitExceeded:
        store.finish(sessions, claim, "failed", f"time limit exceeded ({settings.job_time_limit_s} s)")
        return
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        store.finish(sessions, claim, "failed", _memory_message(reporter, exc))
        return
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        # The engine wrote into a staging folder and removed it; free what this job still holds.
        why = f"no space left for the job's outputs in {settings.jobs_dir}: {exc.strerror}; nothing was published"
        if store.finish(sessions, claim, "failed", public(why)):
            _tidy(job_dir, keep=None)
        return
    finally:
        reporter.stop()
        trim_cache(settings.home / "cache", settings.cache_max_bytes)  # a failed job's decoded data too
    shared = storage_for(settings)  # S3: uploaded under the same key as their path below <home>
    try:
        artifacts = [
            _artifact(claim.job_id, p, shared.put_artifact(p, p.relative_to(settings.home).as_posix()))
            for p in sorted(result.out.iterdir())
            if p.name in MEDIA_TYPES
        ]
    except StorageUnavailable:
        raise
    except StorageError as exc:  # e.g. the bucket denies writes: retrying won't help
        store.finish(sessions, claim, "failed", f"{exc}; nothing was published")
        return
    if store.succeed(sessions, claim, artifacts, _summary(result.report)):
        _tidy(job_dir, keep=out)


def _check_room(jobs_dir: Path, weights: Path) -> None:
    """Refuse to start when the job folder cannot hold the outputs: raises ENOSPC with the figures.

    Not only an early answer: torch's checkpoint writer cannot report a full disk, it aborts
    the whole process (a C++ exception in a destructor). The attempt then looks like a lost
    worker and is retried until ``max_attempts``; this check gives the retry the real reason.
    """
    need = OUTPUT_SIZE_FACTOR * weights.stat().st_size + OUTPUT_SIZE_MARGIN
    st = os.statvfs(jobs_dir)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise OSError(errno.ENOSPC, f"{free} bytes free, the outputs need about {need}")


def _tidy(job_dir: Path, keep: Path | None) -> None:
    """Remove every attempt folder of a finished job but ``keep``, staging ones included.

    An attempt killed mid-export (``kill -9``, a lost machine) leaves the engine's hidden
    staging folder ``.attempt-N.*`` behind, since its cleanup never ran; once the job is
    finished no attempt can still be writing, so whatever is not the published output goes.
    """
    for path in job_dir.glob("*attempt-*"):
        if path != keep and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


class _Redactor:
    """Job errors as the client may see them: server paths replaced by what the client calls those inputs.

    The engine names a file in its errors (``<blobs>/<sha256>.tar.gz: unreadable tar archive``);
    the client knows it as its dataset, and must not learn where the server keeps it.
    """

    def __init__(self, settings: Settings) -> None:
        self.names: dict[str, str] = {}
        self.home = str(settings.home)

    def add(self, path: str | Path, label: str, *, blob: bool = False) -> str:
        """Remember ``path`` (a data reference, ``#split`` allowed) as ``label``; returns ``path`` unchanged.

        A blob's file name (``<sha256><suffix>``, which the engine's archive errors show alone) is
        replaced too; other file names are the client's own and may be ordinary words."""
        text = str(path).partition("#")[0]
        self.names[text] = label
        if blob:
            self.names.setdefault(Path(text).name, label)
        return str(path)

    def __call__(self, message: str) -> str:
        for text in sorted(self.names, key=len, reverse=True):  # whole paths before their file names
            message = message.replace(text, self.names[text])
        return message.replace(self.home, "<server>")


def _dataset_label(dataset: Dataset) -> str:
    return f"dataset {dataset.name!r}" if dataset.name else f"dataset {dataset.id}"


def _out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: Python's and numpy's MemoryError, torch's allocator errors (host and GPU)."""
    text = str(exc)
    return (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or "can't allocate memory" in text
        or "not enough memory" in text
    )


def _memory_message(reporter: _Reporter, exc: BaseException) -> str:
    import resource

    soft = resource.getrlimit(resource.RLIMIT_DATA)[0]
    gpu = type(exc).__name__ == "OutOfMemoryError"
    where = (
        "GPU memory"
        if gpu
        else (
            f"the job's memory limit of {soft} bytes (CLIPGUARD_WORKER_MEMORY_BYTES)"
            if soft != resource.RLIM_INFINITY
            else "the machine's memory"
        )
    )
    return (
        f"memory limit exceeded in stage {reporter.stage or 'start'}: the job needed more than {where}; "
        "use less or smaller data, or a smaller batch"
    )


def _options(sessions: sessionmaker, settings: Settings, job_id: str, out: Path, public: _Redactor) -> Any:
    """The engine options for a job, built only from the job store and the canonical weights."""
    from clipguard.data import Limits
    from clipguard.purify import PurifyOptions

    with sessions() as s:
        job = s.get_one(Job, job_id)
        model = s.get_one(Model, job.model_id)
        train = s.get_one(Dataset, job.train_data_id)
        test = s.get(Dataset, job.test_data_id) if job.test_data_id else None
    shared = storage_for(settings)
    weights = shared.get_blob(settings.blobs_dir / f"{model.canonical_sha256}.safetensors")
    public.add(weights, "the model's weights", blob=True)
    return PurifyOptions(
        # Inputs come through the storage: on S3 this host fetches the blobs it lacks into its own <home>.
        arch=model.arch,
        weights=weights,
        data=public.add(
            local_data_ref(shared, train.ref, train.kind), _dataset_label(train), blob=train.kind == "upload"
        ),
        out=out,
        num_classes=model.num_classes,
        mean=tuple(model.mean) if model.mean else None,
        std=tuple(model.std) if model.std else None,
        # A job created before the API had `method` ran the engine's default, guard.
        method=job.params.get("method", DEFAULTS.method),
        lam=job.params.get("lam"),
        granularity=job.params.get("granularity", DEFAULTS.granularity),
        device=settings.device,
        eval_data=public.add(
            local_data_ref(shared, test.ref, test.kind), _dataset_label(test), blob=test.kind == "upload"
        )
        if test
        else None,
        # A spec string or an attack record: rebuilt from parameters alone, no file is looked up or read for it.
        attack=job.params.get("attack"),
        attack_files=False,
        cache_dir=settings.home / "cache",
        overwrite=True,
        bounds_samples=job.params.get("bounds_samples"),  # None (not given): the engine's default
        resize=bool(job.params.get("resize", False)),
        data_limits=Limits(
            max_decoded_bytes=settings.max_decoded_bytes, max_resident_bytes=settings.max_resident_bytes
        ),
        cache_max_bytes=settings.cache_max_bytes,
        reactivation_check=bool(job.params.get("reactivation_check", False)),
    )


def _artifact(job_id: str, path: Path, location: str) -> Artifact:
    return Artifact(
        job_id=job_id,
        name=path.name,
        path=location,
        sha256=file_sha256(path),
        size=path.stat().st_size,
        media_type=MEDIA_TYPES[path.name],
    )


def _summary(report: dict) -> dict:
    """What a client wants at a glance (``clipguard.report.Summary``, the API's ``JobOut.summary``).

    ``report`` is what ``purify`` published: checked against ``clipguard.report.Report``, its
    non-finite numbers already null (JSON has no NaN and PostgreSQL's json type refuses it).
    """
    from clipguard.report import Report, summarize

    return summarize(Report.model_validate(report)).model_dump(mode="json", by_alias=True)
