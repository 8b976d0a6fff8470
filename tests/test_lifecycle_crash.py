"""Kill `labvault lifecycle run` at every step of its work, then run it again.

A reference run (a subprocess, uninterrupted) logs its steps. Then, for every step N, a copy of
the same starting world (database and chunk store) is given to a `labvault lifecycle run`
subprocess that ends itself abruptly (``os._exit``, no cleanup, no commit) at step N, and a
second run finishes the work. The outcome must equal the reference run's row for row -- no
double effect, no half-deleted experiment -- with its chunk store in the same state, and every
notice must have reached the mailbox (at least once; twice only when the process died between
the SMTP server's acceptance and marking the notice sent, with the same Message-ID both times).
On SQLite (every step) and PostgreSQL (the first step of each kind).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import _with_database, fresh_database_url
from sqlalchemy import text, update
from sqlalchemy.engine import make_url
from test_lifecycle import DAY, OP, Env, busy_world, snapshot

from labvault.datastore import audit
from labvault.datastore import operations as ops
from labvault.datastore.db import make_engine, session_factory
from labvault.datastore.lifecycle import CRASH_ENV, CRASH_EXIT, STEP_LOG_ENV, LifecycleJob
from labvault.datastore.mail import LocalMailbox, Mailer
from labvault.datastore.models import User, UserState
from labvault.datastore.store import ChunkStore

pytestmark = pytest.mark.slow


def crash_world(env: Env):
    """Something of every kind due at once: accounts, an expiry with a file, two notices."""
    at = busy_world(env)
    env.store.ingest_stream(env.alice, "NLS-2025-0042", "calib/dark.bin", [b"d" * 2500], now=at - 30 * DAY)
    ops.add_experiment(env.sessions, OP, "NLS-2027-0100", pi="alice", end_at=at - 25 * DAY, now=at - 40 * DAY)
    ops.grant_role(env.sessions, env.alice, "NLS-2027-0100", "frank", "facility_staff", now=at - 40 * DAY)
    with env.sessions.begin() as s:  # closed by a path that left bob's roles
        s.execute(update(User).where(User.name == "bob").values(state=UserState.closed, closed_at=at - DAY))
    return at


class Copy:
    """A copy of the starting world: database URL and data directory."""

    def __init__(self, url: str, data: Path):
        self.url, self.data = url, data

    def store(self, sessions) -> ChunkStore:
        return ChunkStore(sessions=sessions, data_dir=str(self.data), chunk_size=1024)

    def objects(self) -> list[str]:
        return sorted(str(p.relative_to(self.data)) for p in self.data.rglob("*.lvc"))

    def state(self) -> dict:
        engine = make_engine(self.url)
        try:
            sessions = session_factory(engine)
            with sessions() as s:
                assert audit.verify(s).ok
            return {"rows": snapshot(sessions), "objects": self.objects()}
        finally:
            engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def origin(request, tmp_path):
    """The starting world, built once; ``clone()`` makes independent copies of it."""
    kind = request.param
    url = fresh_database_url(request, kind, tmp_path)
    engine = make_engine(url)
    with LocalMailbox(tmp_path / "setup-mail") as box:
        env = Env(session_factory(engine), tmp_path / "origin", box)
        at = crash_world(env)
    engine.dispose()
    counter = iter(range(10_000))

    def clone() -> Copy:
        n = next(counter)
        data = tmp_path / f"copy-{n}"
        shutil.copytree(tmp_path / "origin" / "data", data)
        if kind == "sqlite":
            src = Path(make_url(url).database)
            dst = tmp_path / f"copy-{n}.sqlite"
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{src}{suffix}").exists():
                    shutil.copy(f"{src}{suffix}", f"{dst}{suffix}")
            return Copy(f"sqlite:///{dst}", data)
        admin, server, _ = request.getfixturevalue("pg_admin")
        name = f"lv_crash_{uuid.uuid4().hex[:12]}"
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{make_url(url).database}"'))

        def drop():
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

        request.addfinalizer(drop)
        return Copy(_with_database(server, name), data)

    return clone, at


def cli_run(copy: Copy, at, port: int, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "labvault.datastore.cli", "lifecycle", "run", f"--now={at.isoformat()}",
         f"--db-url={copy.url}", f"--data-dir={copy.data}", f"--Mailer.smtp_port={port}",
         "--ChunkStore.chunk_size=1024"],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def finish_in_process(copy: Copy, at, port: int):
    engine = make_engine(copy.url)
    try:
        sessions = session_factory(engine)
        return LifecycleJob(sessions, store=copy.store(sessions), mailer=Mailer(smtp_port=port)).run(at)
    finally:
        engine.dispose()


def message_ids(box: LocalMailbox) -> list[str]:
    return sorted(m["Message-ID"] for m in box.messages())


def test_killed_at_every_step_the_next_run_finishes_the_work_exactly_once(origin, tmp_path):
    clone, at = origin
    # the reference: one uninterrupted run, logging its steps
    with LocalMailbox(tmp_path / "mail-ref") as box:
        ref = clone()
        log = tmp_path / "steps.log"
        r = cli_run(ref, at, box.port, **{STEP_LOG_ENV: str(log)})
        assert r.returncode == 0, r.stderr
        reference_mail = message_ids(box)
    steps = log.read_text().split()
    expected = ref.state()
    assert len(reference_mail) == 2  # the PI's retention notice, frank's facility notice
    for label in ("account.remove_roles", "account.erase.before_commit", "account.erase", "account.deactivate",
                  "expire.before_commit", "expire", "notice.record", "notice.accepted", "notice.send",
                  "purge.location", "purge"):
        assert label in steps, f"the world exercises no {label} step"
    assert expected["objects"] == sorted(o for o in ref.objects())  # chunks of live files only

    points = list(enumerate(steps, start=1))
    if "postgresql" in ref.url:
        # the first step of each kind (a copy of a PostgreSQL database costs about a second to
        # make and drop); SQLite goes through every single step
        seen: set[str] = set()
        points = [(n, label) for n, label in points if not (label in seen or seen.add(label))]
    for n, label in points:
        copy = clone()
        with LocalMailbox(tmp_path / f"mail-{n}") as box:
            r = cli_run(copy, at, box.port, **{CRASH_ENV: str(n)})
            assert r.returncode == CRASH_EXIT, (n, label, r.stderr)
            report = finish_in_process(copy, at, box.port)
            assert report.ok, (n, label, report.errors)
            got = message_ids(box)
        state = copy.state()
        assert state == expected, f"killed at step {n} ({label}): the outcome differs from the reference"
        # no lost notice; a repeat only where the process died after the SMTP server accepted it
        assert sorted(set(got)) == reference_mail, (n, label)
        repeats = len(got) - len(set(got))
        assert repeats == (1 if label == "notice.accepted" else 0), (n, label, got)


def test_killed_again_and_again_it_still_gets_there(origin, tmp_path):
    """Runs that keep dying early (at their 2nd, 3rd or 4th step, in turn) still finish the work
    together, with the reference's result. (A run dying at the same early step forever could
    not: purging a file takes a step per storage location before its commit.)"""
    clone, at = origin
    with LocalMailbox(tmp_path / "mail-ref") as box:
        ref = clone()
        assert cli_run(ref, at, box.port).returncode == 0
    expected = ref.state()
    copy = clone()
    with LocalMailbox(tmp_path / "mail") as box:
        for attempt in range(60):
            r = cli_run(copy, at, box.port, **{CRASH_ENV: str(2 + attempt % 3)})
            if r.returncode == 0:
                break
            assert r.returncode == CRASH_EXIT, r.stderr
        else:
            pytest.fail("the job never finished")
        assert attempt > 5
        assert len(set(message_ids(box))) == 2
    assert copy.state() == expected
