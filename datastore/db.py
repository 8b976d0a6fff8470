"""Engines and sessions for the metadata database (SQLite for one machine, PostgreSQL beyond).

SQLite gets WAL, foreign keys and a busy timeout. Write transactions (``factory.begin()``)
begin with ``BEGIN IMMEDIATE`` so that two writers queue for the lock instead of failing
half-way (a read-then-write transaction, like an audit append, would otherwise hit
SQLITE_BUSY); read sessions (``factory()``) begin DEFERRED, so a reader never holds the write
lock — a request may read in one session and write an audit event in another.
"""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

#: Connection-record flag: the last transaction committed asynchronously; flush at check-in.
FLUSH_ON_CHECKIN = "labvault_flush_wal"


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
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "checkin")
    def _flush_wal(dbapi_conn, record):
        # audit.append commits with synchronous_commit off; before the connection is reused or
        # the caller goes on, wait until the WAL is on disk (see audit._durable_after_commit)
        if dbapi_conn is not None and record.info.pop(FLUSH_ON_CHECKIN, False):
            with dbapi_conn.cursor() as cur:
                cur.execute("SELECT pg_current_xact_id()")
            dbapi_conn.commit()

    return engine


class Sessions(sessionmaker):
    """A sessionmaker whose ``begin()`` (the write path) takes SQLite's write lock up front."""

    def __init__(self, engine: Engine, **kwargs):
        super().__init__(engine, **kwargs)
        self.write_bind = (engine.execution_options(sqlite_begin="IMMEDIATE")
                           if engine.dialect.name == "sqlite" else engine)

    def begin(self):
        return self(bind=self.write_bind)._maker_context_manager()


def session_factory(engine: Engine) -> Sessions:
    return Sessions(engine, expire_on_commit=False)
