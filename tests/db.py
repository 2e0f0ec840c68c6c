"""The suites' database backend: SQLite files (the default) or a real PostgreSQL server.

`pytest --test-db postgresql` (or RETRIEVAL_TEST_DB=postgresql) runs the same tests with every index
folder's default database (`IndexLayout.default_db_url`, what `--index-dir` and ./retrieval-index
mean) replaced by a fresh PostgreSQL database of its own, cloned from a template that is migrated
once. Tests read the database through `connect()` (sqlite3 or psycopg) and `url()`, and hand a
subprocess `env()`, so the same test body runs on both; a test that is about SQLite itself (WAL
files, file permissions, a killed SQLite writer) carries `@pytest.mark.sqlite_only("why")`.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from pathlib import Path
from typing import Any

BACKEND = os.environ.get("RETRIEVAL_TEST_DB", "sqlite")  # overridden by --test-db in pytest_configure


def postgres() -> bool:
    return BACKEND == "postgresql"


class Databases:
    """One PostgreSQL database per index folder, created on first use from a migrated template."""

    def __init__(self, server_url: str):
        from sqlalchemy.engine import make_url

        self._base = make_url(server_url)
        self._by_root: dict[Path, str] = {}
        self.template = f"tmpl_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{self.template}"')
        from retrieval.store import Store

        Store(self._url(self.template)).close()  # alembic upgrade head, once for the session
        self._admin(f"ALTER DATABASE \"{self.template}\" WITH IS_TEMPLATE true")

    def _url(self, name: str) -> str:
        return self._base.set(database=name).render_as_string(hide_password=False)

    def _plain(self, name: str) -> str:
        return self._base.set(drivername="postgresql", database=name).render_as_string(hide_password=False)

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self._plain(self._base.database or "postgres"), autocommit=True) as conn:
            conn.execute(sql)

    def url(self, root: Path) -> str:
        root = Path(root).resolve()
        name = self._by_root.get(root)
        if name is None:
            name = f"t_{uuid.uuid4().hex[:16]}"
            self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
            self._by_root[root] = name
        return self._url(name)

    def plain_url(self, root: Path) -> str:
        self.url(root)
        return self._plain(self._by_root[Path(root).resolve()])

    def exists(self, root: Path) -> bool:
        return Path(root).resolve() in self._by_root

    def drop_under(self, folder: Path | None) -> None:
        """Drop the databases of index folders under `folder` (all of them for None)."""
        folder = None if folder is None else Path(folder).resolve()
        for root in list(self._by_root):
            if folder is None or root.is_relative_to(folder):
                name = self._by_root.pop(root)
                self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        self.drop_under(None)
        self._admin(f"ALTER DATABASE \"{self.template}\" WITH IS_TEMPLATE false")
        self._admin(f'DROP DATABASE IF EXISTS "{self.template}" WITH (FORCE)')


DATABASES: Databases | None = None  # set by the session fixture in PostgreSQL mode


def _root(db: Path | str) -> Path:
    path = Path(db)
    return path.parent if path.name == "retrieval.db" else path


def url(db: Path | str) -> str:
    """The SQLAlchemy URL of an index folder's database (or of its `retrieval.db` path)."""
    if DATABASES is not None:
        return DATABASES.url(_root(db))
    return f"sqlite:///{(_root(db) / 'retrieval.db').resolve()}"


def env(index_dir: Path | str) -> dict[str, str]:
    """Environment that points a `retrieval` subprocess at the index folder's database."""
    return {"RETRIEVAL_DB_URL": url(index_dir)} if DATABASES is not None else {}


def db_args(index_dir: Path | str) -> list[str]:
    """`--db URL` for a subprocess on PostgreSQL; nothing on SQLite (the folder's own file)."""
    return ["--db", url(index_dir)] if DATABASES is not None else []


class _PostgresConnection:
    """The part of sqlite3.Connection the tests use, on psycopg: `?` placeholders, execute, `with`."""

    def __init__(self, dsn: str):
        import psycopg

        from psycopg.types.string import TextLoader

        self._conn = psycopg.connect(dsn)
        for json_type in ("json", "jsonb"):  # JSON columns as text, as sqlite3 returns them
            self._conn.adapters.register_loader(json_type, TextLoader)

    def execute(self, sql: str, params: Any = ()) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, params: Any) -> Any:
        cur = self._conn.cursor()
        cur.executemany(sql.replace("?", "%s"), params)
        return cur

    def commit(self) -> None:
        self._conn.commit()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "_PostgresConnection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._conn.__exit__(*exc)  # commit (or roll back on an exception), then close


def connect(db: Path | str) -> Any:
    """sqlite3.connect(index_dir / 'retrieval.db'), or the same SQL on the folder's PostgreSQL database."""
    if DATABASES is not None:
        return _PostgresConnection(DATABASES.plain_url(_root(db)))
    return sqlite3.connect(_root(db) / "retrieval.db")


def peek(db: Path | str, sql: str) -> list[Any]:
    """Rows of a read-only query on a database another process may be writing; [] while there is none yet."""
    if DATABASES is not None:
        import psycopg

        try:
            with psycopg.connect(DATABASES.plain_url(_root(db)), connect_timeout=5) as conn:
                return conn.execute(sql).fetchall()
        except psycopg.Error:
            return []
    path = _root(db) / "retrieval.db"
    if not path.exists():
        return []
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.Error:
        return []
