"""The lifecycle job: the time rules of the policy documents, carried out by themselves.

One run (``labvault lifecycle run``, or the datastore service every
``DatastoreService.lifecycle_interval`` seconds) does, in this order:

1. accounts -- flagged as under 18: deactivated, roles removed, personal data removed;
   closed: active roles removed; tentative for 12 months, closed or deactivated for a year:
   personal data removed (role history and audit events kept);
2. retention -- experiments whose storage period expired and was not extended are
   crypto-shredded (every file's data key destroyed in one transaction with the experiment's
   deletion mark; the metadata stub and the audit events stay);
3. notices -- recorded in the ``notices`` outbox in the same transaction as the audit event
   of the decision behind them: the PI 30 and 7 days before expiry, facility staff before
   their access ends;
4. the outbox -- each unsent notice is sent through SMTP with a Message-ID derived from its
   key, then marked sent; a notice whose reason went away (retention extended, ...) is
   withdrawn;
5. chunks -- files whose data key was destroyed lose their chunks on every location.

Every step decides with :mod:`labvault.policies` (as ``SYSTEM``) inside its own write
transaction, so a run can die at any point: the next run sees what was committed and does the
rest, nothing twice. A notice is sent at least once (a crash after the SMTP server accepted it
and before it was marked sent sends it again, with the same Message-ID). ``dry_run`` plans the
same steps and changes nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parseaddr
from pathlib import Path

from sqlalchemy import delete, exists, func, or_, select, text
from sqlalchemy.orm import Session, sessionmaker
from traitlets import Integer, Unicode
from traitlets.config import LoggingConfigurable

from labvault import policies as p
from labvault.policies import Decision

from . import audit
from .access import experiment_value
from .mail import Mailer, MailError
from .models import (
    DataKey,
    DepartmentMembership,
    Experiment,
    ExternalIdentity,
    LocalCredential,
    Notice,
    PersonalShare,
    Role,
    RoleGrant,
    StoredFile,
    User,
    UserState,
)

#: The actor of the job's audit events.
ACTOR = "labvault:lifecycle"

#: What an erased account's display name becomes (unless the metadata exemption keeps it).
FORMER_USER = "former user"

# FOR TESTS ONLY (tests/test_lifecycle_crash.py): end the process abruptly at a step, as a
# power cut would. "N" = at the N-th step of this process, "label" or "label#K" = at the
# (K-th) step of that name. The step log appends one label per line.
CRASH_ENV = "LABVAULT_TEST_CRASH_AT"
STEP_LOG_ENV = "LABVAULT_TEST_STEP_LOG"
CRASH_EXIT = 86

_PG_LOCK_KEY = 0x6C765F6C696665  # "lv_life": one lifecycle run at a time per database


class LifecycleBusy(Exception):
    """Another run holds the lifecycle lock of this database."""


class _Steps:
    """Counts the job's steps; the crash hook of the tests lives here."""

    def __init__(self) -> None:
        self.count = 0
        self.by_label: dict[str, int] = {}
        self.crash_at = os.environ.get(CRASH_ENV, "")
        self.log = os.environ.get(STEP_LOG_ENV, "")

    def __call__(self, label: str) -> None:
        self.count += 1
        self.by_label[label] = self.by_label.get(label, 0) + 1
        if self.log:
            with open(self.log, "a") as f:
                f.write(label + "\n")
        if not self.crash_at:
            return
        at = self.crash_at
        if at.isdigit():
            hit = self.count == int(at)
        else:
            name, _, nth = at.partition("#")
            hit = name == label and self.by_label[label] == int(nth or 1)
        if hit:
            os._exit(CRASH_EXIT)


@dataclass
class Action:
    """One thing the job does (or, in a dry run, would do), with the rule behind it."""

    kind: str  # account.deactivate | account.remove_roles | account.erase | experiment.expire |
    #            notice.record | notice.send | notice.withdraw | notice.undeliverable | file.purge
    target: str
    rule: str
    reason: str
    ref: int | None = None  # the row it is about (user, experiment, notice, file)
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.kind:<20} {self.target}  [{self.rule}] {self.reason}"


