"""The schema exists only through Alembic; SQLite runs in WAL mode."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from retrieval.store import Base, Store, to_signed64, to_unsigned64, upgrade_to_head


def test_migration_from_empty_to_head_creates_every_table(db_url: str) -> None:
    engine = create_engine(db_url)
    assert inspect(engine).get_table_names() == []
    upgrade_to_head(engine)
    tables = set(inspect(engine).get_table_names())
    assert {"images", "failures", "index_runs", "meta", "alembic_version"} <= tables
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from retrieval.store import migrations_dir

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head


def test_migrations_match_the_orm_models(db_url: str) -> None:
    """A model change without a migration (or the reverse) fails here, on SQLite and PostgreSQL."""
    engine = create_engine(db_url)
    upgrade_to_head(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    engine.dispose()


def test_upgrade_is_idempotent_and_store_uses_wal(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'wal.db'}"
    first = Store(url)
    first.close()
    store = Store(url)  # second open: upgrade head is a no-op
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    store.close()


def test_meta_roundtrip(db_url: str) -> None:
    store = Store(db_url)
    with store.session() as s, s.begin():
        store.set_meta(s, dim=384, preprocess={"crop": 224})
    assert store.get_meta("dim") == 384
    assert store.get_meta("missing", "default") == "default"
    assert store.all_meta() == {"dim": 384, "preprocess": {"crop": 224}}
    store.close()


@pytest.mark.parametrize("value", [0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1])
def test_phash_signed_roundtrip(value: int) -> None:
    signed = to_signed64(value)
    assert -(1 << 63) <= signed < (1 << 63)
    assert to_unsigned64(signed) == value
