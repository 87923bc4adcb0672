"""The job store's tables and engine: the single source of truth for models, datasets and jobs.

SQLite (WAL, busy timeout) is the embedded default; any SQLAlchemy URL, PostgreSQL via
``postgresql+psycopg://`` in production, works unchanged. The schema is brought to the latest
Alembic revision (``app/migrations/versions``) by the API and the admin commands at start-up
(:func:`make_sessionmaker`, ``clipguard.app.migrate``).
"""

from __future__ import annotations

import time
import uuid
import weakref
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite drops the zone, so it is stored naive UTC)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.astimezone(UTC).replace(tzinfo=None) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Model(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    arch: Mapped[str] = mapped_column(String(200))
    num_classes: Mapped[int] = mapped_column(Integer)
    mean: Mapped[list[float] | None] = mapped_column(JSON)
    std: Mapped[list[float] | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20))
    """awaiting_upload -> validating -> ready | rejected"""
    reject_reason: Mapped[str | None] = mapped_column(Text)
    upload_sha256: Mapped[str | None] = mapped_column(String(64))
    upload_size: Mapped[int | None] = mapped_column(BigInteger)
    canonical_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    """upload | path | registered"""
    name: Mapped[str | None] = mapped_column(String(200))
    ref: Mapped[str] = mapped_column(Text)
    """The server-side data reference handed to the engine (never shown to clients for uploads)."""
    sha256: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    state: Mapped[str] = mapped_column(String(20), index=True)
    """queued | running | succeeded | failed | cancelled"""
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    train_data_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    test_data_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    stage: Mapped[str | None] = mapped_column(String(50))
    percent: Mapped[float | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claim: Mapped[str | None] = mapped_column(String(32))
    """Token of the attempt that owns the job; writes from an older attempt are ignored."""
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    celery_task_id: Mapped[str | None] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Worker(Base):
    """A Celery worker consuming the job queue, as it last reported itself (``clipguard.worker.presence``).

    ``/readyz`` reads it: the broker accepting connections says nothing about whether anyone
    takes jobs from it. A worker that stops (killed, its host lost) stops beating, and its row
    goes stale; one shutting down cleanly deletes its row.
    """

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    """Celery's node name, ``name@host``."""
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class Artifact(Base):
    __tablename__ = "artifacts"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str] = mapped_column(String(100))


def make_engine(url: str, *, pooled: bool = True) -> Engine:
    """An engine with the settings each backend needs for several processes sharing one store.

    ``pooled=False`` keeps no connection open between uses: for a process that forks (the Celery
    worker's main process), whose children must not inherit a live database connection.
    """
    if not pooled:
        options: dict[str, Any] = {"poolclass": NullPool}
    elif url.startswith("sqlite"):
        options = {}
    else:
        options = {"pool_size": POOL_SIZE, "max_overflow": POOL_OVERFLOW}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **options)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets readers proceed while a worker writes; foreign keys are off by default in SQLite.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    engine = create_engine(url, **options)
    if pooled:
        _ping_when_idle(engine, PING_IDLE_AFTER_S)
    return engine


POOL_SIZE, POOL_OVERFLOW = 10, 10
"""Connections kept open per process, and how many more a burst may open (then close again).

SQLAlchemy's default (5 + 10) made a status-poll burst open and close a PostgreSQL connection
for most requests: every overflow connection is closed on return, and a connect costs the API
more CPU than the query it serves (bench/load.py, docs/lab/benchmarks.md). The hot read path is
capped at ``Settings.poll_threads`` (at most ``POOL_SIZE``) concurrent queries (``clipguard.app.routes.jobs``),
so it never overflows."""
PING_IDLE_AFTER_S = 1.0
"""A pooled connection unused this long is pinged before it is handed out (see ``_ping_when_idle``)."""


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Pre-ping, but only connections that sat idle for ``idle_s``; a dead one is replaced transparently.

    ``pool_pre_ping`` costs a round trip on *every* checkout, as much as the status poll's
    own query. Connections die while idle (a database restart or failover, a proxy's idle
    timeout); one checked in a moment ago was just used successfully. A connection that fails
    the ping raises ``DisconnectionError``, which makes the pool discard it and connect anew.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop("checked_in_at", None)
        if since is None or time.monotonic() - since < idle_s:  # just connected, or just used
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            raise DisconnectionError(f"pooled connection failed its ping: {exc}") from exc


def make_sessionmaker(url: str, *, migrate: bool = True) -> sessionmaker:
    """Sessions on ``url``; with ``migrate`` the schema is first brought to the latest Alembic revision.

    Workers pass ``migrate=False``: only the API and the admin commands change the schema, so
    processes starting together never race each other through a migration.
    """
    if migrate:
        from clipguard.app.migrate import upgrade

        upgrade(url)
    return sessionmaker(make_engine(url), expire_on_commit=False)


_readers: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()


def reader(sessions: sessionmaker) -> Engine:
    """The engine behind ``sessions`` in autocommit mode, for reads that are one statement.

    A session wraps even a single ``SELECT`` in ``BEGIN`` ... ``ROLLBACK``: three round trips
    to the database where one does. The status poll and the key lookup run once per request, so
    they read through this (same pool, same connections; the mode is switched on the client side).
    """
    engine: Engine = sessions.kw["bind"]
    found = _readers.get(engine)
    if found is None:
        found = _readers[engine] = engine.execution_options(isolation_level="AUTOCOMMIT")
    return found
