"""The plain values the policy engine decides on: who asks (Subject) and about what (resources).

They are frozen dataclasses built by the datastore from its database rows; nothing here
touches a database, the network or the clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

#: Experiment roles, strongest first. Each includes the rights of the ones after it,
#: except ``facility_staff``, which stands alone and is time-limited.
ROLES = ("pi", "manager", "writer", "viewer", "facility_staff")
NESTED_ROLES = ("pi", "manager", "writer", "viewer")
_RANK = {"pi": 4, "manager": 3, "writer": 2, "viewer": 1}

ACCOUNT_STATES = ("tentative", "active", "deactivated", "closed")


def role_rank(role: str) -> int:
    """Rank of a nested role (0 for facility_staff or unknown)."""
    return _RANK.get(role, 0)


@dataclass(frozen=True, slots=True)
class Grant:
    """One role grant held by the subject on an experiment or project."""

    role: str
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    def active(self, now: datetime) -> bool:
        if self.revoked_at is not None and self.revoked_at <= now:
            return False
        return self.expires_at is None or self.expires_at > now


@dataclass(frozen=True, slots=True)
class Subject:
    """Who asks. ``user_id=None`` is an anonymous visitor; ``is_system`` is labvault itself
    (the lifecycle job), which never reads data but may carry out retention rules."""

    user_id: int | None
    name: str = ""
    institution_id: int | None = None
    institution_verified: bool = False
    is_vendor: bool = False
    is_facility: bool = False  # member of a facility institution (creates experiments)
    is_admin: bool = False
    state: str = "active"
    institutional_email_verified: bool = False
    department_id: int | None = None  # home department: read + modify by default
    read_departments: frozenset[int] = frozenset()  # home + memberships with read
    modify_departments: frozenset[int] = frozenset()  # home + memberships with modify
    projects: frozenset[int] = frozenset()  # project access (read-only)
    grants: Mapping[int, tuple[Grant, ...]] = field(default_factory=dict)  # experiment id ->
    licences: Mapping[str, datetime | None] = field(default_factory=dict)  # product -> valid until
    is_system: bool = False

    @property
    def anonymous(self) -> bool:
        return self.user_id is None and not self.is_system


ANONYMOUS = Subject(user_id=None, state="anonymous")
SYSTEM = Subject(user_id=None, name="labvault", is_system=True, state="system")


@dataclass(frozen=True, slots=True)
class Experiment:
    id: int
    exid: str = ""
    pi_id: int | None = None
    institution_id: int | None = None  # owning institution, fixed at experiment time
    department_id: int | None = None
    project_ids: frozenset[int] = frozenset()
    proprietary: bool = True
    public: bool = False
    start_at: datetime | None = None
    end_at: datetime | None = None
    status: str = "active"
    archived_at: datetime | None = None
    retain_until: datetime | None = None
    deleted_at: datetime | None = None
    mirror_agreed: bool = False


@dataclass(frozen=True, slots=True)
class File:
    """A file or step of an experiment: derives its access from the experiment."""

    experiment: Experiment
    path: str = ""
    kind: str = "file"  # file | step


@dataclass(frozen=True, slots=True)
class ResultSet:
    id: int
    experiment: Experiment
    department_id: int | None
    project_ids: frozenset[int] = frozenset()
    published: bool = False
    created_by: int | None = None


@dataclass(frozen=True, slots=True)
class Result:
    """A result entity or a comment: derives its access from its result set (or experiment)."""

    parent: ResultSet | Experiment
    kind: str = "result"  # result | comment


@dataclass(frozen=True, slots=True)
class Project:
    id: int
    pi_id: int | None = None
    institution_id: int | None = None


@dataclass(frozen=True, slots=True)
class Department:
    id: int
    institution_id: int | None = None
    virtual: bool = False


@dataclass(frozen=True, slots=True)
class PersonalItem:
    """A file or folder in a user's personal repository."""

    owner_id: int
    path: str = ""
    shared_with: frozenset[int] = frozenset()  # users this item (or a parent folder) is shared with


