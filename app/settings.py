"""Service configuration, read once from ``CLIPGUARD_*`` environment variables.

Defaults give the embedded single-machine setup (SQLite job store, SQLite-backed Celery
transport, files under ``~/.clipguard``); pointing ``CLIPGUARD_DATABASE_URL`` at PostgreSQL
and ``CLIPGUARD_BROKER_URL`` at Redis gives the production topology with the same code.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLIPGUARD_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".clipguard")
    database_url: str = ""
    """Empty means ``sqlite:///<home>/clipguard.sqlite``."""
    broker_url: str = ""
    """Empty means kombu's SQLAlchemy transport on ``<home>/broker.sqlite`` (no Redis needed)."""
    max_upload_bytes: int = 2 * 1024**3
    data_roots: list[Path] = []
    """Server folders a dataset may be referenced from by path; everything else is refused."""
    datasets: dict[str, str] = {}
    """Operator-registered dataset names -> data references, e.g. ``{"cifar10-train": "/d/c.tar.gz#train"}``."""
    job_time_limit_s: int = 4 * 3600
    max_attempts: int = Field(3, ge=1)
    """Deliveries a job gets (worker lost, job store or object storage down) before it fails with the reason.
    The job store counts them (``clipguard.app.store.claim``), not Celery: no job is left queued by a retry limit."""
    retry_backoff_max_s: int = Field(600, ge=1)
    """Longest wait before a job handed back after a transient fault is tried again (the wait doubles from
    1 s, with jitter). Read by the worker at start."""
    heartbeat_s: float = 10.0
    stale_after_s: float = 120.0
    """A running job whose heartbeat is older than this is redelivered (or failed after max_attempts)."""
    sweep_every_s: float = 30.0
    staging_max_age_s: float = 3600.0
    """Upload staging files untouched this long are abandoned (the API died mid-upload) and deleted."""
    quarantine_timeout_s: int = 300
    quarantine_memory_bytes: int = 8 * 1024**3
    quarantine_concurrency: int = Field(1, ge=1, le=64)
    """Checkpoint checks each API process runs at once (each a subprocess of up to ``quarantine_memory_bytes``),
    in threads of their own: a burst of uploads queues here, never on the thread pool the routes use."""
    quarantine_queue_per_tenant: int = Field(4, ge=1)
    """Checkpoints one tenant may have waiting or being checked in an API process; beyond it an upload gets
    429. The queue serves tenants in turn, so one tenant's burst does not hold back the others'."""
    max_header_bytes: int = Field(64 * 1024, ge=4096)
    """Request line and headers together; more gets 431 before it is buffered (``clipguard.app.server``)."""
    max_decoded_bytes: int = Field(4 * 1024**3, ge=1)
    """What a dataset may decode to (images, labels, names), checked from declared sizes before allocating."""
    max_resident_bytes: int = Field(1024**3, ge=0)
    """A dataset folder under ``DATA_ROOTS`` whose images would decode to more than this is streamed: read a
    batch at a time as the job's stages use it (``clipguard.streaming``), so a job's memory does not grow with
    it. Uploaded archives always decode whole (under ``max_decoded_bytes``)."""
    worker_memory_bytes: int | None = Field(None, ge=0)
    """Memory (RLIMIT_DATA) of each job's process: past it the job fails with "memory limit exceeded" and the
    worker lives on. None: three quarters of the machine's memory; 0: no limit."""
    cache_max_bytes: int = Field(10 * 1024**3, ge=0)
    """The workers' decoded-data cache (``<home>/cache``) is trimmed to this, least recently used first."""
    stall_timeout_s: float = Field(1800.0, gt=0)
    """A job whose engine reports no progress for this long is stopped and failed, and its heartbeat stops
    meanwhile: a read that never returns cannot hold a worker until ``job_time_limit_s``."""
    cancel_grace_s: float = Field(30.0, gt=0)
    """A running job that has not stopped this long after a cancel request is interrupted wherever it is."""
    ready_requires_worker: bool = True
    """``/readyz`` answers 503 while no worker has sent a heartbeat within ``3 * heartbeat_s``."""
    upload_retention_s: float = Field(86400.0, ge=0)
    """A checkpoint upload is kept this long after quarantine decided (canonical weights are kept while used)."""
    tenant_quota_bytes: int = Field(50 * 1024**3, ge=0)
    """Bytes one tenant may store (uploads and job artifacts); 0: no quota. Past it uploads and new jobs get 403."""
    device: str = "auto"
    threads: str = Field("auto", pattern=r"^(auto|all|[1-9][0-9]*)$")
    """CPU threads each job's torch uses (``clipguard.threads``): ``auto`` takes the cores other processes
    leave free when the job starts (at least one), ``all`` every core, or a number. A team larger than the
    free cores waits at every operation for a thread the scheduler set aside (API and worker share a machine)."""
    rate_limit_per_minute: int = Field(600, ge=0)
    """Requests per API key and minute (429 beyond); 0 turns the limit off. 600 leaves a client polling
    every second ten times the room it needs."""
    key_cache_ttl_s: float = Field(5.0, ge=0)
    """How long an API process trusts a key it looked up (``clipguard.app.auth.KeyCache``); 0 looks up every request.
    A key revoked by another process (``clipguard keys revoke``, another replica) is refused within this."""
    poll_threads: int = Field(2, ge=1, le=10)  # at most clipguard.app.db.POOL_SIZE: a thread needs a connection
    """Status polls each API process runs at once in its thread pool (``clipguard.app.routes.jobs.get_job``). Few is
    fast: the poll's query is sub-millisecond, and more threads only fight the event loop for the GIL
    (docs/lab/benchmarks.md, "Service load"). Raise it where the database is far away."""
    poll_reader: Literal["async", "thread"] = "async"
    """``async``: status polls read on the event loop through psycopg's async pool when the job store is
    ``postgresql+psycopg`` and ``psycopg-pool`` is installed (``clipguard.app.async_reads``; the read costs a quarter
    of the thread path's CPU, a whole poll 0.5 ms instead of 0.8), with ``poll_threads`` connections per
    process; anything else falls back to ``thread``: SQLAlchemy in a thread. Choose ``thread`` behind a
    connection pooler that cannot hold prepared statements (psycopg prepares a statement after its fifth
    run on a connection)."""
    ratelimit_url: str = ""
    """Where the per-key counters live; empty means the broker when it is Redis (shared by all API
    replicas), else in process (``memory://``)."""
    log_format: Literal["json", "text"] = "text"
    """``json``: one JSON object per log line, with the job id (app/logs.py); the image sets it."""
    storage_url: str = ""
    """Where blobs and artifacts are shared between hosts: empty means the folder ``<home>`` itself
    (one filesystem for API and workers), ``s3://bucket/prefix`` an S3-compatible object store."""
    s3_endpoint_url: str = ""
    """S3 API endpoint, e.g. ``http://seaweedfs:8333``; empty means AWS."""
    s3_public_url: str = ""
    """Endpoint written into presigned download URLs (what clients can reach); empty: ``s3_endpoint_url``."""
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""
    """Empty: boto3's own credential chain (``AWS_*`` variables, instance role, ...)."""
    s3_secret_access_key: SecretStr = SecretStr("")
    presign_expiry_s: int = Field(900, ge=1, le=7 * 86400)
    """Lifetime of the presigned URL an artifact download redirects to (S3 storage only)."""

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        self.home = self.home.expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'clipguard.sqlite'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.home / 'broker.sqlite'}"
        return self

    @property
    def blobs_dir(self) -> Path:
        return self.home / "blobs"

    @property
    def tmp_dir(self) -> Path:
        """Staging for uploads; on the same filesystem as the blob store so ``os.replace`` is atomic."""
        return self.home / "tmp"

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    def ensure_dirs(self) -> None:
        for d in (self.home, self.blobs_dir, self.tmp_dir, self.jobs_dir):
            d.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    settings = Settings()
    settings.ensure_dirs()
    return settings
