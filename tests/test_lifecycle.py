"""The lifecycle job on SQLite and PostgreSQL: every time rule on its before and after side.

Mail goes through a real SMTP server (aiosmtpd on loopback); files are stored encrypted by the
real chunk store; time is the ``now`` the job is given (the CLI's ``--now``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hubtools import free_port
from sqlalchemy import func, select, update
from store_support import make_store, object_path

from labvault import policies as p
from labvault.datastore import audit, demo, rights
from labvault.datastore import operations as ops
from labvault.datastore.cli import main
from labvault.datastore.lifecycle import FORMER_USER, LifecycleBusy, LifecycleJob
from labvault.datastore.mail import LocalMailbox, Mailer
from labvault.datastore.models import (
    AuditEvent,
    Base,
    DataKey,
    Experiment,
    ExternalIdentity,
    LocalCredential,
    Notice,
    RoleGrant,
    StoredFile,
    User,
    UserState,
)
from labvault.datastore.store import FileDeleted
from labvault.datastore.store.store import Home

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
OP = ops.Actor(operator="test")
DAY = timedelta(days=1)


class Env:
    """The demo world, a chunk store with one file in NLS-2026-0001, a mailbox, and the job."""

    def __init__(self, sessions, tmp_path: Path, box: LocalMailbox):
        self.sessions, self.tmp, self.box = sessions, tmp_path, box
        demo.seed(sessions, OP, now=T0)
        self.store = make_store(sessions, tmp_path / "data")
        self.ids = self.user_ids()
        self.alice = ops.Actor(user_id=self.ids["alice"])
        self.file = self.store.ingest_stream(self.alice, "NLS-2026-0001", "scan/frames.bin",
                                             [b"x" * 5000], now=T0).file
        self.policy = p.Policy()

    def user_ids(self) -> dict[str, int]:
        with self.sessions() as s:
            return dict(s.execute(select(User.name, User.id)).all())

    def job(self, port: int | None = None) -> LifecycleJob:
        return LifecycleJob(self.sessions, store=self.store, policy=self.policy,
                            mailer=Mailer(smtp_port=port or self.box.port, timeout=5))

    def run(self, now: datetime, **kw):
        report = self.job(**kw).run(now)
        return report

    def mails(self, to: str | None = None) -> list:
        return [m for m in self.box.messages() if to is None or m["To"] == to]

    def user(self, name: str) -> User:
        with self.sessions() as s:
            return s.scalar(select(User).where(User.name == name))

    def experiment(self, exid: str) -> Experiment:
        with self.sessions() as s:
            return s.scalar(select(Experiment).where(Experiment.exid == exid))

    def notices(self) -> list[Notice]:
        with self.sessions() as s:
            return list(s.scalars(select(Notice).order_by(Notice.id)))

    def events(self, action: str) -> list[AuditEvent]:
        with self.sessions() as s:
            return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)))

    def audit_count(self) -> int:
        with self.sessions() as s:
            return s.scalar(select(func.count()).select_from(AuditEvent))

    def personal_file(self, owner: str, path: str = "notes/draft.bin"):
        """A file of ``owner``'s personal repository, stored by its owner."""
        actor = ops.Actor(user_id=self.ids[owner])
        return self.store.ingest_stream(actor, Home(owner=owner), path, [b"p" * 3000], now=T0).file


@pytest.fixture
def box(tmp_path):
    with LocalMailbox(tmp_path / "mail") as mailbox:
        yield mailbox


@pytest.fixture
def env(sessions, tmp_path, box) -> Env:
    return Env(sessions, tmp_path, box)


def kinds(report) -> list[tuple[str, str, str]]:
    return [(a.kind, a.target, a.rule) for a in (report.planned or report.done)]


