"""One-statement reads on the event loop, for the status poll: psycopg's async pool on PostgreSQL.

Why a second way into the job store: the poll is the hot route, and through SQLAlchemy it
costs a thread hop (a worker thread fighting the event loop for the GIL), a pool checkout and
SQLAlchemy's execution and row machinery around a sub-millisecond query. Measured in process
(docs/lab/benchmarks.md, "Service load"), that was about 0.43 ms of CPU per poll against 0.1 ms for
the same statement on psycopg's async connection, with the event loop never blocked.

The statement is still SQLAlchemy's: it is compiled once per statement for the engine's dialect,
and each column's result processor (``UTCDateTime``'s zone, for one) is applied to the raw
values, so the rows are what SQLAlchemy would have returned (a test compares the answers byte
for byte). Only ``postgresql+psycopg`` URLs take this path; SQLite (the embedded default) and
other drivers keep the thread hop (``AsyncReader.for_engine`` returns ``None``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from clipguard.app.problems import store_unavailable
from sqlalchemy import Engine, Select

log = logging.getLogger(__name__)

POOL_TIMEOUT_S = 2.0
"""How long a poll waits for a connection before answering 503: a poll is cheap to retry, a hung one is not."""


class AsyncReader:
    """A small pool of autocommit psycopg connections running compiled SQLAlchemy ``SELECT``s."""

    def __init__(self, engine: Engine, size: int) -> None:
        import psycopg
        from psycopg_pool import AsyncConnectionPool, PoolTimeout

        self._dropped, self._no_connection = psycopg.OperationalError, PoolTimeout
        self.dialect = engine.dialect
        conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        # Connections come up in the background (open(wait=False)), so an API that starts while the
        # database is down still starts, and answers 503 on the poll until it is back.
        self.pool = AsyncConnectionPool(
            conninfo,
            min_size=size,
            max_size=size,
            open=False,
            timeout=POOL_TIMEOUT_S,
            kwargs={"autocommit": True},
            name="clipguard-polls",
        )
        self._compiled: dict[int, list] = {}

    @classmethod
    def for_engine(cls, engine: Engine, size: int) -> AsyncReader | None:
        """A reader for a PostgreSQL engine on psycopg with ``psycopg_pool`` installed, else ``None``."""
        if engine.url.drivername != "postgresql+psycopg":
            return None
        try:
            import psycopg_pool  # noqa: F401
        except ImportError:
            log.info("psycopg_pool is not installed: status polls read through a thread (pip install psycopg-pool)")
            return None
        return cls(engine, size)

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close()

    def _compile(self, statement: Select) -> list:
        """``[statement, sql, default params, column labels, processors or None until the first answer]``."""
        found = self._compiled.get(id(statement))
        if found is None:
            compiled = statement.compile(dialect=self.dialect)
            # The statement itself is kept, so its id cannot be reused by another while this entry lives.
            found = [statement, str(compiled), dict(compiled.params), list(statement.selected_columns.keys()), None]
            self._compiled[id(statement)] = found
        return found

    def _processors(self, statement: Select, description: Any) -> list[Callable | None]:
        """Each column's SQLAlchemy result processor, as SQLAlchemy picks it: by type and the driver's type code."""
        return [
            c.type.dialect_impl(self.dialect).result_processor(self.dialect, d.type_code)
            for c, d in zip(statement.selected_columns, description, strict=True)
        ]

    async def fetch(self, statement: Select, params: dict[str, Any]) -> list[dict[str, Any]]:
        """The statement's rows as ``{column label: value}``; a store that cannot answer is a 503 problem.

        A connection the server dropped (restart, failover, idle timeout) fails its first query;
        the pool drops every such connection, and the read is tried once more.
        """
        entry = self._compile(statement)
        _, sql, defaults, keys, processors = entry
        for attempt in (1, 2):
            try:
                async with self.pool.connection() as conn:
                    cur = await conn.execute(sql, {**defaults, **params})
                    raw = await cur.fetchall()
                    if processors is None:
                        processors = entry[4] = self._processors(statement, cur.description)
                break
            except self._dropped as exc:
                if attempt == 2:
                    raise store_unavailable(type(exc).__name__) from exc
                await self.pool.check()  # drop every idle connection the server closed, not just this one
            except self._no_connection as exc:
                raise store_unavailable(f"no connection within {POOL_TIMEOUT_S:g} s") from exc
        return [
            {k: (p(v) if p is not None else v) for k, p, v in zip(keys, processors, row, strict=True)} for row in raw
        ]