@dataclass
class RunReport:
    now: datetime
    dry_run: bool
    planned: list[Action] = field(default_factory=list)  # dry run: what would happen
    done: list[Action] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


# --------------------------------------------------------------------------------------
# personal data: what is removed (also by a data subject's deletion request, see rights.py)
# --------------------------------------------------------------------------------------
#: Fields of ``users`` that are personal data and are removed (set to None).
PERSONAL_FIELDS = ("email", "institutional_email", "institutional_email_verified_at", "orcid", "phone",
                   "last_login_ip", "last_login_at")


def is_author(session: Session, user_id: int) -> bool:
    """Whether the user's name is part of experiments' descriptive metadata (as their PI)."""
    return bool(session.scalar(select(exists().where(Experiment.pi_id == user_id))))


def erase_personal_data(session: Session, user: User, now: datetime, *, keep_name: bool,
                        reason: str) -> dict:
    """Remove ``user``'s personal data inside the caller's transaction; return what went.

    Removed: e-mail addresses, ORCID, phone, last login IP and time, the display name (unless
    ``keep_name``: the metadata exemption for PIs of experiments), sign-in secrets (password
    hash, TOTP secret) and identity-provider identities, notices, the personal repository's
    files (crypto-shredded: their data keys are destroyed here, their chunks removed after
    the commit) and shares. Kept: the account row with its login name (the identifier that
    role history and the audit log refer to), institution, role grants, audit events.
    """
    erased = [f for f in PERSONAL_FIELDS if getattr(user, f) is not None]
    for f in PERSONAL_FIELDS:
        setattr(user, f, None)
    if user.email_visible:
        user.email_visible = False
    if not keep_name and user.display_name != FORMER_USER:
        user.display_name = FORMER_USER
        erased.append("display_name")
    if session.execute(delete(LocalCredential).where(LocalCredential.user_id == user.id)).rowcount:
        erased.append("password and TOTP secret")
    if session.execute(delete(ExternalIdentity).where(ExternalIdentity.user_id == user.id)).rowcount:
        erased.append("identity-provider identities")
    if session.execute(delete(Notice).where(Notice.user_id == user.id)).rowcount:
        erased.append("notices")
    files = session.scalars(select(StoredFile).where(StoredFile.owner_id == user.id,
                                                     StoredFile.deleted_at.is_(None))).all()
    for row in files:
        _shred(session, row, now, reason)
    shares = session.scalars(select(PersonalShare).where(
        or_(PersonalShare.owner_id == user.id, PersonalShare.shared_with_id == user.id),
        PersonalShare.revoked_at.is_(None))).all()
    for share in shares:
        share.revoked_at = now
    for m in session.scalars(select(DepartmentMembership).where(
            DepartmentMembership.user_id == user.id, DepartmentMembership.revoked_at.is_(None))):
        m.revoked_at = now
    user.anonymised_at = now
    return {"erased": erased, "personal_files": len(files), "personal_shares_ended": len(shares)}


def _shred(session: Session, row: StoredFile, now: datetime, reason: str) -> None:
    """Destroy a file's data key and mark it deleted (the chunks go after the commit)."""
    dk = session.get(DataKey, row.data_key_id) if row.data_key_id else None
    if dk is not None and dk.wrapped_key is not None:
        dk.wrapped_key = None
        dk.destroyed_at = now
    row.deleted_at = now
    row.deleted_reason = reason[:2000]


def active_roles(session: Session, user_id: int, now: datetime) -> list[RoleGrant]:
    return list(session.scalars(select(RoleGrant).where(
        RoleGrant.user_id == user_id, RoleGrant.revoked_at.is_(None),
        or_(RoleGrant.expires_at.is_(None), RoleGrant.expires_at > now)).order_by(RoleGrant.id)))