# ------------------------------------------------------------------------------------------
# retention: notices 30 and 7 days before, then crypto-shredding; the stub stays
# ------------------------------------------------------------------------------------------
def test_archiving_keeps_data_at_least_a_year(env):
    e = ops.archive_experiment(env.sessions, env.alice, "NLS-2026-0001", now=T0)
    assert (e.archived_at, e.retain_until) == (T0, T0 + 365 * DAY)
    with pytest.raises(ops.Denied, match="retention.default_minimum"):
        ops.extend_retention(env.sessions, env.alice, "NLS-2026-0001", T0 + 200 * DAY, now=T0 + DAY)
    # a retain_until cut below the minimum by hand does not make the job delete early
    with env.sessions.begin() as s:
        s.execute(update(Experiment).where(Experiment.exid == "NLS-2026-0001").values(retain_until=T0 + 100 * DAY))
    report = env.run(T0 + 200 * DAY)
    assert "experiment.expire" not in [a.kind for a in report.done]
    assert env.experiment("NLS-2026-0001").deleted_at is None
    assert env.job().plan_expiry(T0 + 365 * DAY)[0].rule == "retention.expiry_deletes"


def test_retention_notices_then_expiry_crypto_shreds_and_keeps_the_stub(env):
    ops.archive_experiment(env.sessions, env.alice, "NLS-2026-0001", now=T0)
    expires = T0 + 365 * DAY

    # before the 30-day window: nothing for alice
    env.run(expires - 30 * DAY - timedelta(seconds=1))
    assert env.mails("alice@alpine-uni.example") == [] and env.notices() == []

    # 30 days before: one notice, recorded with its decision, sent, marked sent
    report = env.run(expires - 30 * DAY)
    assert [(a.kind, a.rule) for a in report.done] == [("notice.record", "retention.expiry_notice"),
                                                       ("notice.send", "retention.expiry_notice")]
    [mail] = env.mails("alice@alpine-uni.example")
    [notice] = env.notices()
    assert notice.key == "retention:NLS-2026-0001:30d:2027-06-01"
    assert (notice.sent_at, notice.attempts, notice.user_id) == (expires - 30 * DAY, 1, env.ids["alice"])
    assert mail["Message-ID"] == env.job().message_id(notice.key)
    assert "NLS-2026-0001" in mail["Subject"] and "2027-06-01" in mail.get_content()
    assert [e.rule for e in env.events("notice.record")] == ["retention.expiry_notice"]

    # once each: the same window again, and later inside it, records and sends nothing
    before = env.audit_count()
    assert env.run(expires - 30 * DAY).done == []
    assert env.run(expires - 10 * DAY).done == []
    assert len(env.mails()) == 1 and env.audit_count() == before

    # 7 days before: the second notice
    env.run(expires - 7 * DAY)
    assert [n.key for n in env.notices()] == ["retention:NLS-2026-0001:30d:2027-06-01",
                                              "retention:NLS-2026-0001:7d:2027-06-01"]
    assert len(env.mails("alice@alpine-uni.example")) == 2

    # a second before the end: still there
    env.run(expires - timedelta(seconds=1))
    assert env.experiment("NLS-2026-0001").deleted_at is None
    with env.store.open(env.file.id) as f:
        assert f.read(10) == b"x" * 10

    # at the end: every file's key destroyed, the chunks removed, the stub kept
    report = env.run(expires)
    assert [(a.kind, a.target, a.rule) for a in report.done] == [
        ("experiment.expire", "experiment:NLS-2026-0001", "retention.expiry_deletes"),
        ("file.purge", "file:NLS-2026-0001/scan/frames.bin", "retention.deleted")]
    e = env.experiment("NLS-2026-0001")
    assert (e.deleted_at, e.status, e.title) == (expires, "deleted", "Lysozyme soaking series")
    with env.sessions() as s:
        row = s.get(StoredFile, env.file.id)
        assert (row.deleted_at, row.purged_at, row.size) == (expires, expires, 5000)
        assert s.get(DataKey, row.data_key_id).wrapped_key is None
    for location in ("replica-1", "replica-2"):
        assert not object_path(env.store, location, env.file.uuid).exists()
    with pytest.raises(FileDeleted, match="retention expired on 2027-06-01"):
        env.store.open(env.file.id)
    [event] = env.events("retention.expire")
    assert (event.actor, event.allowed, event.rule, event.details["files"]) == (
        "labvault:lifecycle", True, "retention.expiry_deletes", 1)

    # done once: a rerun changes nothing and the chain is intact
    before = env.audit_count()
    assert env.run(expires + DAY).done == []
    assert env.audit_count() == before
    with env.sessions() as s:
        assert audit.verify(s).ok


