"""Shared fixtures: every database test runs on SQLite and on PostgreSQL.

PostgreSQL comes from ``LABVAULT_TEST_POSTGRES_URL`` (``make test`` starts a throwaway cluster
and sets it). Without it the PostgreSQL variants skip with a visible reason, unless
``LABVAULT_REQUIRE_POSTGRES=1`` (set by ``.ci/run``), which turns that into a failure.
"""

from __future__ import annotations

import itertools
import os
import shutil
import uuid
from datetime import datetime, timezone

import pytest
from sqlalchemy import text

from labvault.datastore.db import make_engine, normalise_url, session_factory
from labvault.datastore.migrate import upgrade

# fixtures of the chunk-store tests (world, store)
pytest_plugins = ["store_support"]

PG_URL = os.environ.get("LABVAULT_TEST_POSTGRES_URL")
REQUIRE_PG = os.environ.get("LABVAULT_REQUIRE_POSTGRES") == "1"
_counter = itertools.count()


def require_postgres() -> str:
    if not PG_URL:
        msg = "PostgreSQL not available: LABVAULT_TEST_POSTGRES_URL is not set (make test starts one)"
        if REQUIRE_PG:
            pytest.fail(msg + " and LABVAULT_REQUIRE_POSTGRES=1")
        pytest.skip(msg)
    return normalise_url(PG_URL)


def _with_database(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "template.sqlite"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture(scope="session")
def pg_admin():
    """An AUTOCOMMIT engine on the server's maintenance database, plus a migrated template."""
    url = require_postgres()
    admin = make_engine(url, isolation_level="AUTOCOMMIT")
    template = f"lv_template_{os.getpid()}"
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{template}"'))
        c.execute(text(f'CREATE DATABASE "{template}"'))
    engine = make_engine(_with_database(url, template))
    upgrade(engine)
    engine.dispose()
    yield admin, url, template
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)'))
    admin.dispose()


def fresh_database_url(request, kind: str, tmp_path) -> str:
    """A migrated, empty database of ``kind`` for one test, removed afterwards."""
    if kind == "sqlite":
        template = request.getfixturevalue("sqlite_template")
        path = tmp_path / f"labvault-{next(_counter)}.sqlite"
        shutil.copy(template, path)
        return f"sqlite:///{path}"
    admin, url, template = request.getfixturevalue("pg_admin")
    name = f"lv_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))

    def drop():
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    request.addfinalizer(drop)
    return _with_database(url, name)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    return fresh_database_url(request, request.param, tmp_path)


@pytest.fixture
def engine(db_url):
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine):
    return session_factory(engine)


@pytest.fixture
def now() -> datetime:
    return datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