@dataclass(frozen=True, slots=True)
class Person:
    """Another user, for what of them may be shown."""

    user_id: int
    institution_id: int | None = None
    state: str = "active"
    email_visible: bool = False
    shares_context: bool = False  # linked to an experiment/team/project the subject is linked to
    public_member: bool = False  # member of a public experiment


@dataclass(frozen=True, slots=True)
class Environment:
    id: int
    name: str = ""
    licences: frozenset[str] = frozenset()  # products it needs
    proprietary: bool = False
    institution_id: int | None = None
    public: bool = False


@dataclass(frozen=True, slots=True)
class RoleChange:
    """Grant ``role`` on ``experiment`` to ``target`` (or revoke it)."""

    experiment: Experiment
    target: Subject
    role: str


@dataclass(frozen=True, slots=True)
class ProjectAccessChange:
    project: Project
    target: Subject


@dataclass(frozen=True, slots=True)
class DepartmentAccessChange:
    department: Department
    target: Subject
    modify: bool = False


@dataclass(frozen=True, slots=True)
class Share:
    """A request to share an experiment (or project) with ``target``."""

    experiment: Experiment | None
    target: Subject
    project: Project | None = None
    requested_by: int | None = None


@dataclass(frozen=True, slots=True)
class RetentionChange:
    experiment: Experiment
    retain_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class NewExperiment:
    """Creating an experiment: who will be its PI and which department will own it."""

    pi: Subject
    department_id: int | None = None  # None = the creator's own department
    proprietary: bool = True


@dataclass(frozen=True, slots=True)
class NewResultSet:
    experiment: Experiment
    department_id: int | None = None


@dataclass(frozen=True, slots=True)
class Account:
    """A user's own account record (profile, export, close)."""

    user_id: int


@dataclass(frozen=True, slots=True)
class AccountRecord:
    """An account as the lifecycle job and the data-subject rights see it: its state, the times
    that start its clocks, and whether its personal data was already removed."""

    user_id: int
    state: str = "active"
    under_18: bool = False
    created_at: datetime | None = None
    closed_at: datetime | None = None
    deactivated_at: datetime | None = None
    anonymised_at: datetime | None = None
    active_roles: int = 0  # role grants neither revoked nor expired


@dataclass(frozen=True, slots=True)
class ExpiryNotice:
    """A notice the lifecycle job may send ``days`` before a date of ``experiment``:
    ``kind`` ``retention`` (its storage period ends; to the PI) or ``facility_access`` (facility
    staff access ends; to each facility staff member)."""

    experiment: Experiment
    kind: str
    days: int


@dataclass(frozen=True, slots=True)
class RequestRate:
    """A user's request rate, as measured by the service's token bucket."""

    exceeded: bool
    limit_per_second: float = 0.0


@dataclass(frozen=True, slots=True)
class Registration:
    """A self-registration (sign-up) of a local account, as the datastore service found it."""

    institution_id: int | None = None  # the institution chosen (None: not a registered one)
    institution_name: str = ""
    institution_verified: bool = False
    email_at_institution: bool = False  # the e-mail's domain is a verified domain of it
    adult: bool = False  # "I am 18 or older" was confirmed


@dataclass(frozen=True, slots=True)
class SignIn:
    """A sign-in attempt (or a session's re-check) as the datastore service measured it.

    ``method``: ``password`` (a local account), ``idp`` (an identity provider's claims) or
    ``session`` (the Hub re-checking a signed-in user). The subject is the account signing in.
    """

    method: str = "password"
    password_ok: bool = False  # password: the password matched its hash
    locked_until: datetime | None = None  # password: locked after repeated failures
    totp_enrolled: bool = False
    totp_ok: bool | None = None  # None: no code was given
    is_pi: bool = False  # PI of an experiment, project or department
    idp: str = ""  # idp: who vouches
    claim: str | None = None  # idp: the institution claim's value (None: missing)
    claim_institution_id: int | None = None  # idp: the institution the claim names
    idp_allowed: bool = False  # idp: the IdP is registered for that institution


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one question, always with the rule that gave it and a reason."""

    allowed: bool
    rule: str
    reason: str