def test_extended_retention_is_kept_and_a_stale_notice_is_withdrawn(env):
    ops.archive_experiment(env.sessions, env.alice, "NLS-2026-0001", now=T0)
    expires = T0 + 365 * DAY
    # the SMTP server is down 7 days before: the notice is recorded and waits
    report = env.run(expires - 7 * DAY, port=free_port())
    assert [a.kind for a in report.done] == ["notice.record"] and len(report.errors) == 1
    [notice] = env.notices()
    assert (notice.sent_at, notice.attempts) == (None, 1) and "SMTP server" in notice.last_error
    # the PI extends meanwhile: the stale notice is withdrawn, not sent; nothing is deleted
    ops.extend_retention(env.sessions, env.alice, "NLS-2026-0001", expires + 200 * DAY, now=expires - 6 * DAY)
    report = env.run(expires)
    assert [(a.kind, a.rule) for a in report.done] == [("notice.withdraw", "retention.expiry_notice")]
    assert env.notices() == [] and env.mails() == []
    assert env.experiment("NLS-2026-0001").deleted_at is None
    # the new date gets its own notices
    env.run(expires + 200 * DAY - 30 * DAY)
    assert [n.key for n in env.notices()] == ["retention:NLS-2026-0001:30d:2027-12-18"]
    assert len(env.mails("alice@alpine-uni.example")) == 1


def test_a_notice_waits_for_the_mail_server(env):
    ops.archive_experiment(env.sessions, env.alice, "NLS-2026-0001", now=T0)
    at = T0 + 340 * DAY
    down = free_port()
    for _ in range(2):
        report = env.run(at, port=down)
        assert report.errors and "notice.send user:alice" in report.errors[0]
    [notice] = env.notices()
    assert (notice.attempts, notice.sent_at) == (2, None)
    report = env.run(at + DAY)
    assert [a.kind for a in report.done] == ["notice.send"] and report.ok
    [notice] = env.notices()
    assert (notice.attempts, notice.sent_at, notice.last_error) == (3, at + DAY, None)
    assert len(env.mails()) == 1


# ------------------------------------------------------------------------------------------
# facility staff: told before their access ends
# ------------------------------------------------------------------------------------------
def test_facility_staff_are_told_before_their_access_ends(env):
    # NLS-2026-0001 ended at T0 - 10 days: frank's access ends 30 days later, at T0 + 20 days
    ends = T0 + 20 * DAY
    env.run(ends - 7 * DAY - timedelta(seconds=1))
    assert env.mails("frank@nls.example") == []
    report = env.run(ends - 7 * DAY)
    assert ("notice.record", "user:frank", "facility.access_notice") in kinds(report)
    [mail] = env.mails("frank@nls.example")
    assert "NLS-2026-0001" in mail["Subject"] and "ends on" in mail["Subject"]
    # once; never for NLS-2025-0042 (its window closed before T0); never after the end
    env.run(ends - DAY)
    env.run(ends + DAY)
    assert len(env.mails("frank@nls.example")) == 1
    assert [n.key for n in env.notices()] == ["facility_access:NLS-2026-0001:frank:7d:2026-06-21"]


