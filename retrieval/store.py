"""Metadata store: SQLAlchemy 2.x engine and ORM tables. The schema is created only by Alembic.

Opening a store for writing runs `alembic upgrade head`, so a new index directory and an old one from
an earlier release both end up on the current schema without a separate step. Opening one for reading
(`readonly=True`) never writes: no migration, no journal-mode change, and SQLite opens the file with
`mode=ro` (plus `immutable=1` when its folder is not writable: read-only media, where SQLite could
not even create its shared-memory file).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    create_engine,
    delete,
    event,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

logger = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Image(Base):
    """One successfully decoded and embedded image. Its id is the FAISS id and the vector row."""

    __tablename__ = "images"
    __table_args__ = {"sqlite_autoincrement": True}  # never reuse the id of a deleted image

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)  # POSIX path relative to the corpus root
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    phash: Mapped[int] = mapped_column(BigInteger, index=True)  # 64-bit pHash stored as signed int64
    indexed: Mapped[bool] = mapped_column(Boolean, default=False, index=True)  # vector is in the FAISS file
    # The 8 dihedral 256-bit PDQ hashes (identity first: 8 x 32 bytes) and PDQ's quality (0-100);
    # NULL for images indexed before PDQ (they get it when the copy role is added).
    pdq: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    pdq_quality: Mapped[int | None] = mapped_column(SmallInteger, nullable=True)
    # The copy role's vector: COPY_NONE (not embedded), COPY_WRITTEN (in vectors-copy.npy, not yet
    # in index-copy.faiss) or COPY_INDEXED.
    copy_state: Mapped[int] = mapped_column(SmallInteger, default=0, server_default="0", index=True)
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    etag: Mapped[str | None] = mapped_column(String(128), nullable=True)  # object stores; None for local files
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # list columns / shard sidecars


COPY_NONE, COPY_WRITTEN, COPY_INDEXED = 0, 1, 2


class Failure(Base):
    """A file that looked like an image but could not be used, with the reason a person can act on."""

    __tablename__ = "failures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32))  # machine-readable category, e.g. "truncated"
    reason: Mapped[str] = mapped_column(Text)
    failed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    etag: Mapped[str | None] = mapped_column(String(128), nullable=True)


class IndexRun(Base):
    """One `retrieval index` invocation: what it used, what it did, how long it took."""

    __tablename__ = "index_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # running, completed, failed
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    corpus_root: Mapped[str] = mapped_column(Text)
    model_ref: Mapped[str] = mapped_column(Text)
    model_fingerprint: Mapped[str] = mapped_column(String(64))
    dim: Mapped[int] = mapped_column(Integer)
    preprocess: Mapped[dict[str, Any]] = mapped_column(JSON)
    device: Mapped[str] = mapped_column(String(32))
    index_type: Mapped[str | None] = mapped_column(String(32), nullable=True)
    index_params: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    counts: Mapped[dict[str, int] | None] = mapped_column(JSON, nullable=True)
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)
    images_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class Meta(Base):
    """Key/value facts about the whole index (corpus root, model, dimension, vector file)."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers (the API) never block the writer (the indexer) and a killed writer loses
    # only its open transaction. NORMAL is durable across process crashes in WAL mode.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def normalise_url(url: str) -> str:
    """`postgresql://` / `postgres://` mean psycopg 3 (the driver the `postgres` extra installs)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _sqlite_readonly_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA query_only=ON")
    cursor.close()


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite file URL, else None (other databases, in-memory SQLite)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:") or parsed.query:
        return None
    return Path(parsed.database)


class _SnapshotConnection:
    """A sqlite3 connection held inside one read transaction: every query sees one snapshot.

    In WAL mode a reader's snapshot stays fixed while writers commit, so the rows a server reads
    stay those of the generation it loaded, whatever `index --rebuild` does meanwhile. The
    transaction is never ended by SQLAlchemy (commit and rollback are no-ops), only by close().
    """

    def __init__(self, conn: Any):
        self._conn = conn
        conn.execute("BEGIN")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchall()  # the snapshot starts at the first read

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        self._conn.close()


def _held_connection(dsn: str, options: dict[str, str]) -> Any:
    """A psycopg connection inside one REPEATABLE READ, READ ONLY transaction: every query sees one
    snapshot (PostgreSQL's counterpart of _SnapshotConnection). SQLAlchemy's commit and rollback are
    no-ops; only close() ends the transaction."""
    import psycopg

    class HeldConnection(psycopg.Connection):
        def commit(self) -> None:
            pass

        def rollback(self) -> None:
            # A failed statement aborts the held transaction, and every later query would fail with
            # "current transaction is aborted": end it and take a new snapshot instead.
            if self.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                logger.warning("a query failed inside the reader's snapshot; taking a new snapshot")
                psycopg.Connection.rollback(self)
                self.execute("SELECT 1").fetchall()

    conn = HeldConnection.connect(dsn, **options)
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    conn.execute("SELECT 1").fetchall()  # the snapshot is taken by the transaction's first query
    return conn


def _postgres_readonly_engine(url: str, snapshot: bool) -> Engine:
    """Every transaction READ ONLY on the server; `snapshot`: one connection holding one snapshot."""
    options = {"options": "-c default_transaction_read_only=on"}
    if not snapshot:
        return create_engine(url, pool_pre_ping=True, connect_args=options)
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import StaticPool

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    return create_engine(url, creator=lambda: _held_connection(dsn, options), poolclass=StaticPool)


def make_readonly_engine(url: str, snapshot: bool = False) -> Engine:
    """An engine that cannot write: a SQLite file opened `mode=ro` (`immutable=1` on read-only media).

    `snapshot`: one connection inside one read transaction (see _SnapshotConnection), for WAL databases.
    """
    import os
    import sqlite3
    from urllib.parse import quote

    from sqlalchemy.pool import QueuePool

    path = sqlite_file(url)
    if path is None:
        url = normalise_url(url)
        if url.startswith("postgresql"):
            return _postgres_readonly_engine(url, snapshot)
        return make_engine(url)
    path = path.resolve()
    if not path.is_file():
        from retrieval.errors import IndexNotFoundError

        raise IndexNotFoundError(f"no index database at {path}")
    uri = f"file:{quote(str(path))}?mode=ro"
    if not os.access(path.parent, os.W_OK):
        uri += "&immutable=1"  # nothing can change it, and SQLite cannot create its -shm file there

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(uri, uri=True, check_same_thread=False)

    if snapshot:
        probe = connect()
        try:
            wal = probe.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            probe.close()
        if wal:  # outside WAL mode a held read transaction would block the writer
            from sqlalchemy.pool import StaticPool

            def connect_snapshot() -> Any:
                return _SnapshotConnection(sqlite3.connect(uri, uri=True, check_same_thread=False,
                                                           isolation_level=None))

            engine = create_engine("sqlite://", creator=connect_snapshot, poolclass=StaticPool)
            event.listen(engine, "connect", _sqlite_readonly_pragmas)
            return engine
    engine = create_engine("sqlite://", creator=connect, poolclass=QueuePool)
    event.listen(engine, "connect", _sqlite_readonly_pragmas)
    return engine


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL and a busy timeout."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    return engine


def migrations_dir() -> Path:
    from retrieval import migrations

    return Path(migrations.__file__).parent


def upgrade_to_head(engine: Engine) -> None:
    """Apply every Alembic revision not yet applied (a no-op when the schema is current)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            # Processes opening the same database at once (an index run, API workers) migrate one at
            # a time; the lock ends with the transaction.
            from sqlalchemy import text

            connection.execute(text("SELECT pg_advisory_xact_lock(7240510003)"))
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def _check_writable(url: str) -> None:
    """A writer on a SQLite index in a folder it cannot write fails here, in one line."""
    import errno
    import os

    from retrieval.layout import ReadOnlyIndexError

    path = sqlite_file(url)
    if path is None:
        return
    for target in (path.parent, path):
        if target.exists() and not os.access(target, os.W_OK):
            raise ReadOnlyIndexError(path.parent, OSError(errno.EACCES, os.strerror(errno.EACCES)))


def check_schema(engine: Engine) -> None:
    """For readers: the schema must be the one this release writes; reading never migrates."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from retrieval.errors import IndexNotFoundError

    head = ScriptDirectory(str(migrations_dir())).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current is None:
        raise IndexNotFoundError("the index database is empty; run `retrieval index CORPUS` first")
    if current != head:
        raise IndexNotFoundError(f"the index database has schema {current}, this release reads {head}; run "
                                 f"`retrieval index CORPUS` once to upgrade it (reading never changes an index)")


class Store:
    """The metadata database of one index: a session factory plus small typed helpers.

    `readonly=True`: the handle of readers (search, info, serve): it cannot write and never migrates.
    `snapshot=True`: read-only, and every query sees the database as it was when the store opened.
    """

    def __init__(self, url: str, readonly: bool = False, snapshot: bool = False):
        self.url = url
        self.readonly = readonly or snapshot
        if self.readonly:
            self.engine = make_readonly_engine(url, snapshot)
            try:
                check_schema(self.engine)
            except BaseException:
                self.engine.dispose()
                raise
        else:
            _check_writable(url)
            self.engine = make_engine(url)
            upgrade_to_head(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> Session:
        return self.sessions()

    def close(self) -> None:
        self.engine.dispose()

    # --- meta ---------------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        with self.session() as s:
            row = s.get(Meta, key)
            return default if row is None else json.loads(row.value)

    def all_meta(self) -> dict[str, Any]:
        with self.session() as s:
            return {m.key: json.loads(m.value) for m in s.scalars(select(Meta))}

    def set_meta(self, session: Session, **values: Any) -> None:
        for key, value in values.items():
            session.merge(Meta(key=key, value=json.dumps(value)))

    # --- images -------------------------------------------------------------------------------
    def count_images(self) -> int:
        from sqlalchemy import func

        with self.session() as s:
            return s.scalar(select(func.count(Image.id))) or 0

    def image_ids(self) -> "Iterator[int]":
        with self.session() as s:
            yield from s.scalars(select(Image.id).order_by(Image.id)).yield_per(50_000)


SQL_IN_CHUNK = 10_000  # SQLite allows at most 32,766 bound variables per statement


def chunked(values: Iterable[Any], size: int = SQL_IN_CHUNK) -> Iterator[list[Any]]:
    """Split `values` for `column.in_(...)` so no statement exceeds SQLite's variable limit."""
    values = list(values)
    for start in range(0, len(values), size):
        yield values[start : start + size]


def to_signed64(value: int) -> int:
    """Map an unsigned 64-bit hash to the signed range SQLite integers hold."""
    return value - (1 << 64) if value >= (1 << 63) else value


def to_unsigned64(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


# --- curation (retrieval.curation): dedup, clustering and retrieval-based curation runs ----------
# Image ids are stored without a foreign key on purpose: a run is a historical record and must
# survive the removal of the images it talks about (which is what `dedup --apply` does).
from sqlalchemy import ForeignKey  # noqa: E402


class DedupRun(Base):
    """One `retrieval dedup` run: parameters, a fingerprint of the inputs, counts in images."""

    __tablename__ = "dedup_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # running, completed, failed
    mode: Mapped[str] = mapped_column(String(16))  # self or relative
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    counts: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    reference_failures: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    applied_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class DuplicateGroup(Base):
    """A connected component of the duplicate graph (after chain-safety splitting)."""

    __tablename__ = "duplicate_groups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("dedup_runs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)  # 1-based within the run, largest groups first
    size: Mapped[int] = mapped_column(Integer)
    representative_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: a reference wins
    reasons: Mapped[str] = mapped_column(String(64))  # comma-separated: exact,phash,embedding,reference
    weakest_edge: Mapped[float] = mapped_column(Float)
    min_pairwise: Mapped[float] = mapped_column(Float)
    touches_reference: Mapped[bool] = mapped_column(Boolean, default=False)


class DuplicateMember(Base):
    """One image (or reference file) of a duplicate group and what happens to it."""

    __tablename__ = "duplicate_members"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("duplicate_groups.id", ondelete="CASCADE"), index=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("dedup_runs.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)  # None for references
    path: Mapped[str] = mapped_column(Text)  # corpus-relative, or the reference file path
    is_reference: Mapped[bool] = mapped_column(Boolean, default=False)
    action: Mapped[str] = mapped_column(String(8))  # keep or remove
    similarity: Mapped[float] = mapped_column(Float)  # exact cosine to the representative
    reason: Mapped[str] = mapped_column(String(16))  # exact, phash, embedding, reference (or "representative")


class ClusterRun(Base):
    """One `retrieval cluster` run: spherical k-means over all embeddings."""

    __tablename__ = "cluster_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    k: Mapped[int] = mapped_column(Integer)
    n_images: Mapped[int] = mapped_column(Integer)
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    sizes: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)  # images per cluster, by cluster number
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ClusterAssignment(Base):
    """image -> cluster of one run, with the cosine distance to the centroid and the rank in the cluster."""

    __tablename__ = "cluster_assignments"

    run_id: Mapped[int] = mapped_column(ForeignKey("cluster_runs.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cluster: Mapped[int] = mapped_column(Integer)
    distance: Mapped[float] = mapped_column(Float)  # 1 - cosine(vector, centroid)
    rank: Mapped[int] = mapped_column(Integer)  # 0 = nearest the centroid


class CurationRun(Base):
    """One `retrieval curate` run: queries, mode, parameters and counts."""

    __tablename__ = "curation_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    mode: Mapped[str] = mapped_column(String(16))  # sample or cluster
    # Parameters + index state + query files' content (None for runs made before 0003: never reused).
    fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    counts: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    query_failures: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    cluster_run_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class CurationItem(Base):
    """The manifest: one curated image and how it got in."""

    __tablename__ = "curation_items"

    run_id: Mapped[int] = mapped_column(ForeignKey("curation_runs.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    how: Mapped[str] = mapped_column(String(16))  # sample (k-NN of a query) or cluster (sampled from a cluster)
    query: Mapped[str | None] = mapped_column(Text, nullable=True)  # the best query that retrieved it
    score: Mapped[float | None] = mapped_column(Float, nullable=True)  # cosine to that query
    times_retrieved: Mapped[int] = mapped_column(Integer, default=1)  # > 1: a collision
    cluster: Mapped[int | None] = mapped_column(Integer, nullable=True)


def remove_images(store: Store, image_ids: list[int], failure_paths: list[str]) -> None:
    """Forget deleted files. Their vector rows become unreferenced; the index sync drops their ids."""
    with store.session() as s, s.begin():
        for part in chunked(image_ids):
            s.execute(delete(Image).where(Image.id.in_(part)))
        for part in chunked(failure_paths):
            s.execute(delete(Failure).where(Failure.path.in_(part)))


class ReviewDecision(Base):
    """A person's keep/remove choice for one member of a dedup run; overrides the computed action."""

    __tablename__ = "review_decisions"

    member_id: Mapped[int] = mapped_column(ForeignKey("duplicate_members.id", ondelete="CASCADE"), primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("dedup_runs.id", ondelete="CASCADE"), index=True)
    action: Mapped[str] = mapped_column(String(8))  # keep or remove
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
