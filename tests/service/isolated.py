"""A live service (uvicorn + a Celery worker) with a PostgreSQL database and a Redis db of its own.

For test modules whose jobs must not show up in another module's job store, queue or ``/metrics``
counts (the shared ``live`` fixture's database lasts the whole session).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import redis

from .conftest import PG_ADMIN, LiveService, redis_db_url


@contextlib.contextmanager
def isolated_live(home: Path, tag: str, redis_db: int) -> Iterator[LiveService]:
    name = f"clipguard_{tag}_{os.getpid()}"
    broker = redis.Redis.from_url(redis_db_url(redis_db))
    broker.flushdb()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    service = LiveService(home, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", redis_db_url(redis_db))
    try:
        service.start()
        yield service
    finally:
        service.stop()
        broker.flushdb()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