def test_no_facility_notice_for_a_revoked_grant_or_an_inactive_account(env):
    ops.add_user(env.sessions, OP, "fiona", institution=demo.FACILITY, email="fiona@nls.example", now=T0)
    ops.grant_role(env.sessions, env.alice, "NLS-2026-0001", "fiona", "facility_staff", now=T0)
    ops.revoke_role(env.sessions, env.alice, "NLS-2026-0001", "frank", now=T0)
    ops.set_user_state(env.sessions, OP, "fiona", "deactivated", now=T0)
    report = env.job().run(T0 + 13 * DAY, dry_run=True)
    # frank: revoked, nothing; fiona: not active, so reported as undeliverable, never recorded
    assert [(a.kind, a.target) for a in report.planned] == [("notice.undeliverable", "user:fiona")]
    assert "no active account" in report.planned[0].reason
    env.run(T0 + 13 * DAY)
    assert env.notices() == [] and env.mails() == []
    ops.set_user_state(env.sessions, OP, "fiona", "active", now=T0)
    report = env.job().run(T0 + 13 * DAY, dry_run=True)
    assert [(a.kind, a.target) for a in report.planned] == [("notice.record", "user:fiona"),
                                                           ("notice.send", "user:fiona")]


# ------------------------------------------------------------------------------------------
# accounts
# ------------------------------------------------------------------------------------------
def test_an_unconfirmed_account_loses_its_personal_data_after_12_months(env):
    ops.add_user(env.sessions, OP, "tina", institution=demo.UNI, display_name="Tina Tentative",
                 email="tina@alpine-uni.example", orcid="0000-0002-1825-0097", state="tentative", now=T0)
    ids = env.user_ids()
    with env.sessions.begin() as s:
        s.add(LocalCredential(user_id=ids["tina"], password_hash="$argon2id$x", created_at=T0))
        s.add(ExternalIdentity(user_id=ids["tina"], idp="https://idp.example", subject="t-1", claims={}))
    env.run(T0 + 365 * DAY - timedelta(seconds=1))
    assert env.user("tina").email == "tina@alpine-uni.example"
    report = env.run(T0 + 365 * DAY)
    assert kinds(report) == [("account.erase", "user:tina", "privacy.tentative_expiry")]
    tina = env.user("tina")
    assert (tina.email, tina.orcid, tina.display_name, tina.anonymised_at) == (None, None, FORMER_USER, T0 + 365 * DAY)
    assert tina.name == "tina"  # the identifier the audit log refers to
    with env.sessions() as s:
        assert s.get(LocalCredential, ids["tina"]) is None
        assert s.scalar(select(ExternalIdentity).where(ExternalIdentity.user_id == ids["tina"])) is None
    [event] = env.events("account.erase")
    assert "tina@" not in str(event.details) and "email" in event.details["erased"]
    assert env.run(T0 + 400 * DAY).done == []


def test_a_closed_account_loses_its_roles_at_once_and_its_data_after_a_year(env):
    personal = env.personal_file("bob")
    # closed by a path that left the roles (the CLI's `user state` revokes them itself)
    with env.sessions.begin() as s:
        s.execute(update(User).where(User.name == "bob").values(state=UserState.closed, closed_at=T0))
    report = env.run(T0)
    assert kinds(report) == [("account.remove_roles", "user:bob", "privacy.closed_roles_removed")]
    with env.sessions() as s:
        grants = s.scalars(select(RoleGrant).where(RoleGrant.user_id == env.ids["bob"])).all()
    assert [(g.role.value, g.revoked_at) for g in grants] == [("writer", T0)]  # the history stays

    env.run(T0 + 364 * DAY)
    assert env.user("bob").email == "bob@alpine-uni.example"
    with env.sessions() as s:
        bobs_events = s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.actor == "bob"))
    assert bobs_events >= 1  # his upload
    report = env.run(T0 + 365 * DAY)
    assert ("account.erase", "user:bob", "privacy.closed_anonymised") in kinds(report)
    bob = env.user("bob")
    assert (bob.email, bob.display_name, bob.anonymised_at) == (None, FORMER_USER, T0 + 365 * DAY)
    with env.sessions() as s:
        assert s.scalar(select(func.count()).select_from(RoleGrant).where(RoleGrant.user_id == bob.id)) == 1
        row = s.get(StoredFile, personal.id)
        assert row.deleted_at == T0 + 365 * DAY and row.purged_at == T0 + 365 * DAY
        assert s.get(DataKey, row.data_key_id).wrapped_key is None
        # his activity log stays, under his account name (privacy.role_history_kept)
        assert s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.actor == "bob")) == bobs_events
    assert not object_path(env.store, "replica-1", personal.uuid).exists()


