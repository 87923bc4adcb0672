"""Alembic environment: the job store's schema, for SQLite (batch mode: no ALTER) and PostgreSQL.

Several processes may start at once (``clipguard serve`` next to ``clipguard keys create``,
API replicas), so the upgrade runs under a lock: a PostgreSQL advisory lock, or a file lock
next to the SQLite file. The second process then finds the schema current and does nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator

from alembic import context
from clipguard.app.db import Base, make_engine
from clipguard.app.settings import get_settings
from sqlalchemy import Connection, text

config = context.config
LOCK_ID = 0x636C6970  # "clip"


@contextlib.contextmanager
def _exclusive(connection: Connection) -> Iterator[None]:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": LOCK_ID})
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": LOCK_ID})
            connection.commit()
    elif connection.dialect.name == "sqlite" and connection.engine.url.database not in (None, "", ":memory:"):
        with open(f"{connection.engine.url.database}.migrate.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
    else:
        yield


def run_migrations_online() -> None:
    # Set by clipguard.app.migrate; from the `alembic` command line, CLIPGUARD_DATABASE_URL decides.
    url = config.get_main_option("sqlalchemy.url") or get_settings().database_url
    engine = make_engine(url)
    with engine.connect() as connection, _exclusive(connection):
        context.configure(
            connection=connection, target_metadata=Base.metadata, render_as_batch=connection.dialect.name == "sqlite"
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
    engine.dispose()


run_migrations_online()