def account_record(session: Session, user: User, now: datetime) -> p.AccountRecord:
    return p.AccountRecord(
        user_id=user.id, state=user.state.value, under_18=user.under_18, created_at=user.created_at,
        closed_at=user.closed_at, deactivated_at=user.deactivated_at, anonymised_at=user.anonymised_at,
        active_roles=len(active_roles(session, user.id, now)),
    )


def revoke_roles(session: Session, user_id: int, now: datetime) -> list[dict]:
    """End a user's active role grants (the rows stay: role history)."""
    exids = dict(session.execute(select(Experiment.id, Experiment.exid)).all())
    out = []
    for g in active_roles(session, user_id, now):
        g.revoked_at = now
        where = (f"experiment:{exids.get(g.experiment_id)}" if g.experiment_id else
                 f"project:{g.project_id}" if g.project_id else f"department:{g.department_id}")
        out.append({"on": where, "role": g.role.value})
    return out


def address(user: User) -> str | None:
    """Where a user's notices go: their e-mail, else their institutional e-mail."""
    return user.email or user.institutional_email


# --------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------
class LifecycleJob(LoggingConfigurable):
    """Retention expiry, notices and account states, carried out by the time rules.

    The time spans are traits of :class:`labvault.policies.Policy` (retention_minimum_days,
    retention_notice_days, facility_access_days, facility_notice_days, tentative_account_days,
    closed_account_days); the mail server is :class:`labvault.datastore.mail.Mailer`'s.
    """

    message_id_domain = Unicode(
        "",
        help="""Domain of the Message-ID header of notices (default: the domain of
        Mailer.sender). The Message-ID is derived from the notice's key, so a notice sent twice
        (after a crash between the SMTP server's acceptance and marking it sent) carries the
        same Message-ID both times and mail clients show it once.""",
    ).tag(config=True)

    max_items = Integer(
        1000,
        help="""Most items of each kind (accounts, experiments, notices, files) one run handles;
        the rest is left to the next run. Keeps a run inside the service short.""",
    ).tag(config=True)

    def __init__(self, sessions: sessionmaker, *, store=None, mailer: Mailer | None = None,
                 policy: p.Policy | None = None, **kwargs):
        super().__init__(**kwargs)
        self.sessions = sessions
        self.store = store  # a ChunkStore: without it, chunks of shredded files are left to scrub
        self.mailer = mailer if mailer is not None else Mailer(parent=self)
        self.policy = policy if policy is not None else p.default_policy()
        self._step = _Steps()

    # ----------------------------------------------------------------------------------
    # the outer method
    # ----------------------------------------------------------------------------------
    def run(self, now: datetime, *, dry_run: bool = False) -> RunReport:
        """One run at ``now``. ``dry_run``: return what would happen, change nothing."""
        report = RunReport(now=now, dry_run=dry_run)
        phases = (self.plan_accounts, self.plan_expiry, self.plan_notices, self.plan_outbox, self.plan_purge)
        if dry_run:
            for plan in phases:
                report.planned += plan(now)
            # notices recorded by this run are sent by it too
            report.planned += [Action("notice.send", a.target, a.rule, f"e-mail: {a.extra['subject']}")
                               for a in report.planned if a.kind == "notice.record"]
            return report
        with self._lock():
            for plan in phases:
                for action in plan(now):
                    try:
                        if self.apply(action, now):
                            report.done.append(action)
                    except (MailError, OSError) as e:
                        report.errors.append(f"{action.kind} {action.target}: {e}")
        for action in report.done:
            self.log.info("lifecycle: %s", action.line())
        return report

    def apply(self, action: Action, now: datetime) -> bool:
        """Carry out one planned action, deciding again in its own transaction (the world may
        have changed since it was planned). True when it changed something."""
        handler = getattr(self, "_apply_" + action.kind.replace(".", "_"), None)
        if handler is None:  # notice.undeliverable: reported, nothing to do
            return False
        return handler(action, now)

    # ----------------------------------------------------------------------------------
    # locking: one run at a time (the service's timer and a cron job may overlap)
    # ----------------------------------------------------------------------------------
    @contextmanager
    def _lock(self) -> Iterator[None]:
        engine = self.sessions.kw["bind"]
        if engine.dialect.name == "postgresql":
            conn = engine.connect()
            try:
                got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _PG_LOCK_KEY}).scalar()
                conn.commit()
                if not got:
                    raise LifecycleBusy("another lifecycle run is in progress on this database")
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                    conn.commit()
            finally:
                conn.close()
            return
        database = engine.url.database
        if not database or database == ":memory:":
            yield
            return
        with open(Path(database).with_name(Path(database).name + ".lifecycle-lock"), "a") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LifecycleBusy("another lifecycle run is in progress on this database") from None
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _audit(self, session: Session, action: str, target: str, decision: Decision, now: datetime,
               details: dict | None = None) -> None:
        audit.append(session, actor=ACTOR, action=action, target=target, decision=decision,
                     details=details, now=now, ipv4_masked_bytes=self.policy.ipv4_masked_bytes,
                     ipv6_prefix_bits=self.policy.ipv6_prefix_bits)

    def _decide(self, action: str, resource: object, now: datetime) -> Decision:
        return self.policy.decide(p.SYSTEM, action, resource, now)

    # ----------------------------------------------------------------------------------
    # 1. accounts
    # ----------------------------------------------------------------------------------
    def plan_accounts(self, now: datetime) -> list[Action]:
        cutoff_t, cutoff_c = self.policy.tentative_cutoff(now), self.policy.closed_cutoff(now)
        live_grant = exists().where(RoleGrant.user_id == User.id, RoleGrant.revoked_at.is_(None),
                                    or_(RoleGrant.expires_at.is_(None), RoleGrant.expires_at > now))
        not_erased = User.anonymised_at.is_(None)
        candidates = or_(
            User.under_18.is_(True) & (not_erased | User.state.not_in([UserState.deactivated, UserState.closed])
                                       | live_grant),
            (User.state == UserState.closed) & live_grant,
            (User.state == UserState.tentative) & not_erased & (User.created_at <= cutoff_t),
            (User.state == UserState.closed) & not_erased & (User.closed_at <= cutoff_c),
            (User.state == UserState.deactivated) & not_erased & (User.deactivated_at <= cutoff_c),
        )
        out = []
        with self.sessions() as s:
            for user in s.scalars(select(User).where(candidates).order_by(User.id).limit(self.max_items)):
                record = account_record(s, user, now)
                for kind, action in (("account.deactivate", "deactivate"),
                                     ("account.remove_roles", "remove_roles"),
                                     ("account.erase", "erase_personal_data")):
                    d = self._decide(action, record, now)
                    if d.allowed:
                        out.append(Action(kind, f"user:{user.name}", d.rule, d.reason, user.id))
        return out

    def _locked_user(self, s: Session, user_id: int) -> User | None:
        return s.get(User, user_id, with_for_update=True)

    def _apply_account_deactivate(self, a: Action, now: datetime) -> bool:
        with self.sessions.begin() as s:
            user = self._locked_user(s, a.ref)
            if user is None:
                return False
            d = self._decide("deactivate", account_record(s, user, now), now)
            if not d.allowed:
                return False
            before = user.state.value
            user.state, user.deactivated_at = UserState.deactivated, now
            self._audit(s, "account.deactivate", a.target, d, now, {"from": before})
        self._step("account.deactivate")
        return True

    def _apply_account_remove_roles(self, a: Action, now: datetime) -> bool:
        with self.sessions.begin() as s:
            user = self._locked_user(s, a.ref)
            if user is None:
                return False
            d = self._decide("remove_roles", account_record(s, user, now), now)
            if not d.allowed:
                return False
            self._audit(s, "account.remove_roles", a.target, d, now, {"roles": revoke_roles(s, user.id, now)})
        self._step("account.remove_roles")
        return True

    def _apply_account_erase(self, a: Action, now: datetime) -> bool:
        with self.sessions.begin() as s:
            user = self._locked_user(s, a.ref)
            if user is None:
                return False
            d = self._decide("erase_personal_data", account_record(s, user, now), now)
            if not d.allowed:
                return False
            keep_name = not user.under_18 and is_author(s, user.id)
            summary = erase_personal_data(s, user, now, keep_name=keep_name,
                                          reason=f"personal data removed: {d.reason} ({d.rule})")
            if keep_name:
                summary["kept"] = "display name (descriptive metadata of experiments: privacy.metadata_exempt)"
            self._audit(s, "account.erase", a.target, d, now, summary)
            self._step("account.erase.before_commit")
        self._step("account.erase")
        return True

    # ----------------------------------------------------------------------------------
    # 2. retention expiry: crypto-shred, keep the stub
    # ----------------------------------------------------------------------------------
    def plan_expiry(self, now: datetime) -> list[Action]:
        out = []
        with self.sessions() as s:
            rows = s.scalars(select(Experiment).where(
                Experiment.deleted_at.is_(None), Experiment.retain_until.is_not(None),
                Experiment.retain_until <= now).order_by(Experiment.retain_until, Experiment.id)
                .limit(self.max_items)).all()
            for e in rows:
                d = self._decide("expire", experiment_value(s, e), now)
                if d.allowed:
                    n = s.scalar(select(func.count()).select_from(StoredFile).where(
                        StoredFile.experiment_id == e.id, StoredFile.deleted_at.is_(None)))
                    out.append(Action("experiment.expire", f"experiment:{e.exid}", d.rule,
                                      f"{d.reason}: crypto-shred {n} file(s), keep the metadata stub",
                                      e.id, {"files": n}))
        return out

    def _apply_experiment_expire(self, a: Action, now: datetime) -> bool:
        with self.sessions.begin() as s:
            e = s.get(Experiment, a.ref, with_for_update=True)
            if e is None:
                return False
            d = self._decide("expire", experiment_value(s, e), now)
            if not d.allowed:
                return False
            files = s.scalars(select(StoredFile).where(StoredFile.experiment_id == e.id,
                                                       StoredFile.deleted_at.is_(None))).all()
            reason = (f"retention expired on {e.retain_until:%Y-%m-%d} and was not extended "
                      "(retention.expiry_deletes)")
            for row in files:
                _shred(s, row, now, reason)
            e.deleted_at, e.deleted_reason, e.status = now, d.reason, "deleted"
            self._audit(s, "retention.expire", a.target, d, now, {
                "retain_until": e.retain_until.isoformat(), "files": len(files),
                "bytes": sum(r.size or 0 for r in files)})
            self._step("expire.before_commit")
        self._step("expire")
        return True

    # ----------------------------------------------------------------------------------
    # 3. notices: recorded with the decision, sent by the outbox
    # ----------------------------------------------------------------------------------
    def plan_notices(self, now: datetime) -> list[Action]:
        out: list[Action] = []
        with self.sessions() as s:
            known = set()
            horizon = max(self.policy.retention_notice_days or [0])
            if horizon > 0:
                for e in s.scalars(select(Experiment).where(
                        Experiment.deleted_at.is_(None), Experiment.retain_until > now,
                        Experiment.retain_until <= now + timedelta(days=horizon))
                        .order_by(Experiment.retain_until, Experiment.id).limit(self.max_items)):
                    ev = experiment_value(s, e)
                    days = self.policy.retention_notice_due(ev, now)
                    if days is None:
                        continue
                    key = f"retention:{e.exid}:{days}d:{e.retain_until:%Y-%m-%d}"
                    out += self._notice(s, key, known, "retention", ev, days, s.get(User, e.pi_id), now,
                                        e.retain_until)
            horizon = max(self.policy.facility_notice_days or [0])
            if horizon > 0:
                cutoff = self.policy.facility_cutoff(now)
                rows = s.execute(select(RoleGrant, Experiment).join(Experiment, Experiment.id == RoleGrant.experiment_id)
                                 .where(RoleGrant.role == Role.facility_staff, RoleGrant.revoked_at.is_(None),
                                        or_(RoleGrant.expires_at.is_(None), RoleGrant.expires_at > now),
                                        Experiment.deleted_at.is_(None), Experiment.end_at > cutoff,
                                        Experiment.end_at <= cutoff + timedelta(days=horizon))
                                 .order_by(Experiment.end_at, RoleGrant.id).limit(self.max_items)).all()
                for g, e in rows:
                    ev = experiment_value(s, e)
                    ends = self.policy.facility_access_ends(ev)
                    days = self.policy.facility_notice_due(ev, now)
                    if days is None or (g.expires_at is not None and g.expires_at < ends):
                        continue  # the grant itself ends first: that is what the staff member was told
                    user = s.get(User, g.user_id)
                    key = f"facility_access:{e.exid}:{user.name}:{days}d:{ends:%Y-%m-%d}"
                    out += self._notice(s, key, known, "facility_access", ev, days, user, now, ends)
        return out

    def _notice(self, s: Session, key: str, known: set, kind: str, ev: p.Experiment, days: int,
                user: User | None, now: datetime, when: datetime) -> list[Action]:
        if key in known or s.scalar(select(Notice.id).where(Notice.key == key)) is not None:
            return []
        known.add(key)
        d = self._decide("notify", p.ExpiryNotice(ev, kind, days), now)
        if not d.allowed:
            return []
        target = f"user:{user.name}" if user else "user:?"
        if user is None or user.state != UserState.active or not address(user):
            why = "has no active account" if user is None or user.state != UserState.active else "has no e-mail address"
            return [Action("notice.undeliverable", target, d.rule, f"{d.reason}; not sent: the recipient {why}")]
        subject, body = _notice_text(kind, ev.exid, when, now, user)
        return [Action("notice.record", target, d.rule, d.reason, user.id,
                       {"key": key, "kind": kind, "exid": ev.exid, "days": days, "subject": subject,
                        "body": body})]

    def _apply_notice_record(self, a: Action, now: datetime) -> bool:
        with self.sessions.begin() as s:
            if s.scalar(select(Notice.id).where(Notice.key == a.extra["key"])) is not None:
                return False  # recorded by an earlier (interrupted) run
            e = s.scalar(select(Experiment).where(Experiment.exid == a.extra["exid"]))
            if e is None:
                return False
            d = self._decide("notify", p.ExpiryNotice(experiment_value(s, e), a.extra["kind"], a.extra["days"]), now)
            if not d.allowed:
                return False
            s.add(Notice(key=a.extra["key"], kind=a.extra["kind"], rule=d.rule, user_id=a.ref,
                         subject=a.extra["subject"], body=a.extra["body"], created_at=now))
            self._audit(s, "notice.record", a.target, d, now, {"key": a.extra["key"]})
        self._step("notice.record")
        return True

    # ----------------------------------------------------------------------------------
    # 4. the outbox
    # ----------------------------------------------------------------------------------
    def plan_outbox(self, now: datetime) -> list[Action]:
        out = []
        with self.sessions() as s:
            for n in s.scalars(select(Notice).where(Notice.sent_at.is_(None)).order_by(Notice.id)
                               .limit(self.max_items)):
                user = s.get(User, n.user_id) if n.user_id is not None else None
                target = f"user:{user.name}" if user else "user:?"
                obsolete = self._obsolete(s, n, user, now)
                if obsolete:
                    out.append(Action("notice.withdraw", target, n.rule, obsolete, n.id, {"key": n.key}))
                else:
                    out.append(Action("notice.send", target, n.rule, f"e-mail: {n.subject}", n.id, {"key": n.key}))
        return out

    def _obsolete(self, s: Session, n: Notice, user: User | None, now: datetime) -> str:
        """Why a recorded notice should no longer be sent ('' if it should)."""
        if user is None or user.state != UserState.active or not address(user):
            return "the recipient can no longer be reached (account not active or no e-mail address)"
        parts = n.key.split(":")
        if n.kind not in ("retention", "facility_access") or len(parts) < 4:
            return ""
        e = s.scalar(select(Experiment).where(Experiment.exid == parts[1]))
        if e is None or e.deleted_at is not None:
            return f"{parts[1]} was deleted meanwhile"
        if n.kind == "retention":
            if e.retain_until is None or f"{e.retain_until:%Y-%m-%d}" != parts[-1]:
                return f"the storage period of {e.exid} was changed meanwhile"
            if now >= e.retain_until:
                return f"the storage period of {e.exid} has ended"
            return ""
        ends = self.policy.facility_access_ends(experiment_value(s, e))
        if ends is None or f"{ends:%Y-%m-%d}" != parts[-1] or now >= ends:
            return f"facility staff access to {e.exid} changed or ended meanwhile"
        if not any(g.role == Role.facility_staff and g.experiment_id == e.id for g in active_roles(s, user.id, now)):
            return f"{user.name} holds no facility staff role on {e.exid} any more"
        return ""

    def message_id(self, key: str) -> str:
        """The Message-ID of a notice: the same for every attempt to send it."""
        domain = self.message_id_domain or parseaddr(self.mailer.sender)[1].rpartition("@")[2] or "labvault.invalid"
        return f"<notice-{hashlib.sha256(key.encode()).hexdigest()[:40]}@{domain}>"

    def _apply_notice_withdraw(self, a: Action, now: datetime) -> bool:
        with self.sessions.begin() as s:
            n = s.get(Notice, a.ref, with_for_update=True)
            if n is None or n.sent_at is not None:
                return False
            s.delete(n)
            self._audit(s, "notice.withdraw", a.target, Decision(True, a.rule, a.reason), now, {"key": a.extra["key"]})
        self._step("notice.withdraw")
        return True

    def _apply_notice_send(self, a: Action, now: datetime) -> bool:
        with self.sessions() as s:
            n = s.get(Notice, a.ref)
            if n is None or n.sent_at is not None:
                return False
            user = s.get(User, n.user_id)
            if self._obsolete(s, n, user, now):
                return False  # the next run withdraws it
            to, subject, body, key = address(user), n.subject, n.body, n.key
        headers = {"Message-ID": self.message_id(key), "X-Labvault-Notice": key,
                   "Auto-Submitted": "auto-generated"}
        try:
            self.mailer.send(to, subject, body, headers)
        except MailError as e:
            with self.sessions.begin() as s:
                n = s.get(Notice, a.ref)
                if n is not None:
                    n.attempts += 1
                    n.last_error = str(e)[:1000]
            raise
        self._step("notice.accepted")  # a crash here sends it again next time (same Message-ID)
        with self.sessions.begin() as s:
            n = s.get(Notice, a.ref, with_for_update=True)
            if n is None or n.sent_at is not None:
                return False
            n.sent_at, n.attempts, n.last_error = now, n.attempts + 1, None
            self._audit(s, "notice.send", a.target, Decision(True, n.rule, f"e-mail accepted by the SMTP server: {n.subject}"),
                        now, {"key": key, "message_id": headers["Message-ID"]})
        self._step("notice.send")
        return True

    # ----------------------------------------------------------------------------------
    # 5. chunks of crypto-shredded files
    # ----------------------------------------------------------------------------------
    def plan_purge(self, now: datetime) -> list[Action]:
        if self.store is None:
            return []
        out = []
        with self.sessions() as s:
            rows = s.execute(select(StoredFile.id, StoredFile.path, StoredFile.deleted_at, Experiment.exid, User.name)
                             .outerjoin(Experiment, Experiment.id == StoredFile.experiment_id)
                             .outerjoin(User, User.id == StoredFile.owner_id)
                             .where(StoredFile.deleted_at.is_not(None), StoredFile.purged_at.is_(None),
                                    StoredFile.uuid.is_not(None))
                             .order_by(StoredFile.id).limit(self.max_items)).all()
        for fid, path, deleted_at, exid, owner in rows:
            target = f"file:{exid}/{path}" if exid else f"personal:{owner}/{path}"
            out.append(Action("file.purge", target, "retention.deleted",
                              f"data key destroyed on {deleted_at:%Y-%m-%d}: remove its chunks from every location", fid))
        return out

    def _apply_file_purge(self, a: Action, now: datetime) -> bool:
        return purge_file(self.sessions, self.store, a.ref, now, self._step)