def test_a_closed_pi_keeps_the_name_in_experiment_metadata(env):
    ops.set_user_state(env.sessions, OP, "alice", "closed", now=T0)  # revokes roles itself
    assert [a.kind for a in env.run(T0).done] == []
    env.run(T0 + 365 * DAY)
    alice = env.user("alice")
    assert (alice.display_name, alice.email, alice.institutional_email) == ("Alice Aebi", None, None)
    [event] = env.events("account.erase")
    assert "privacy.metadata_exempt" in event.details["kept"]


def test_a_deactivated_account_is_anonymised_a_year_after(env):
    ops.set_user_state(env.sessions, OP, "carol", "deactivated", now=T0)
    env.run(T0 + 300 * DAY)
    assert env.user("carol").anonymised_at is None
    report = env.run(T0 + 365 * DAY)
    assert kinds(report) == [("account.erase", "user:carol", "privacy.closed_anonymised")]


def test_an_account_of_a_minor_is_deactivated_and_its_data_removed(env):
    ops.grant_role(env.sessions, env.alice, "NLS-2026-0001", "carol", "viewer", now=T0)
    assert env.run(T0).done == []  # not flagged: nothing happens to carol
    rights.correct_account(env.sessions, OP, "carol", {"under_18": True}, now=T0)
    report = env.run(T0 + timedelta(hours=1))
    assert kinds(report) == [("account.deactivate", "user:carol", "privacy.minors"),
                             ("account.remove_roles", "user:carol", "privacy.minors"),
                             ("account.erase", "user:carol", "privacy.minors")]
    carol = env.user("carol")
    assert (carol.state, carol.email, carol.display_name) == (UserState.deactivated, None, FORMER_USER)
    [erase] = env.events("account.erase")
    assert erase.details["erased"][:1] == ["email"] and "display_name" in erase.details["erased"]
    assert env.run(T0 + 2 * DAY).done == []


# ------------------------------------------------------------------------------------------
# dry run, the CLI, one run at a time, the service's timer
# ------------------------------------------------------------------------------------------
def snapshot(sessions) -> dict:
    out = {}
    with sessions() as s:
        for table in Base.metadata.sorted_tables:
            rows = s.execute(select(table).order_by(*table.primary_key.columns)).all()
            out[table.name] = [tuple(r) for r in rows]
    return out


def busy_world(env) -> datetime:
    """Something of every kind due at the returned time."""
    ops.archive_experiment(env.sessions, env.alice, "NLS-2025-0042", now=T0 - 400 * DAY)  # expired
    ops.archive_experiment(env.sessions, env.alice, "NLS-2026-0001", now=T0)  # 30-day notice due
    ops.add_user(env.sessions, OP, "tina", institution=demo.UNI, email="t@alpine-uni.example",
                 state="tentative", now=T0 - 400 * DAY)
    env.personal_file("carol")
    ops.set_user_state(env.sessions, OP, "carol", "closed", now=T0 - 400 * DAY)
    rights.correct_account(env.sessions, OP, "vera", {"under_18": True}, now=T0)
    return T0 + 340 * DAY


