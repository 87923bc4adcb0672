"""A live service (uvicorn + a Celery worker) with a PostgreSQL database and a Redis db of its own.

For test modules whose jobs must not show up in another module's job store, queue or ``/metrics``
counts (the shared ``live`` fixture's database lasts the whole session).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import psycopg
import redis

from .conftest import PG_ADMIN, LiveService, redis_db_url


@contextlib.contextmanager
def isolated_live(tag: str, redis_db: int, make: Callable[[str, str], LiveService]) -> Iterator[LiveService]:
    """``make(database_url, broker_url)``'s service, started on a new database and a flushed Redis db; both go after."""
    name = f"clipguard_{tag}_{os.getpid()}"
    broker = redis.Redis.from_url(redis_db_url(redis_db))
    broker.flushdb()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    service = make(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", redis_db_url(redis_db))
    try:
        service.start()
        yield service
    finally:
        service.stop()
        broker.flushdb()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
