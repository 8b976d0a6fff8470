"""The policy engine: ``decide(subject, action, resource, now) -> Decision``.

Pure code: it reads the frozen values of :mod:`labvault.policies.model` and the time it is
given, and returns a Decision naming the rule (a key of :data:`labvault.policies.rules.RULES`)
and a reason a person can read. Anything no rule allows is denied (``default.deny``).
The time spans are traits of :class:`Policy`, with the defaults of the design.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timedelta

from traitlets import Bool, Integer, List, observe
from traitlets.config import LoggingConfigurable

from .model import (
    NESTED_ROLES,
    ROLES,
    Account,
    AccountRecord,
    Decision,
    Department,
    DepartmentAccessChange,
    Environment,
    Experiment,
    ExpiryNotice,
    File,
    NewExperiment,
    NewResultSet,
    Person,
    PersonalItem,
    Project,
    ProjectAccessChange,
    Registration,
    RequestRate,
    Result,
    ResultSet,
    RetentionChange,
    RoleChange,
    Share,
    SignIn,
    Subject,
    role_rank,
)

# Actions. Kept as plain strings so that callers and audit events read naturally.
READ = "read"
LIST = "list"
STUB = "stub"
MODIFY = "modify"
UPLOAD = "upload"
UPLOAD_RESULTS = "upload_results"
PUBLISH = "publish"
UNPUBLISH = "unpublish"
GRANT_ROLE = "grant_role"
REVOKE_ROLE = "revoke_role"
SHARE = "share"
CONFIRM_SHARE = "confirm_share"
EXTEND = "extend_retention"
ARCHIVE = "archive"
DELETE = "delete"
EXPIRE = "expire"
MIRROR = "mirror"
AGREE_MIRROR = "agree_mirror"
CREATE = "create"
ASSIGN_OWNER = "assign_owner"
READ_ACTIVITY = "read_activity_log"
READ_AUDIT = "read_audit_trail"
VIEW_PERSON = "view_person"
VIEW_EMAIL = "view_email"
USE = "use"
SERVICE_USE = "service_use"
MANAGE_ACCESS = "manage_access"
EXPORT = "export"
CORRECT = "correct"
CLOSE = "close"
DELETE_HISTORY = "delete_role_history"
ERASE_METADATA = "erase_metadata"
REQUEST = "request"
NOTIFY = "notify"
ERASE_PERSONAL = "erase_personal_data"
REMOVE_ROLES = "remove_roles"
DEACTIVATE = "deactivate"
REGISTER = "register"
SIGN_IN = "sign_in"

ACTIONS = frozenset(v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str))

Handler = Callable[[Subject, object, datetime], Decision]


def _allow(rule: str, reason: str) -> Decision:
    return Decision(True, rule, reason)


def _deny(rule: str, reason: str) -> Decision:
    return Decision(False, rule, reason)


def _listed(read: Decision) -> Decision:
    """A list view shows what may be read and hides the rest (list.hide_inaccessible)."""
    if read.allowed:
        return read
    return _deny("list.hide_inaccessible", f"not listed: {read.reason}")


def _day(t: datetime) -> str:
    return t.strftime("%Y-%m-%d")


#: The decisions made in the current context, when someone records them (tests, debugging).
_RECORDER: ContextVar[set[tuple[str, bool]] | None] = ContextVar("labvault_decisions", default=None)


@contextmanager
def recording_decisions() -> Iterator[set[tuple[str, bool]]]:
    """Collect ``(rule, allowed)`` of every decision made in this context (thread or task)."""
    seen: set[tuple[str, bool]] = set()
    token = _RECORDER.set(seen)
    try:
        yield seen
    finally:
        _RECORDER.reset(token)


class Policy(LoggingConfigurable):
    """Every rule of the policy documents, as one configurable decision function."""

    facility_access_days = Integer(
        30,
        help="""Days after an experiment ends during which facility staff keep access.

        From the proprietary-data policy: facility staff scientists lose access to proprietary
        data thirty days after an experiment concludes. labvault applies the window to every
        facility_staff grant; an experiment without an end date has not concluded.
        """,
    ).tag(config=True)

    retention_minimum_days = Integer(
        365,
        help="""Minimum storage period of archived data, in days (default one year).

        Archiving sets retain_until to at least archive time + this; extensions may not set a
        date earlier than that. When retain_until passes and was not extended, the data is
        permanently deleted by the lifecycle job.
        """,
    ).tag(config=True)

    tentative_account_days = Integer(
        365,
        help="Days after which an unconfirmed (tentative) account's personal data is deleted.",
    ).tag(config=True)

    closed_account_days = Integer(
        365,
        help="""Days after closing (or deactivating) an account when its personal data is anonymised.

        Roles of a closed account are removed at once; role history and audit events are kept.
        The privacy statement: personal data from closed or inactive accounts is deleted or
        anonymised one year after the account is closed or deactivated.""",
    ).tag(config=True)

    retention_notice_days = List(
        Integer(),
        [30, 7],
        help="""Days before retention expiry at which the PI is notified (once each).

        The lifecycle job sends the notice of the smallest window it is in, so a run that
        starts 5 days before the expiry sends the 7-day notice only, not both.""",
    ).tag(config=True)

    facility_notice_days = List(
        Integer(),
        [7],
        help="""Days before their access to an experiment ends at which facility staff are told
        by e-mail (once each; the smallest window the lifecycle job is in). Empty: no notices.""",
    ).tag(config=True)

    ipv4_masked_bytes = Integer(
        2, help="Trailing bytes of an IPv4 address masked in access logs (2: 192.168.x.x)."
    ).tag(config=True)

    ipv6_prefix_bits = Integer(
        48, help="Leading bits of an IPv6 address kept in access logs (48 keeps the site prefix)."
    ).tag(config=True)

    totp_required_for_pis = Bool(
        True,
        help="""Local accounts of PIs (of an experiment, project or department) sign in with a
        TOTP code as a second factor; one who has not enrolled yet is asked to at the next
        sign-in. Anyone who enrolled voluntarily is asked for the code too. Identity-provider
        sign-ins leave the second factor to the identity provider.""",
    ).tag(config=True)

    totp_required_for_admins = Bool(
        False,
        help="""Local accounts of labvault admins sign in with a TOTP code as a second factor
        (as PIs do when totp_required_for_pis is set).""",
    ).tag(config=True)

    signin_lockout_attempts = Integer(
        5,
        help="""Failed sign-ins in a row (wrong password or wrong TOTP code) after which a local
        account is locked for signin_lockout_minutes. 0 disables the lockout.""",
    ).tag(config=True)

    signin_lockout_minutes = Integer(
        15,
        help="""Minutes a local account stays locked after signin_lockout_attempts failed
        sign-ins in a row. While locked, even the right password is refused.""",
    ).tag(config=True)

    results_need_every_project = Bool(
        True,
        help="""Uploading results to an experiment linked to projects needs access to every
        linked project (True) or to at least one (False). The result set inherits all of the
        experiment's projects, so the careful default is every one.""",
    ).tag(config=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._facility_window = timedelta(days=self.facility_access_days)
        self._retention_minimum = timedelta(days=self.retention_minimum_days)
        self._handlers: dict[tuple[type, str], Handler] = {}
        self._register()

    @observe("facility_access_days", "retention_minimum_days")
    def _spans_changed(self, change):
        self._facility_window = timedelta(days=self.facility_access_days)
        self._retention_minimum = timedelta(days=self.retention_minimum_days)

    # ----------------------------------------------------------------------------------
    # the one public entry point
    # ----------------------------------------------------------------------------------
    def decide(self, subject: Subject, action: str, resource: object, now: datetime) -> Decision:
        """Decide whether ``subject`` may do ``action`` on ``resource`` at ``now``."""
        handler = self._handlers.get((type(resource), action))
        if handler is None:
            decision = _deny("default.deny", f"no rule allows {action!r} on {type(resource).__name__}")
        else:
            decision = handler(subject, resource, now)
        recorder = _RECORDER.get()
        if recorder is not None:
            recorder.add((decision.rule, decision.allowed))
        return decision

    # ----------------------------------------------------------------------------------
    # time helpers (used by the datastore's SQL and lifecycle code, so there is one truth)
    # ----------------------------------------------------------------------------------
    def facility_cutoff(self, now: datetime) -> datetime:
        """Facility grants are valid for experiments whose end is after this instant."""
        return now - self._facility_window

    def facility_access_ends(self, experiment: Experiment) -> datetime | None:
        if experiment.end_at is None:
            return None
        return experiment.end_at + self._facility_window

    def minimum_retain_until(self, archived_at: datetime) -> datetime:
        return archived_at + self._retention_minimum

    def retention_expired(self, experiment: Experiment, now: datetime) -> bool:
        return (
            experiment.deleted_at is None
            and experiment.retain_until is not None
            and now >= experiment.retain_until
        )

    @staticmethod
    def _due(days: list[int], when: datetime | None, now: datetime) -> int | None:
        """The smallest of ``days`` whose window before ``when`` contains ``now``."""
        if when is None or now >= when:
            return None
        inside = [d for d in days if d > 0 and now >= when - timedelta(days=d)]
        return min(inside) if inside else None

    def retention_notice_due(self, experiment: Experiment, now: datetime) -> int | None:
        """Which retention notice (days before expiry) is due at ``now``, if any."""
        if experiment.deleted_at is not None:
            return None
        return self._due(self.retention_notice_days, experiment.retain_until, now)

    def facility_notice_due(self, experiment: Experiment, now: datetime) -> int | None:
        """Which facility access notice (days before the access ends) is due at ``now``."""
        if experiment.deleted_at is not None:
            return None
        return self._due(self.facility_notice_days, self.facility_access_ends(experiment), now)

    def tentative_cutoff(self, now: datetime) -> datetime:
        """Unconfirmed accounts created at or before this instant lose their personal data."""
        return now - timedelta(days=self.tentative_account_days)

    def closed_cutoff(self, now: datetime) -> datetime:
        """Accounts closed (or deactivated) at or before this instant are anonymised."""
        return now - timedelta(days=self.closed_account_days)

    # ----------------------------------------------------------------------------------
    # experiments
    # ----------------------------------------------------------------------------------
    def _account(self, s: Subject) -> Decision | None:
        """The account-state gate every registered subject passes first."""
        if s.state != "active":
            return _deny("account.state", f"account is {s.state}, not active")
        return None

    def _best_role(self, s: Subject, e: Experiment, now: datetime) -> tuple[str | None, bool, datetime | None]:
        """(strongest nested role, facility window open, facility window end if it closed)."""
        best = None
        facility_open = False
        facility_closed_at = None
        for g in s.grants.get(e.id, ()):
            if not g.active(now):
                continue
            if g.role == "facility_staff":
                ends = self.facility_access_ends(e)
                if ends is None or now < ends:
                    facility_open = True
                else:
                    facility_closed_at = ends
            elif best is None or role_rank(g.role) > role_rank(best):
                best = g.role
        return best, facility_open, facility_closed_at

    def read_experiment(self, s: Subject, e: Experiment, now: datetime) -> Decision:
        if s.user_id is None:  # anonymous visitors and the system
            if e.proprietary:
                return _deny("proprietary.never_public", f"{e.exid} is proprietary and never public")
            if e.public:
                return _allow("public.open_experiment", f"{e.exid} was made public by its PI")
            return _deny("account.state", "sign in to see experiments that are not public")
        gate = self._account(s)
        if gate:
            return gate
        if e.proprietary and s.is_vendor:
            return _deny("vendor.never", "vendor staff never access proprietary data")
        if e.pi_id == s.user_id:
            return _allow("proprietary.pi_owner", f"you are the PI of {e.exid}")
        best, facility_open, facility_closed_at = self._best_role(s, e, now)
        if best is not None:
            return _allow("role.grant", f"your {best} role on {e.exid}")
        if facility_open:
            ends = self.facility_access_ends(e)
            until = f"until {_day(ends)}" if ends else "while the experiment runs"
            return _allow("facility.access_window", f"facility staff access to {e.exid} {until}")
        if e.proprietary:
            if facility_closed_at is not None:
                return _deny(
                    "facility.access_window",
                    f"facility staff access to {e.exid} ended on {_day(facility_closed_at)}, "
                    f"{self.facility_access_days} days after the experiment ended",
                )
            return _deny(
                "proprietary.assigned_only",
                f"{e.exid} is proprietary: only users the PI assigned may access it",
            )
        if e.department_id is not None and e.department_id in s.read_departments:
            return _allow("department.member_read_modify", f"{e.exid} belongs to your department")
        if e.project_ids & s.projects:
            return _allow("project.read_only", f"{e.exid} is linked to a project you can read")
        if e.public:
            return _allow("public.open_experiment", f"{e.exid} was made public by its PI")
        if facility_closed_at is not None:
            return _deny(
                "facility.access_window",
                f"facility staff access to {e.exid} ended on {_day(facility_closed_at)}",
            )
        return _deny("default.deny", f"you have no access to {e.exid}")

    def _modify_experiment(self, s: Subject, e: Experiment, now: datetime, upload: bool) -> Decision:
        read = self.read_experiment(s, e, now)
        if not read.allowed:
            return read
        if e.deleted_at is not None:
            return _deny("retention.deleted", f"{e.exid} was permanently deleted")
        if e.pi_id == s.user_id:
            return _allow("proprietary.pi_owner", f"you are the PI of {e.exid}")
        best, facility_open, _ = self._best_role(s, e, now)
        if best is not None and role_rank(best) >= role_rank("writer"):
            return _allow("modify.authorised_roles", f"your {best} role on {e.exid} allows changes")
        if upload and facility_open:
            return _allow("facility.access_window", f"facility staff upload data to {e.exid}")
        if not e.proprietary and e.department_id in s.modify_departments:
            return _allow(
                "department.member_read_modify", f"you may modify data of {e.exid}'s department"
            )
        if read.rule == "project.read_only":
            return _deny("project.read_only", "project access is read-only")
        return _deny(
            "modify.authorised_roles",
            f"changing {e.exid} needs the writer role or more"
            + ("" if e.proprietary else " or modify rights on its department"),
        )

    def _pi_only(self, s: Subject, e: Experiment, what: str) -> Decision:
        gate = self._account(s) if s.user_id is not None else _deny("account.state", "sign in")
        if gate:
            return gate
        if e.pi_id != s.user_id:
            return _deny("retention.pi_only", f"only the PI of {e.exid} may {what}")
        if e.deleted_at is not None:
            return _deny("retention.deleted", f"{e.exid} was permanently deleted")
        return _allow("retention.pi_only", f"you are the PI of {e.exid}")

    def _register(self) -> None:
        h = self._handlers
        # experiments
        h[Experiment, READ] = self.read_experiment
        h[Experiment, LIST] = lambda s, e, now: _listed(self.read_experiment(s, e, now))
        h[Experiment, STUB] = self._stub_experiment
        h[Experiment, MODIFY] = lambda s, e, now: self._modify_experiment(s, e, now, False)
        h[Experiment, UPLOAD] = lambda s, e, now: self._modify_experiment(s, e, now, True)
        h[Experiment, PUBLISH] = self._publish_experiment
        h[Experiment, UNPUBLISH] = self._unpublish_experiment
        h[Experiment, ARCHIVE] = lambda s, e, now: self._pi_only(s, e, "archive it")
        h[Experiment, DELETE] = self._delete_experiment
        h[Experiment, EXPIRE] = self._expire_experiment
        h[Experiment, AGREE_MIRROR] = lambda s, e, now: self._pi_only(s, e, "agree to mirrors")
        h[Experiment, MIRROR] = self._mirror
        h[Experiment, SERVICE_USE] = self._service_use
        h[Experiment, READ_ACTIVITY] = self._activity_log
        h[Experiment, READ_AUDIT] = self._audit_trail
        h[Experiment, ERASE_METADATA] = lambda s, e, now: _deny(
            "privacy.metadata_exempt",
            "descriptive metadata of experiments is kept for publication; ask for a correction",
        )
        h[Experiment, CORRECT] = self._correct_metadata
        h[RetentionChange, EXTEND] = self._extend
        h[NewExperiment, CREATE] = self._create_experiment
        h[Department, ASSIGN_OWNER] = self._assign_owner
        # derived entities
        h[File, READ] = self._read_file
        h[File, MODIFY] = lambda s, f, now: self._modify_experiment(s, f.experiment, now, False)
        h[File, UPLOAD] = lambda s, f, now: self._modify_experiment(s, f.experiment, now, True)
        h[ResultSet, READ] = self._read_result_set
        h[ResultSet, LIST] = lambda s, r, now: _listed(self._read_result_set(s, r, now))
        h[ResultSet, STUB] = self._stub_result_set
        h[ResultSet, PUBLISH] = self._publish_result_set
        h[NewResultSet, UPLOAD_RESULTS] = self._upload_results
        h[Result, READ] = self._read_result
        h[Result, STUB] = lambda s, r, now: _deny(
            "stub.existence", "result entities have no existence stubs; open their result set"
        )
        # roles and sharing
        h[RoleChange, GRANT_ROLE] = lambda s, c, now: self._role_change(s, c, now, grant=True)
        h[RoleChange, REVOKE_ROLE] = lambda s, c, now: self._role_change(s, c, now, grant=False)
        h[Share, SHARE] = self._share
        h[Share, CONFIRM_SHARE] = self._confirm_share
        h[DepartmentAccessChange, MANAGE_ACCESS] = self._manage_department
        h[ProjectAccessChange, MANAGE_ACCESS] = self._manage_project
        h[Project, STUB] = self._stub_project
        # people and personal data
        h[PersonalItem, READ] = self._read_personal
        h[PersonalItem, MODIFY] = self._own_personal
        h[PersonalItem, SHARE] = self._own_personal
        h[PersonalItem, DELETE] = self._own_personal
        h[Person, VIEW_PERSON] = self._view_person
        h[Person, VIEW_EMAIL] = self._view_email
        for action in (READ, EXPORT, CORRECT, CLOSE):
            h[Account, action] = self._own_account
        h[Account, READ_AUDIT] = self._own_access_log
        h[Account, DELETE_HISTORY] = lambda s, a, now: _deny(
            "privacy.role_history_kept",
            "role history is kept for scientific integrity, also after account deletion",
        )
        h[RequestRate, REQUEST] = self._request_rate
        # the lifecycle: notices, account states
        h[ExpiryNotice, NOTIFY] = self._notify
        h[AccountRecord, ERASE_PERSONAL] = self._erase_personal
        h[AccountRecord, REMOVE_ROLES] = self._remove_roles
        h[AccountRecord, DEACTIVATE] = self._deactivate
        # accounts: sign-up and sign-in
        h[Registration, REGISTER] = self._register_account
        h[SignIn, SIGN_IN] = self._sign_in
        # environments
        h[Environment, USE] = self._use_environment
        h[Environment, PUBLISH] = self._publish_environment

    def _stub_experiment(self, s: Subject, e: Experiment, now: datetime) -> Decision:
        read = self.read_experiment(s, e, now)
        if read.allowed:
            return read
        if e.proprietary:
            return _deny("stub.existence", "proprietary experiments are not shown to outsiders")
        if s.user_id is None or s.state != "active":
            return _deny("account.state", "existence stubs are shown to registered users only")
        return _allow("stub.existence", f"{e.exid} exists; you may see its ID, name, owner, type and status")

    def _publish_experiment(self, s: Subject, e: Experiment, now: datetime) -> Decision:
        if e.proprietary:
            return _deny("proprietary.never_public", f"{e.exid} is proprietary and can never be public")
        d = self._pi_only(s, e, "make it public")
        if not d.allowed:
            return d
        return _allow("public.open_experiment", f"the PI of {e.exid} makes it public")

    def _unpublish_experiment(self, s: Subject, e: Experiment, now: datetime) -> Decision:
        d = self._pi_only(s, e, "withdraw it from public view")
        return _allow("public.open_experiment", d.reason) if d.allowed else d

    def _delete_experiment(self, s: Subject, e: Experiment, now: datetime) -> Decision:
        if s.is_system:
            return self._expire_experiment(s, e, now)
        return self._pi_only(s, e, "delete it")

    def _expire_experiment(self, s: Subject, e: Experiment, now: datetime) -> Decision:
        if not s.is_system:
            return _deny("retention.pi_only", "only the lifecycle job expires data")
        if e.deleted_at is not None:
            return _deny("retention.deleted", f"{e.exid} is already deleted")
        if not self.retention_expired(e, now):
            until = _day(e.retain_until) if e.retain_until else "no expiry date (not archived)"
            return _deny("retention.expiry_deletes", f"{e.exid} is retained until {until}")
        if e.archived_at is not None and now < self.minimum_retain_until(e.archived_at):
            # a retain_until below the minimum (an old configuration, a hand-edited row) never
            # shortens the minimum storage period of archived data
            return _deny(
                "retention.default_minimum",
                f"{e.exid} was archived on {_day(e.archived_at)}: archived data is kept at least "
                f"{self.retention_minimum_days} days, until {_day(self.minimum_retain_until(e.archived_at))}",
            )
        return _allow(
            "retention.expiry_deletes",
            f"retention of {e.exid} expired on {_day(e.retain_until)} and was not extended",
        )

    def _extend(self, s: Subject, c: RetentionChange, now: datetime) -> Decision:
        e = c.experiment
        d = self._pi_only(s, e, "change how long its data is kept")
        if not d.allowed:
            return d
        if c.retain_until is None:
            return _deny("retention.default_minimum", "a retention date is required")
        floor = self.minimum_retain_until(e.archived_at or now)
        if c.retain_until < floor:
            return _deny(
                "retention.default_minimum",
                f"archived data is kept at least {self.retention_minimum_days} days: "
                f"choose {_day(floor)} or later",
            )
        return _allow("retention.pi_only", f"the PI keeps {e.exid} until {_day(c.retain_until)}")

    def _mirror(self, s: Subject, e: Experiment, now: datetime) -> Decision:
        if e.mirror_agreed:
            return _allow("mirror.pi_agreed", f"the PI of {e.exid} agreed to mirrors and backups")
        return _deny("mirror.pi_agreed", f"the PI of {e.exid} has not agreed to extra mirrors")

    def _service_use(self, s: Subject, e: Experiment, now: datetime) -> Decision:
        if e.proprietary:
            return _deny("proprietary.no_service_use", "proprietary data is never used to improve the service")
        if e.public:
            return _allow("public.open_experiment", f"{e.exid} is public")
        return _deny("default.deny", f"{e.exid} is not public")

    def _participant(self, s: Subject, e: Experiment, now: datetime) -> Decision:
        read = self.read_experiment(s, e, now)
        if read.allowed and read.rule in (
            "proprietary.pi_owner", "role.grant", "facility.access_window",
            "department.member_read_modify",
        ):
            return read
        return read if not read.allowed else _deny(
            "privacy.activity_log", f"you are not a participant of {e.exid}"
        )

    def _activity_log(self, s: Subject, e: Experiment, now: datetime) -> Decision:
        d = self._participant(s, e, now)
        if not d.allowed:
            return d
        return _allow("privacy.activity_log", f"participants of {e.exid} see its activity log")

    def _audit_trail(self, s: Subject, e: Experiment, now: datetime) -> Decision:
        if s.user_id is None:
            return _deny("account.state", "sign in")
        gate = self._account(s)
        if gate:
            return gate
        if e.proprietary and s.is_vendor:
            return _deny("vendor.never", "vendor staff never access proprietary data")
        if e.pi_id == s.user_id:
            return _allow("audit.full_trail", f"the PI sees the full audit trail of {e.exid}")
        if s.is_admin:
            return _allow("audit.full_trail", "admins see full audit trails")
        return _deny("audit.full_trail", "the full audit trail is for the PI and admins")

    def _correct_metadata(self, s: Subject, e: Experiment, now: datetime) -> Decision:
        d = self._pi_only(s, e, "correct its descriptive metadata")
        if not d.allowed:
            return d
        return _allow("privacy.metadata_exempt", "the PI may correct incorrect metadata")

    def _assign_owner(self, s: Subject, d: Department, now: datetime) -> Decision:
        if s.user_id is None or s.state != "active":
            return _deny("account.state", "sign in")
        if d.id == s.department_id or d.id in s.modify_departments:
            return _allow("ownership.default_department", "you have write access to this department")
        return _deny(
            "ownership.default_department",
            "new data belongs to your own department unless you have write access to the other",
        )

    def _create_experiment(self, s: Subject, n: NewExperiment, now: datetime) -> Decision:
        if s.user_id is None:
            return _deny("account.state", "sign in")
        gate = self._account(s)
        if gate:
            return gate
        if not (s.is_admin or s.is_facility or s.user_id == n.pi.user_id):
            return _deny(
                "experiment.create",
                "experiments are registered by admins, facility staff, or a PI for themselves",
            )
        if n.pi.user_id is None or n.pi.state != "active":
            return _deny("account.state", "the PI's account is not active")
        if not (n.pi.institution_verified and n.pi.institutional_email_verified):
            return _deny(
                "pi.verified_institution",
                "a PI needs a verified institution and a verified institutional e-mail",
            )
        if n.proprietary and n.pi.is_vendor:
            return _deny("vendor.never", "vendor staff cannot own proprietary experiments")
        if n.department_id is not None and not s.is_admin:
            owner = self._assign_owner(s, Department(n.department_id), now)
            if not owner.allowed:
                return owner
        return _allow("experiment.create", "registered for a verified PI")

    # ----------------------------------------------------------------------------------
    # derived entities
    # ----------------------------------------------------------------------------------
    def _read_file(self, s: Subject, f: File, now: datetime) -> Decision:
        e = f.experiment
        d = self.read_experiment(s, e, now)
        if not d.allowed:
            return d
        if e.deleted_at is not None:
            return _deny("retention.deleted", f"{e.exid} was permanently deleted on {_day(e.deleted_at)}")
        return _allow("derived.parent", f"{f.kind} of {e.exid}: {d.reason}")

    def _read_result_set(self, s: Subject, r: ResultSet, now: datetime) -> Decision:
        e = r.experiment
        exp = self.read_experiment(s, e, now)
        if e.proprietary and not exp.allowed:
            return exp
        if e.deleted_at is not None:  # derived data goes with its experiment
            return _deny("retention.deleted", f"{e.exid} was permanently deleted on {_day(e.deleted_at)}")
        if s.user_id is None:
            if r.published and exp.allowed:
                return _allow("result_set.published_visibility", "a published result set of a public experiment")
            return _deny("result_set.published_visibility", "sign in")
        gate = self._account(s)
        if gate:
            return gate
        if e.pi_id == s.user_id:
            return _allow("proprietary.pi_owner", f"you are the PI of {e.exid}")
        if r.created_by == s.user_id:
            return _allow("ownership.upload_results", "you uploaded this result set")
        if r.department_id is not None and r.department_id in s.read_departments:
            return _allow(
                "department.unpublished_result_sets",
                "your department's result sets, published or not",
            )
        if not r.published:
            return _deny(
                "result_set.published_visibility",
                "this result set is not published: only its department sees it",
            )
        if exp.allowed:
            return _allow("result_set.published_visibility", f"a published result set of {e.exid}")
        if not e.proprietary and r.project_ids & s.projects:
            return _allow("project.read_only", "a published result set of a project you can read")
        return exp

    def _stub_result_set(self, s: Subject, r: ResultSet, now: datetime) -> Decision:
        read = self._read_result_set(s, r, now)
        if read.allowed:
            return read
        if r.experiment.proprietary:
            return _deny("stub.existence", "result sets of proprietary experiments are not shown to outsiders")
        if s.user_id is None or s.state != "active":
            return _deny("account.state", "existence stubs are shown to registered users only")
        return _allow("stub.existence", "the result set exists; you may see its ID, name, owner and status")

    def _publish_result_set(self, s: Subject, r: ResultSet, now: datetime) -> Decision:
        e = r.experiment
        read = self._read_result_set(s, r, now)
        if not read.allowed:
            return read
        if e.pi_id == s.user_id or (r.department_id is not None and r.department_id in s.modify_departments):
            return _allow("result_set.published_visibility", "publishing makes it visible outside its department")
        return _deny(
            "result_set.published_visibility",
            "publishing needs modify rights on the result set's department or being the PI",
        )

    def _upload_results(self, s: Subject, n: NewResultSet, now: datetime) -> Decision:
        e = n.experiment
        read = self.read_experiment(s, e, now)
        if not read.allowed:
            return read
        if e.deleted_at is not None:
            return _deny("retention.deleted", f"{e.exid} was permanently deleted")
        if n.department_id is not None and n.department_id != e.department_id:
            owner = self._assign_owner(s, Department(n.department_id), now)
            if not owner.allowed:
                return owner
        if e.pi_id == s.user_id:
            return _allow("ownership.upload_results", f"you are the PI of {e.exid}")
        best, _, _ = self._best_role(s, e, now)
        writer = best is not None and role_rank(best) >= role_rank("writer")
        dept_write = (not e.proprietary) and e.department_id in s.modify_departments
        if not (writer or dept_write):
            return _deny(
                "ownership.upload_results",
                f"uploading results to {e.exid} needs write access to its department"
                + (" (or the writer role, as it is proprietary)" if e.proprietary else ""),
            )
        if e.project_ids:
            held = e.project_ids & s.projects
            ok = held == e.project_ids if self.results_need_every_project else bool(held)
            if not ok:
                missing = ", ".join(str(p) for p in sorted(e.project_ids - s.projects))
                return _deny(
                    "ownership.upload_results",
                    f"{e.exid} is linked to projects; you also need access to project(s) {missing}",
                )
        return _allow("ownership.upload_results", f"you have write access to {e.exid}'s department")

    def _read_result(self, s: Subject, r: Result, now: datetime) -> Decision:
        parent = r.parent
        if isinstance(parent, ResultSet):
            d = self._read_result_set(s, parent, now)
        else:
            d = self.read_experiment(s, parent, now)
        if not d.allowed:
            return d
        return _allow("derived.parent", f"{r.kind} inherits access from its parent: {d.reason}")

    # ----------------------------------------------------------------------------------
    # roles, sharing, access rights
    # ----------------------------------------------------------------------------------
    def _manager_level(self, s: Subject, e: Experiment, now: datetime) -> str | None:
        if e.pi_id == s.user_id:
            return "pi"
        best, _, _ = self._best_role(s, e, now)
        return best if best == "manager" else None

    def _target_ok(self, t: Subject, e: Experiment) -> Decision | None:
        if t.user_id is None or t.state != "active":
            return _deny("account.state", f"{t.name or 'that user'}'s account is not active")
        if e.proprietary and t.is_vendor:
            return _deny("vendor.never", "vendor staff cannot be assigned to proprietary data")
        return None

    def _same_institution(self, t: Subject, institution_id: int | None) -> bool:
        return t.institution_verified and institution_id is not None and t.institution_id == institution_id

    def _role_change(self, s: Subject, c: RoleChange, now: datetime, grant: bool) -> Decision:
        e = c.experiment
        if s.user_id is None:
            return _deny("account.state", "sign in")
        gate = self._account(s)
        if gate:
            return gate
        if e.proprietary and s.is_vendor:
            return _deny("vendor.never", "vendor staff never access proprietary data")
        if c.role not in ROLES:
            return _deny("role.manage", f"unknown role {c.role!r}; roles are {', '.join(ROLES)}")
        if c.role == "pi":
            return _deny("role.manage", "the PI is the experiment's owner; the role is not granted")
        level = self._manager_level(s, e, now)
        if level is None:
            return _deny("role.manage", f"only the PI and managers of {e.exid} manage its roles")
        if level == "manager" and c.role == "manager":
            return _deny("role.manage", "only the PI appoints managers")
        if not grant:
            if c.target.user_id == e.pi_id:
                return _deny("proprietary.pi_owner", "the PI's ownership cannot be revoked")
            return _allow("role.manage", f"you manage the roles of {e.exid}")
        bad = self._target_ok(c.target, e)
        if bad:
            return bad
        if self._same_institution(c.target, e.institution_id):
            return _allow("sharing.same_institution", "both belong to the experiment's institution")
        if level == "pi":
            return _allow("sharing.cross_institution_pi_confirm", "the PI confirms access from outside the institution")
        return _deny(
            "sharing.cross_institution_pi_confirm",
            f"{c.target.name or 'the user'} is outside the institution: pending PI confirmation",
        )

    def _share(self, s: Subject, sh: Share, now: datetime) -> Decision:
        if s.user_id is None:
            return _deny("account.state", "sign in")
        gate = self._account(s)
        if gate:
            return gate
        if sh.project is not None:
            p = sh.project
            if not (p.pi_id == s.user_id or p.id in s.projects):
                return _deny("project.read_only", "you have no access to this project")
            if sh.target.user_id is None or sh.target.state != "active":
                return _deny("account.state", "that user's account is not active")
            if self._same_institution(sh.target, p.institution_id):
                return _allow("sharing.same_institution", "both belong to the project's institution")
            if p.pi_id == s.user_id:
                return _allow("sharing.cross_institution_pi_confirm", "the PI confirms access from outside the institution")
            return _deny("sharing.cross_institution_pi_confirm", "outside the institution: pending PI confirmation")
        e = sh.experiment
        if e is None:
            return _deny("default.deny", "nothing to share")
        read = self.read_experiment(s, e, now)
        if not read.allowed:
            return read
        if e.proprietary and self._manager_level(s, e, now) is None:
            return _deny(
                "proprietary.assigned_only",
                f"{e.exid} is proprietary: only its PI (or a manager the PI appointed) assigns users",
            )
        bad = self._target_ok(sh.target, e)
        if bad:
            return bad
        if self._same_institution(sh.target, e.institution_id):
            return _allow("sharing.same_institution", "both belong to the experiment's institution")
        if e.pi_id == s.user_id:
            return _allow("sharing.cross_institution_pi_confirm", "the PI confirms access from outside the institution")
        return _deny(
            "sharing.cross_institution_pi_confirm",
            f"{sh.target.name or 'the user'} is outside the institution: pending PI confirmation",
        )

    def _confirm_share(self, s: Subject, sh: Share, now: datetime) -> Decision:
        if s.user_id is None:
            return _deny("account.state", "sign in")
        gate = self._account(s)
        if gate:
            return gate
        owner = sh.project.pi_id if sh.project is not None else (sh.experiment.pi_id if sh.experiment else None)
        if owner != s.user_id:
            return _deny("sharing.cross_institution_pi_confirm", "only the PI confirms sharing outside the institution")
        if sh.experiment is not None:
            bad = self._target_ok(sh.target, sh.experiment)
            if bad:
                return bad
        return _allow("sharing.cross_institution_pi_confirm", "confirmed by the PI")

    def _manage_department(self, s: Subject, c: DepartmentAccessChange, now: datetime) -> Decision:
        if s.user_id is None or s.state != "active":
            return _deny("account.state", "sign in")
        if s.is_admin:
            return _allow("admin.access_rights", "admins manage access rights")
        return _deny("admin.access_rights", "only admins manage department access rights")

    def _manage_project(self, s: Subject, c: ProjectAccessChange, now: datetime) -> Decision:
        if s.user_id is None or s.state != "active":
            return _deny("account.state", "sign in")
        p = c.project
        if not (s.is_admin or p.pi_id == s.user_id):
            return _deny("admin.access_rights", "only admins and the project's PI manage project access")
        if c.target.user_id is None or c.target.state != "active":
            return _deny("account.state", "that user's account is not active")
        if not self._same_institution(c.target, p.institution_id) and p.pi_id != s.user_id:
            return _deny("sharing.cross_institution_pi_confirm", "outside the institution: pending PI confirmation")
        return _allow("admin.access_rights", "project access granted by an admin or the project's PI")

    def _stub_project(self, s: Subject, p: Project, now: datetime) -> Decision:
        if s.user_id is None or s.state != "active":
            return _deny("account.state", "existence stubs are shown to registered users only")
        return _allow("stub.existence", "projects are listed with ID, name, owner and status")

    # ----------------------------------------------------------------------------------
    # people and personal data
    # ----------------------------------------------------------------------------------
    def _read_personal(self, s: Subject, p: PersonalItem, now: datetime) -> Decision:
        if s.user_id is None or s.state != "active":
            return _deny("account.state", "sign in")
        if p.owner_id == s.user_id:
            return _allow("privacy.personal_repository", "your personal repository")
        if s.user_id in p.shared_with:
            return _allow("privacy.personal_repository", "its owner shared it with you")
        return _deny("user.own_data", "personal repositories are their owner's alone")

    def _own_personal(self, s: Subject, p: PersonalItem, now: datetime) -> Decision:
        if s.user_id is None or s.state != "active":
            return _deny("account.state", "sign in")
        if p.owner_id == s.user_id:
            return _allow("privacy.personal_repository", "your personal repository")
        return _deny("user.own_data", "only the owner changes or shares a personal repository")

    def _view_person(self, s: Subject, p: Person, now: datetime) -> Decision:
        if s.user_id == p.user_id and s.user_id is not None:
            return _allow("privacy.data_subject_rights", "your own profile")
        if s.user_id is None:
            if p.public_member:
                return _allow("privacy.members_visible", "a member of a public experiment")
            return _deny("privacy.members_visible", "people are shown publicly only as members of public experiments")
        gate = self._account(s)
        if gate:
            return gate
        if p.shares_context:
            return _allow("privacy.members_visible", "you work on the same experiment, team or project")
        return _allow("privacy.identity", "registered users see each other's name and institution only")

    def _view_email(self, s: Subject, p: Person, now: datetime) -> Decision:
        if s.user_id is not None and s.user_id == p.user_id:
            return _allow("privacy.email_private", "your own e-mail")
        if s.user_id is not None and s.state == "active":
            if s.is_admin:
                return _allow("privacy.email_private", "admins operate the service (data controller)")
            if p.email_visible:
                return _allow("privacy.email_private", "its owner allowed it to be shown")
        return _deny("privacy.email_private", "e-mail addresses are private unless their owner allows it")

    def _own_account(self, s: Subject, a: Account, now: datetime) -> Decision:
        if s.user_id is not None and s.user_id == a.user_id:
            return _allow("privacy.data_subject_rights", "your own account")
        if s.is_admin and s.state == "active":
            return _allow("admin.access_rights", "admins manage accounts")
        return _deny("user.own_data", "an account is its owner's alone")

    def _own_access_log(self, s: Subject, a: Account, now: datetime) -> Decision:
        if s.user_id is not None and s.user_id == a.user_id:
            return _allow("privacy.own_access_log", "your own access log")
        if s.is_admin and s.state == "active":
            return _allow("audit.full_trail", "admins see full audit trails")
        return _deny("privacy.own_access_log", "an access log is shown to its subject and admins only")

    def _request_rate(self, s: Subject, r: RequestRate, now: datetime) -> Decision:
        if r.exceeded:
            return _deny("abuse.rate_limit", "too many requests: slow down (the request rate is "
                         "limited to prevent data harvesting)")
        return _allow("abuse.rate_limit", "within the request rate limit")

    # ----------------------------------------------------------------------------------
    # accounts: sign-up and sign-in
    # ----------------------------------------------------------------------------------
    def _register_account(self, s: Subject, r: Registration, now: datetime) -> Decision:
        if not r.adult:
            return _deny("account.adult", "labvault accounts are for people aged 18 or older: "
                         "confirm that you are")
        if r.institution_id is None:
            return _deny("account.registration", "choose one of the registered institutions")
        if not r.institution_verified:
            return _deny("account.registration", f"{r.institution_name or 'that institution'} is "
                         "not a verified institution yet")
        if not r.email_at_institution:
            return _deny("account.registration", "the e-mail address must be at one of the verified "
                         f"domains of {r.institution_name or 'your institution'}: the link we send "
                         "there proves that you belong to it")
        return _allow("account.registration", "registered tentatively: the account becomes active "
                      "when the link in the confirmation e-mail is opened")

    _STATE_REASONS = {
        "tentative": "your account is not confirmed yet: open the link in the e-mail we sent you",
        "deactivated": "your account is deactivated; ask an administrator",
        "closed": "your account is closed",
    }

    def _sign_in(self, s: Subject, a: SignIn, now: datetime) -> Decision:
        if a.method not in ("password", "idp", "session") or s.user_id is None:
            return _deny("default.deny", f"no rule allows signing in by {a.method!r}")
        if a.method == "password":
            # the lock is checked first, so a locked account tells nothing about the password
            if a.locked_until is not None and now < a.locked_until:
                return _deny("signin.lockout", "too many failed sign-ins: the account is locked "
                             f"until {a.locked_until.strftime('%Y-%m-%d %H:%M')} UTC")
            if not a.password_ok:
                return _deny("signin.credentials", "wrong user name or password")
        if a.method == "idp":
            if not a.claim:
                return _deny("signin.institution", "your identity provider did not state which "
                             "institution you belong to (an e-mail address does not prove it)")
            if a.claim_institution_id is None:
                return _deny("signin.institution", f"{a.claim!r} is not a registered institution")
            if not a.idp_allowed:
                return _deny("signin.institution", f"the identity provider {a.idp!r} is not "
                             f"registered for the institution {a.claim!r}")
        if s.state != "active":
            return _deny("account.state", self._STATE_REASONS.get(s.state, f"account is {s.state}"))
        if s.institution_id is None or not s.institution_verified:
            return _deny("signin.institution", "your account belongs to no verified institution")
        if a.method == "idp":
            if s.institution_id != a.claim_institution_id:
                return _deny("signin.institution", "your identity provider names another "
                             "institution than the one of your account; ask an administrator")
            return _allow("signin.institution", f"a member of {a.claim}, as its identity provider states")
        if a.method == "session":
            return _allow("signin.institution", "account active, institution verified")
        required = a.totp_enrolled or (a.is_pi and self.totp_required_for_pis) or (
            s.is_admin and self.totp_required_for_admins)
        if not required:
            return _allow("signin.credentials", "password accepted")
        if not a.totp_enrolled:
            return _deny("signin.second_factor", "set up two-factor authentication (TOTP) to sign in")
        if a.totp_ok is None:
            return _deny("signin.second_factor", "enter the 6-digit code of your authenticator app")
        if not a.totp_ok:
            return _deny("signin.second_factor", "wrong or expired code from your authenticator app")
        return _allow("signin.second_factor", "password and code accepted")

    # ----------------------------------------------------------------------------------
    # the lifecycle: notices before dates that matter, account states
    # ----------------------------------------------------------------------------------
    def _notify(self, s: Subject, n: ExpiryNotice, now: datetime) -> Decision:
        e = n.experiment
        rule = "retention.expiry_notice" if n.kind == "retention" else "facility.access_notice"
        if n.kind not in ("retention", "facility_access"):
            return _deny("default.deny", f"no rule sends {n.kind!r} notices")
        if not s.is_system:
            return _deny(rule, "notices are sent by the lifecycle job")
        if e.deleted_at is not None:
            return _deny("retention.deleted", f"{e.exid} was permanently deleted")
        if n.kind == "retention":
            when, due = e.retain_until, self.retention_notice_due(e, now)
            if when is None:
                return _deny(rule, f"{e.exid} has no retention date (not archived): nothing expires")
            what = f"the storage period of {e.exid} ends on {_day(when)}"
        else:
            when, due = self.facility_access_ends(e), self.facility_notice_due(e, now)
            if when is None:
                return _deny(rule, f"{e.exid} has not ended: facility staff access does not end yet")
            what = f"facility staff access to {e.exid} ends on {_day(when)}"
        if now >= when:
            return _deny(rule, f"too late to announce: {what.replace('ends', 'ended')}")
        if due != n.days:
            if due is None:
                return _deny(rule, f"{what}: no notice is due before {_day(when - timedelta(days=n.days))}")
            return _deny(rule, f"{what}: the {due}-day notice is due, not the {n.days}-day one")
        return _allow(rule, f"{what}, in {n.days} days or less")

    def _erase_personal(self, s: Subject, a: AccountRecord, now: datetime) -> Decision:
        if not s.is_system:  # a data-subject request (or an admin carrying one out)
            if s.user_id is not None and s.user_id == a.user_id:
                return _allow("privacy.data_subject_rights", "you asked to delete your personal data")
            if s.is_admin and s.state == "active":
                return _allow("admin.access_rights", "an admin carries out a deletion request")
            return _deny("user.own_data", "only the account's owner (or an admin for them) asks to "
                         "delete its personal data")
        if a.under_18:
            rule = "privacy.minors"
        elif a.state == "tentative":
            rule = "privacy.tentative_expiry"
        else:
            rule = "privacy.closed_anonymised"
        if a.anonymised_at is not None:
            return _deny(rule, f"personal data was removed on {_day(a.anonymised_at)} already")
        if a.under_18:
            return _allow(rule, "the account belongs to someone under 18: its personal data is removed")
        if a.state == "tentative":
            if a.created_at is None:
                return _deny(rule, "the account has no creation time")
            due = self.tentative_cutoff(now)
            if a.created_at > due:
                return _deny(rule, f"unconfirmed since {_day(a.created_at)}: its personal data is deleted "
                             f"on {_day(a.created_at + timedelta(days=self.tentative_account_days))} unless it is confirmed")
            return _allow(rule, f"unconfirmed since {_day(a.created_at)}: personal data is deleted "
                          f"after {self.tentative_account_days} days")
        since = a.closed_at if a.state == "closed" else a.deactivated_at if a.state == "deactivated" else None
        if since is None:
            return _deny(rule, f"the account is {a.state}: its personal data is kept while it is in use")
        due = self.closed_cutoff(now)
        if since > due:
            return _deny(rule, f"{a.state} on {_day(since)}: personal data is kept until "
                         f"{_day(since + timedelta(days=self.closed_account_days))}, then anonymised")
        return _allow(rule, f"{a.state} on {_day(since)}: personal data is anonymised after "
                      f"{self.closed_account_days} days; role history and audit events are kept")

    def _remove_roles(self, s: Subject, a: AccountRecord, now: datetime) -> Decision:
        if not s.is_system:
            return _deny("default.deny", "roles are removed by their managers, or by the lifecycle job")
        if a.under_18:
            if a.active_roles == 0:
                return _deny("privacy.minors", "the account holds no active roles")
            return _allow("privacy.minors", "the account of someone under 18 is deactivated: its roles end")
        if a.state != "closed":
            return _deny("privacy.closed_roles_removed", f"the account is {a.state}, not closed: its roles stay")
        if a.active_roles == 0:
            return _deny("privacy.closed_roles_removed", "the closed account holds no active roles")
        return _allow("privacy.closed_roles_removed",
                      "a closed account's active roles are removed at once; their history is kept")

    def _deactivate(self, s: Subject, a: AccountRecord, now: datetime) -> Decision:
        if not s.is_system:
            return _deny("default.deny", "accounts are deactivated by admins, or by the lifecycle job")
        if not a.under_18:
            return _deny("privacy.minors", "the account is not flagged as belonging to someone under 18")
        if a.state in ("deactivated", "closed"):
            return _deny("privacy.minors", f"the account is {a.state} already")
        return _allow("privacy.minors", "the account belongs to someone under 18: it is deactivated")

    # ----------------------------------------------------------------------------------
    # environments
    # ----------------------------------------------------------------------------------
    def _use_environment(self, s: Subject, env: Environment, now: datetime) -> Decision:
        if s.user_id is None:
            return _deny("account.state", "sign in")
        gate = self._account(s)
        if gate:
            return gate
        if env.proprietary and (env.institution_id is None or env.institution_id != s.institution_id):
            return _deny(
                "environment.proprietary_institution_only",
                f"{env.name} is a proprietary environment of another institution",
            )
        missing = []
        for product in sorted(env.licences):
            if product not in s.licences:
                missing.append(product)
                continue
            until = s.licences[product]
            if until is not None and now > until:
                missing.append(f"{product} (expired {_day(until)})")
        if missing:
            return _deny(
                "environment.licensed",
                f"your institution holds no valid licence for {', '.join(missing)}",
            )
        if env.proprietary:
            return _allow("environment.proprietary_institution_only", f"{env.name} belongs to your institution")
        return _allow("environment.licensed", f"{env.name} is licensed for your institution")

    def _publish_environment(self, s: Subject, env: Environment, now: datetime) -> Decision:
        if env.proprietary:
            return _deny("environment.proprietary_institution_only", "proprietary environments are never public")
        if s.user_id is not None and s.state == "active" and s.is_admin:
            return _allow("environment.proprietary_institution_only", "a non-proprietary environment")
        return _deny("admin.access_rights", "only admins publish environments")


_default: Policy | None = None


def default_policy() -> Policy:
    global _default
    if _default is None:
        _default = Policy()
    return _default


def set_default_policy(policy: Policy) -> None:
    """Make ``policy`` (e.g. one built from a deployment's config) the one :func:`decide` uses."""
    global _default
    _default = policy


def decide(subject: Subject, action: str, resource: object, now: datetime) -> Decision:
    """Decide with the default :class:`Policy` (the design's defaults unless configured)."""
    return default_policy().decide(subject, action, resource, now)


__all__ = ["Policy", "decide", "default_policy", "set_default_policy", "ACTIONS", "NESTED_ROLES"]
