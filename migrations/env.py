"""Alembic environment.

The URL comes from the caller (retrieval.store passes its open connection) or, when run as
`alembic upgrade head` from the repository, from the settings (RETRIEVAL_DB_URL / RETRIEVAL_INDEX_DIR).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from retrieval.store import Base

config = context.config
target_metadata = Base.metadata


def _url_from_settings() -> str:
    from retrieval.layout import IndexLayout
    from retrieval.settings import get_settings

    settings = get_settings()
    return settings.db_url or IndexLayout(settings.index_dir).default_db_url()


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url") or _url_from_settings()
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    section = config.get_section(config.config_ini_section, {}) or {}
    section.setdefault("sqlalchemy.url", config.get_main_option("sqlalchemy.url") or _url_from_settings())
    engine = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