def test_dry_run_lists_every_action_with_its_rule_and_changes_nothing(env):
    at = busy_world(env)
    before, files, mails = snapshot(env.sessions), sorted(env.tmp.rglob("*.lvc")), env.mails()
    report = env.job().run(at, dry_run=True)
    assert snapshot(env.sessions) == before
    assert sorted(env.tmp.rglob("*.lvc")) == files and env.mails() == mails
    planned = kinds(report)
    assert planned == [
        ("account.erase", "user:carol", "privacy.closed_anonymised"),
        ("account.deactivate", "user:vera", "privacy.minors"),
        ("account.erase", "user:vera", "privacy.minors"),
        ("account.erase", "user:tina", "privacy.tentative_expiry"),
        ("experiment.expire", "experiment:NLS-2025-0042", "retention.expiry_deletes"),
        ("notice.record", "user:alice", "retention.expiry_notice"),
        ("notice.send", "user:alice", "retention.expiry_notice"),
    ]
    assert all(a.reason for a in report.planned)
    # the real run does what the dry run said (and then purges the shredded files' chunks)
    done = kinds(env.job().run(at))
    assert done[:len(planned)] == planned
    assert [k for k, _, _ in done[len(planned):]] == ["file.purge"]


def test_the_cli_runs_the_job_and_its_dry_run(env, db_url, tmp_path, capsys):
    at = busy_world(env)
    args = [f"--db-url={db_url}", f"--data-dir={tmp_path / 'data'}", f"--Mailer.smtp_port={env.box.port}",
            "--ChunkStore.chunk_size=1024"]

    def cli(*more):
        capsys.readouterr()
        try:
            main(["lifecycle", "run", *more, *args])
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = cli("--now", at.isoformat(), "--dry-run")
    assert code == 0, err
    assert "dry run: nothing changed" in out and "would 7 action(s)" in out
    assert "experiment.expire    experiment:NLS-2025-0042  [retention.expiry_deletes]" in out
    assert "[privacy.minors]" in out and "[privacy.tentative_expiry]" in out
    assert env.notices() == []
    code, out, err = cli("--now", at.isoformat())
    assert code == 0, err
    assert "did 8 action(s)" in out and len(env.mails()) == 1
    code, out, err = cli("--now", at.isoformat())
    assert (code, out.splitlines()[-1]) == (0, "labvault: did 0 action(s)")
    code, out, err = cli("--now", "yesterday")
    assert code == 2 and err.startswith("labvault: bad --now 'yesterday'")


def test_one_run_at_a_time(env):
    first = env.job()
    with first._lock():
        with pytest.raises(LifecycleBusy, match="another lifecycle run"):
            env.job().run(T0)
    env.job().run(T0)  # released


def test_the_service_runs_the_job_by_itself(env, db_url, tmp_path):
    ops.archive_experiment(env.sessions, env.alice, "NLS-2026-0001", now=T0)
    clock = tmp_path / "clock"
    clock.write_text((T0 + 365 * DAY).isoformat())
    data = tmp_path / "data"
    (data / "labvault_config.py").write_text(
        f"c.Mailer.smtp_port = {env.box.port}\nc.ChunkStore.chunk_size = 1024\n"
        "c.DatastoreService.lifecycle_interval = 1\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "labvault.datastore.cli", "service", f"--data-dir={data}", f"--DatastoreService.port={port}", "--Application.log_level=INFO",
         f"--DatastoreService.fake_clock_file={clock}"],
        env={**__import__("os").environ, "LABVAULT_DB_URL": db_url}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and env.experiment("NLS-2026-0001").deleted_at is None:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
            time.sleep(0.2)
        e = env.experiment("NLS-2026-0001")
        assert e.deleted_at == T0 + 365 * DAY
        # it goes on: purging, and the next tick finds nothing new to do
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not env.events("retention.expire"):
            time.sleep(0.2)
        while time.monotonic() < deadline and object_path(env.store, "replica-1", env.file.uuid).exists():
            time.sleep(0.2)
        assert not object_path(env.store, "replica-1", env.file.uuid).exists()
        time.sleep(1.5)
        assert len(env.events("retention.expire")) == 1
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert b"lifecycle: experiment.expire" in out
