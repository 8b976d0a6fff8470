"""Alembic migrations: the first revision builds exactly the models' schema, on both databases."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import fresh_database_url
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError

from labvault.datastore.db import make_engine
from labvault.datastore.migrate import current_revision, head_revision, upgrade
from labvault.datastore.models import Base


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_url(request, tmp_path):
    """An EMPTY database (no migrations applied)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.sqlite'}"
    url = fresh_database_url(request, "postgresql", tmp_path)
    engine = make_engine(url)
    with engine.begin() as c:  # the template is migrated: empty it again
        c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return url


def test_upgrade_empty_then_existing(empty_url):
    engine = make_engine(empty_url)
    assert current_revision(engine) is None
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    upgrade(engine)  # existing database: a no-op, not an error
    assert current_revision(engine) == head_revision()
    with engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c), Base.metadata)
    assert diff == [], f"migrations and models disagree: {diff}"
    assert {"experiments", "role_grants", "audit_events", "audit_head"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_role_grants_and_audit_are_append_only(engine, sessions):
    from labvault.datastore import audit
    from labvault.datastore import operations as ops

    op = ops.Actor(operator="test")
    ops.add_institution(sessions, op, "Uni", domains=["uni.example"])
    ops.add_user(sessions, op, "pi", institution="Uni", institutional_email="pi@uni.example",
                 verified_institutional_email=True)
    ops.add_user(sessions, op, "sci", institution="Uni")
    ops.add_experiment(sessions, op, "E-1", pi="pi")
    ops.grant_role(sessions, op, "E-1", "sci", "viewer")
    for statement in ("UPDATE audit_events SET actor = 'mallory'", "DELETE FROM audit_events",
                      "DELETE FROM role_grants"):
        with pytest.raises(DBAPIError, match="append-only"):
            with engine.begin() as c:
                c.execute(text(statement))
    with engine.begin() as c:  # revoking is an update, which stays allowed: history is kept
        c.execute(text("UPDATE role_grants SET expires_at = NULL"))
    with sessions() as s:
        report = audit.verify(s)
    assert report.ok and report.events == 5


def test_downgrade_to_base_and_back(empty_url):
    from alembic import command

    from labvault.datastore.migrate import alembic_config

    engine = make_engine(empty_url)
    upgrade(engine)
    cfg = alembic_config()
    with engine.begin() as c:
        cfg.attributes["connection"] = c
        command.downgrade(cfg, "base")
    assert "experiments" not in inspect(engine).get_table_names()
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    engine.dispose()