def purge_file(sessions: sessionmaker, store, file_id: int, now: datetime, step=lambda label: None) -> bool:
    """Remove a crypto-shredded file's chunks from every location of ``store``, then mark it
    purged. Raises OSError (after trying every location) if one could not delete: the next
    lifecycle run, or ``labvault scrub``, retries. True when it changed something."""
    from .store.format import object_key

    with sessions() as s:
        row = s.get(StoredFile, file_id)
        if row is None or row.deleted_at is None or row.purged_at is not None or not row.uuid:
            return False
        dk = s.get(DataKey, row.data_key_id) if row.data_key_id else None
        if dk is not None and dk.wrapped_key is not None:
            raise OSError(f"file {file_id}: its data key was not destroyed; its chunks stay")
        key = object_key(row.uuid)
    failed = []
    for name, backend in store.backends.items():
        try:
            backend.delete(key)
        except Exception as e:  # a location that is down: the next run (or scrub) retries
            failed.append(f"{name}: {e}")
        step("purge.location")
    if failed:
        raise OSError(f"chunks remain on {'; '.join(failed)}")
    with sessions.begin() as s:
        row = s.get(StoredFile, file_id)
        if row.purged_at is None:
            row.purged_at = now
    step("purge")
    return True


def _notice_text(kind: str, exid: str, when: datetime, now: datetime, user: User) -> tuple[str, str]:
    left = max(0, (when - now).days)
    day = f"{when:%Y-%m-%d %H:%M} UTC"
    name = user.display_name or user.name
    if kind == "retention":
        return (f"labvault: the data of {exid} will be deleted on {when:%Y-%m-%d}",
                f"Dear {name},\n\n"
                f"the storage period of experiment {exid} ends on {day} (in {left} days). Unless you\n"
                "extend it before then, its files will be permanently deleted (their keys destroyed\n"
                "and every copy removed); its description and audit trail stay.\n\n"
                "To keep the data longer, extend its retention in labvault (the retention widget, or\n"
                f"POST /services/labvault/api/v1/experiments/{exid}/retention).\n\n"
                "This notice is sent by labvault's lifecycle job (rule retention.expiry_notice).\n")
    return (f"labvault: your access to {exid} ends on {when:%Y-%m-%d}",
            f"Dear {name},\n\n"
            f"your facility staff access to experiment {exid} ends on {day} (in {left} days),\n"
            "as facility staff lose access to proprietary data a fixed time after an experiment\n"
            "concludes. Copy nothing you are not allowed to keep; ask the experiment's PI for a\n"
            "role if you need access for longer.\n\n"
            "This notice is sent by labvault's lifecycle job (rule facility.access_notice).\n")


__all__ = ["LifecycleJob", "LifecycleBusy", "Action", "RunReport", "erase_personal_data", "is_author", "purge_file",
           "revoke_roles", "account_record", "active_roles", "address", "FORMER_USER", "ACTOR"]
