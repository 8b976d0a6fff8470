"""The audit chain: tampering is found and named; parallel writers keep one linear chain."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, text

from labvault.datastore import audit
from labvault.datastore.db import make_engine, session_factory
from labvault.datastore.models import AuditEvent
from labvault.policies import Decision

ALLOW = Decision(True, "role.grant", "your viewer role on E-1")
DENY = Decision(False, "proprietary.assigned_only", "E-1 is proprietary")


def _fill(sessions, n, now):
    for i in range(n):
        with sessions.begin() as s:
            audit.append(s, actor=f"user{i % 3}", action="file.open", target=f"experiment:E-1/f{i}.h5",
                         decision=ALLOW if i % 2 else DENY, ip="192.168.17.4", details={"i": i},
                         now=now + timedelta(seconds=i))


def _tamper(engine, *statements):
    """What an attacker with database superuser rights could do: bypass the triggers."""
    with engine.begin() as c:
        if engine.dialect.name == "postgresql":
            c.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
        else:
            c.execute(text("DROP TRIGGER IF EXISTS audit_events_no_update"))
            c.execute(text("DROP TRIGGER IF EXISTS audit_events_no_delete"))
        for st in statements:
            c.execute(text(st))


def _verify(sessions):
    with sessions() as s:
        return audit.verify(s)


def test_intact_chain_and_truncated_ip(sessions, now):
    _fill(sessions, 6, now)
    report = _verify(sessions)
    assert report.ok and report.events == 6
    with sessions() as s:
        events = s.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
    assert [e.seq for e in events] == list(range(1, 7))
    assert all(e.ip == "192.168.x.x" for e in events)  # never the full address
    assert events[0].prev_hash == audit.GENESIS
    assert all(b.prev_hash == a.hash for a, b in zip(events, events[1:], strict=False))
    assert events[0].allowed is False and events[0].rule == "proprietary.assigned_only"


@pytest.mark.parametrize(
    "statements, first_broken, words",
    [
        (["UPDATE audit_events SET actor = 'mallory' WHERE seq = 3"], 3, "edited"),
        (["UPDATE audit_events SET allowed = NOT allowed WHERE seq = 5"], 5, "edited"),
        (["DELETE FROM audit_events WHERE seq = 4"], 4, "deleted"),
        (["DELETE FROM audit_events WHERE seq >= 5"], 5, "tail was deleted"),
        # reorder: swap the contents of events 2 and 3 (keeping their seq numbers)
        (["UPDATE audit_events SET seq = -2 WHERE seq = 2",
          "UPDATE audit_events SET seq = 2 WHERE seq = 3",
          "UPDATE audit_events SET seq = 3 WHERE seq = -2"], 2, "reordered"),
    ],
)
def test_tampering_is_named(engine, sessions, now, statements, first_broken, words):
    _fill(sessions, 6, now)
    _tamper(engine, *statements)
    report = _verify(sessions)
    assert not report.ok
    assert report.first_broken == first_broken
    assert words in report.problem


def test_cli_verify_exit_codes(db_url, engine, sessions, now):
    _fill(sessions, 4, now)
    cmd = [sys.executable, "-m", "labvault.datastore.cli", "audit", "verify", f"--db-url={db_url}"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "intact (4 events)" in ok.stdout
    _tamper(engine, "UPDATE audit_events SET target = 'experiment:E-2' WHERE seq = 2")
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "BROKEN at event 2" in bad.stderr and "edited" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_append_rolls_back_with_its_transaction(sessions, now):
    _fill(sessions, 2, now)
    with pytest.raises(RuntimeError):
        with sessions.begin() as s:
            audit.append(s, actor="a", action="x", target="t", decision=ALLOW, now=now)
            raise RuntimeError("the change failed")
    report = _verify(sessions)
    assert report.ok and report.events == 2


def test_parallel_writers_form_one_chain(db_url, now):
    """8 threads, each with its own connection, append at once: one linear, intact chain."""
    writers, per_writer = 8, 25
    engine = make_engine(db_url, pool_size=writers, max_overflow=0) if db_url.startswith("postgresql") \
        else make_engine(db_url)
    factory = session_factory(engine)
    errors: list[BaseException] = []
    barrier = threading.Barrier(writers)

    def work(w):
        try:
            barrier.wait()
            for i in range(per_writer):
                with factory.begin() as s:
                    audit.append(s, actor=f"w{w}", action="file.open", target=f"t{i}", decision=ALLOW, now=now)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    with factory() as s:
        report = audit.verify(s)
        actors = s.scalars(select(AuditEvent.actor)).all()
    engine.dispose()
    assert report.ok, report.problem
    assert report.events == writers * per_writer
    assert sorted(set(actors)) == [f"w{w}" for w in range(writers)]


@pytest.mark.postgres
def test_postgresql_append_waits_for_the_wal_before_returning(request, tmp_path, now):
    """Regression: the append commits asynchronously (head lock not held across the fsync), so
    Sessions.begin() must then COMMIT a WAL-writing transaction synchronously before the caller
    goes on. `SELECT pg_current_xact_id()` was used first and waited for nothing: PostgreSQL
    only flushes at commit for a transaction that wrote WAL (found with a kill -9 test: 0 of 5
    events survived)."""
    from conftest import fresh_database_url
    from sqlalchemy import event

    from labvault.datastore.db import WAL_FLUSH_SQL

    engine = make_engine(fresh_database_url(request, "postgresql", tmp_path))  # SQLite commits synchronously
    factory = session_factory(engine)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda c, cur, st, *a: statements.append(st.strip()))
    event.listen(engine, "commit", lambda c: statements.append("COMMIT"))
    with factory.begin() as s:
        audit.append(s, actor="a", action="file.open", target="t", decision=ALLOW, now=now)
    engine.dispose()
    assert "SET LOCAL synchronous_commit TO OFF" in statements
    flush = statements.index(WAL_FLUSH_SQL)
    assert "pg_logical_emit_message" in WAL_FLUSH_SQL  # writes WAL, so its commit flushes
    assert statements[flush - 1] == "COMMIT" and statements[flush + 1] == "COMMIT"
    assert flush > statements.index("SET LOCAL synchronous_commit TO OFF")
