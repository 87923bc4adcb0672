"""Alembic environment: the job store's schema, for SQLite (batch mode: no ALTER) and PostgreSQL."""

from __future__ import annotations

from alembic import context

from app.db import Base, make_engine
from app.settings import get_settings

config = context.config


def run_migrations_online() -> None:
    # Set by app.migrate; from the `alembic` command line, CLIPGUARD_DATABASE_URL decides.
    url = config.get_main_option("sqlalchemy.url") or get_settings().database_url
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
