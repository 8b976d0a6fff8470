"""Engines and sessions for the metadata database (SQLite for one machine, PostgreSQL beyond).

SQLite gets WAL, foreign keys and a busy timeout. Write transactions (``factory.begin()``)
begin with ``BEGIN IMMEDIATE`` so that two writers queue for the lock instead of failing
half-way (a read-then-write transaction, like an audit append, would otherwise hit
SQLITE_BUSY); read sessions (``factory()``) begin DEFERRED, so a reader never holds the write
lock — a request may read in one session and write an audit event in another.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

#: Session.info keys. WRITE_PATH: the session is a ``Sessions.begin()`` write transaction,
#: which waits for the WAL after COMMIT when WAIT_FOR_WAL was set (audit._durable_after_commit).
WRITE_PATH = "labvault_write_path"
WAIT_FOR_WAL = "labvault_wait_for_wal"
#: PostgreSQL flushes the WAL at COMMIT only for a transaction that wrote WAL itself
#: (RecordTransactionCommit skips XLogFlush otherwise, so ``SELECT pg_current_xact_id()``
#: waits for nothing). A transactional logical message is WAL: this COMMIT is synchronous and
#: returns once the WAL up to it -- every earlier commit included -- is on disk.
WAL_FLUSH_SQL = "SELECT pg_logical_emit_message(true, 'labvault', '')"


def normalise_url(url: str) -> str:
    """Use psycopg 3 for ``postgresql://`` URLs."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def make_engine(url: str, **kwargs) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        kwargs.setdefault("connect_args", {}).setdefault("timeout", 30)
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            if ":memory:" not in url and "mode=memory" not in url:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


class Sessions(sessionmaker):
    """A sessionmaker whose ``begin()`` (the write path) takes SQLite's write lock up front."""

    def __init__(self, engine: Engine, **kwargs):
        super().__init__(engine, **kwargs)
        self.write_bind = (engine.execution_options(sqlite_begin="IMMEDIATE")
                           if engine.dialect.name == "sqlite" else engine)

    @contextmanager
    def begin(self) -> Iterator[Session]:
        with self(bind=self.write_bind) as session:
            session.info[WRITE_PATH] = True
            with session.begin():
                yield session
            if session.info.pop(WAIT_FOR_WAL, False):
                # the audit append committed asynchronously (the head lock is not held across
                # the fsync); wait for the WAL here, where a failure reaches the caller and the
                # connection goes back to the pool either way
                with session.begin():
                    session.execute(text(WAL_FLUSH_SQL))


def session_factory(engine: Engine) -> Sessions:
    return Sessions(engine, expire_on_commit=False)
