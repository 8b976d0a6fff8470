"""SQLAlchemy 2.0 models of the labvault domain (DESIGN.md, "Domain model").

Times are stored as naive UTC and come back timezone-aware (:class:`UTCDateTime`), so SQLite
and PostgreSQL compare them alike. Role grants and audit events are never deleted (the
migrations add database triggers that refuse it).
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in, aware UTC datetimes out; naive UTC in the database."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: labvault stores aware UTC times")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}


class UserState(str, enum.Enum):
    tentative = "tentative"
    active = "active"
    deactivated = "deactivated"
    closed = "closed"


class Role(str, enum.Enum):
    pi = "pi"
    manager = "manager"
    writer = "writer"
    viewer = "viewer"
    facility_staff = "facility_staff"


class ShareState(str, enum.Enum):
    pending = "pending"
    confirmed = "confirmed"
    refused = "refused"


def _enum(e: type[enum.Enum], name: str) -> Enum:
    # Stored as VARCHAR + CHECK: portable, and Alembic can diff it on both databases.
    return Enum(e, name=name, native_enum=False, length=20, values_callable=lambda x: [m.value for m in x])


# --------------------------------------------------------------------------------------
# institutions and people
# --------------------------------------------------------------------------------------
class Institution(Base):
    __tablename__ = "institutions"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    verified: Mapped[bool] = mapped_column(default=False)
    is_vendor: Mapped[bool] = mapped_column(default=False)
    is_facility: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    identifiers: Mapped[list[InstitutionIdentifier]] = relationship(
        back_populates="institution", cascade="all, delete-orphan"
    )
    licences: Mapped[list[Licence]] = relationship(
        back_populates="institution", cascade="all, delete-orphan"
    )


class InstitutionIdentifier(Base):
    """A verified e-mail domain or identity-provider identifier of an institution."""

    __tablename__ = "institution_identifiers"
    __table_args__ = (
        UniqueConstraint("kind", "value"),
        CheckConstraint("kind IN ('email_domain', 'idp')", name="kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    value: Mapped[str] = mapped_column(String(255))

    institution: Mapped[Institution] = relationship(back_populates="identifiers")


class Licence(Base):
    __tablename__ = "licences"
    __table_args__ = (UniqueConstraint("institution_id", "product"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id", ondelete="CASCADE"))
    product: Mapped[str] = mapped_column(String(100))
    valid_until: Mapped[datetime | None]
    seats: Mapped[int | None]

    institution: Mapped[Institution] = relationship(back_populates="licences")


class Department(Base):
    """A department or team (``virtual`` for shared resources, confidential work, customers)."""

    __tablename__ = "departments"
    __table_args__ = (UniqueConstraint("institution_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"))
    virtual: Mapped[bool] = mapped_column(default=False)
    pi_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", use_alter=True))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (Index("ix_users_department_id", "department_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)  # login name
    display_name: Mapped[str] = mapped_column(String(200), default="")  # first and last name
    institution_id: Mapped[int | None] = mapped_column(ForeignKey("institutions.id"))
    department_id: Mapped[int | None] = mapped_column(ForeignKey("departments.id"))
    email: Mapped[str | None] = mapped_column(String(255))  # private
    email_visible: Mapped[bool] = mapped_column(default=False)
    institutional_email: Mapped[str | None] = mapped_column(String(255))
    institutional_email_verified_at: Mapped[datetime | None]
    orcid: Mapped[str | None] = mapped_column(String(19))
    phone: Mapped[str | None] = mapped_column(String(40))
    state: Mapped[UserState] = mapped_column(_enum(UserState, "user_state"), default=UserState.tentative)
    is_admin: Mapped[bool] = mapped_column(default=False)
    under_18: Mapped[bool] = mapped_column(default=False)
    last_login_ip: Mapped[str | None] = mapped_column(String(45))  # full, on the account only
    last_login_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    confirmed_at: Mapped[datetime | None]
    deactivated_at: Mapped[datetime | None]
    closed_at: Mapped[datetime | None]
    anonymised_at: Mapped[datetime | None]

    institution: Mapped[Institution | None] = relationship()
    department: Mapped[Department | None] = relationship(foreign_keys=[department_id])


class DepartmentMembership(Base):
    """Access to a department's data beyond one's own department (read, optionally modify)."""

    __tablename__ = "department_memberships"
    __table_args__ = (Index("ix_department_memberships_user", "user_id", "department_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    department_id: Mapped[int] = mapped_column(ForeignKey("departments.id"), index=True)
    can_modify: Mapped[bool] = mapped_column(default=False)
    granted_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    granted_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Project(Base):
    __tablename__ = "projects"
    __table_args__ = (UniqueConstraint("institution_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"))
    pi_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)  # listing: projects I lead
    status: Mapped[str] = mapped_column(String(20), default="active")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


experiment_projects = Table(
    "experiment_projects",
    Base.metadata,
    Column("project_id", ForeignKey("projects.id"), primary_key=True),
    Column("experiment_id", ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
    Index("ix_experiment_projects_experiment", "experiment_id"),
)

result_set_projects = Table(
    "result_set_projects",
    Base.metadata,
    Column("project_id", ForeignKey("projects.id"), primary_key=True),
    Column("result_set_id", ForeignKey("result_sets.id", ondelete="CASCADE"), primary_key=True),
)


class Experiment(Base):
    __tablename__ = "experiments"
    __table_args__ = (
        Index("ix_experiments_pi_id", "pi_id"),
        Index("ix_experiments_department_id", "department_id"),
        Index("ix_experiments_public", "public"),
        CheckConstraint("NOT (proprietary AND public)", name="proprietary_never_public"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    exid: Mapped[str] = mapped_column(String(64), unique=True)
    title: Mapped[str] = mapped_column(String(500), default="")
    pi_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"))  # fixed at creation
    facility: Mapped[str] = mapped_column(String(200), default="")
    department_id: Mapped[int | None] = mapped_column(ForeignKey("departments.id"))
    start_at: Mapped[datetime | None]
    end_at: Mapped[datetime | None]
    proprietary: Mapped[bool] = mapped_column(default=True)
    public: Mapped[bool] = mapped_column(default=False)
    mirror_agreed: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(String(20), default="active")
    archived_at: Mapped[datetime | None]
    retain_until: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]
    deleted_reason: Mapped[str | None] = mapped_column(Text)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    pi: Mapped[User] = relationship(foreign_keys=[pi_id])
    institution: Mapped[Institution] = relationship()
    department: Mapped[Department | None] = relationship()
    projects: Mapped[list[Project]] = relationship(secondary=experiment_projects)


class RoleGrant(Base):
    """A role on an experiment, project or team. Kept forever as history (revoked, never deleted)."""

    __tablename__ = "role_grants"
    __table_args__ = (
        CheckConstraint(
            "(CASE WHEN experiment_id IS NULL THEN 0 ELSE 1 END"
            " + CASE WHEN project_id IS NULL THEN 0 ELSE 1 END"
            " + CASE WHEN department_id IS NULL THEN 0 ELSE 1 END) = 1",
            name="one_target",
        ),
        Index("ix_role_grants_user_experiment", "user_id", "experiment_id"),
        Index("ix_role_grants_experiment", "experiment_id"),
        Index("ix_role_grants_user_project", "user_id", "project_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    experiment_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id"))
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id"))
    department_id: Mapped[int | None] = mapped_column(ForeignKey("departments.id"))
    role: Mapped[Role] = mapped_column(_enum(Role, "role"))
    granted_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    granted_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    revoked_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))

    user: Mapped[User] = relationship(foreign_keys=[user_id])


class Share(Base):
    """A request to share an experiment or project; outside the institution it waits for the PI."""

    __tablename__ = "shares"
    __table_args__ = (
        CheckConstraint(
            "(experiment_id IS NULL) <> (project_id IS NULL)", name="one_target"
        ),
        Index("ix_shares_experiment_state", "experiment_id", "state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id"))
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id"))
    shared_with_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    requested_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    role: Mapped[Role] = mapped_column(_enum(Role, "share_role"), default=Role.viewer)
    cross_institution: Mapped[bool] = mapped_column(default=False)
    state: Mapped[ShareState] = mapped_column(_enum(ShareState, "share_state"), default=ShareState.pending)
    decided_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    decided_at: Mapped[datetime | None]
    role_grant_id: Mapped[int | None] = mapped_column(ForeignKey("role_grants.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DataKey(Base):
    """A file's data key, wrapped by a master key. Destroying it crypto-shreds the file."""

    __tablename__ = "data_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    wrapped_key: Mapped[bytes | None] = mapped_column()
    master_key_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    destroyed_at: Mapped[datetime | None]


class StoredFile(Base):
    """A file of an experiment, or of a user's personal repository (``owner_id``).

    A row exists only for a file whose every replica was durable when it was committed (the
    chunk store's ingest). Deleting keeps the row as a stub (``deleted_at``, ``deleted_reason``)
    after its data key was destroyed; ``purged_at`` says when its chunks were removed from every
    location. ``uuid`` names the stored object and is bound into every chunk's associated data.
    """

    __tablename__ = "files"
    __table_args__ = (
        CheckConstraint("(experiment_id IS NULL) <> (owner_id IS NULL)", name="one_home"),
        UniqueConstraint("experiment_id", "owner_id", "path", name="uq_files_home_path"),
        Index("ix_files_owner", "owner_id"),
        Index("ux_files_uuid", "uuid", unique=True),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id"), index=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    checksum: Mapped[str | None] = mapped_column(String(80))  # sha256 of the plaintext
    chunk_size: Mapped[int | None]
    chunk_count: Mapped[int | None]
    data_key_id: Mapped[int | None] = mapped_column(ForeignKey("data_keys.id"))
    locations: Mapped[list] = mapped_column(JSON, default=list)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None]
    deleted_reason: Mapped[str | None] = mapped_column(Text)
    uuid: Mapped[str | None] = mapped_column(String(32))  # 32 hex digits
    format_version: Mapped[int | None]
    chunk_map: Mapped[bytes | None] = mapped_column(LargeBinary)  # None: fixed grid (format.py)
    purged_at: Mapped[datetime | None]


class ReplicaFault(Base):
    """A replica that failed to deliver a stored file's chunk (found by a read or a scrub).

    ``resolved_at`` is set when a scrub repaired the replica or found it healthy again.
    """

    __tablename__ = "replica_faults"
    __table_args__ = (Index("ix_replica_faults_file", "file_id", "resolved_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    file_id: Mapped[int] = mapped_column(ForeignKey("files.id"))
    location: Mapped[str] = mapped_column(String(100))
    chunk_index: Mapped[int | None] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(20))  # corrupt | truncated | missing | unreadable
    detail: Mapped[str] = mapped_column(Text, default="")
    detected_by: Mapped[str] = mapped_column(String(20))  # read | scrub
    detected_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None]


class PersonalShare(Base):
    """A file or folder of a personal repository shared with one named user."""

    __tablename__ = "personal_shares"
    __table_args__ = (Index("ix_personal_shares_with", "shared_with_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    path: Mapped[str] = mapped_column(String(1024))  # a file or a folder prefix
    shared_with_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class ResultSet(Base):
    """Derived data of an experiment; visible outside its department once published."""

    __tablename__ = "result_sets"

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"), index=True)
    department_id: Mapped[int | None] = mapped_column(ForeignKey("departments.id"))
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(50), default="analysis")
    status: Mapped[str] = mapped_column(String(20), default="draft")
    published_at: Mapped[datetime | None]
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    experiment: Mapped[Experiment] = relationship()
    projects: Mapped[list[Project]] = relationship(secondary=result_set_projects)
    results: Mapped[list[Result]] = relationship(back_populates="result_set", cascade="all, delete-orphan")


class Result(Base):
    __tablename__ = "results"

    id: Mapped[int] = mapped_column(primary_key=True)
    result_set_id: Mapped[int] = mapped_column(ForeignKey("result_sets.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(50), default="value")
    data: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    result_set: Mapped[ResultSet] = relationship(back_populates="results")


class Comment(Base):
    """A comment; it inherits access from the experiment, result set or result it is on."""

    __tablename__ = "comments"
    __table_args__ = (
        CheckConstraint(
            "(CASE WHEN experiment_id IS NULL THEN 0 ELSE 1 END"
            " + CASE WHEN result_set_id IS NULL THEN 0 ELSE 1 END"
            " + CASE WHEN result_id IS NULL THEN 0 ELSE 1 END) = 1",
            name="one_parent",
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id"), index=True)
    result_set_id: Mapped[int | None] = mapped_column(ForeignKey("result_sets.id", ondelete="CASCADE"))
    result_id: Mapped[int | None] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"))
    author_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Environment(Base):
    """A kernel image or kernelspec with the licences it needs."""

    __tablename__ = "environments"
    __table_args__ = (
        CheckConstraint("NOT (proprietary AND public)", name="proprietary_never_public"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    image: Mapped[str | None] = mapped_column(String(300))
    kernelspec: Mapped[str | None] = mapped_column(String(100))
    licences: Mapped[list] = mapped_column(JSON, default=list)  # product names
    proprietary: Mapped[bool] = mapped_column(default=False)
    institution_id: Mapped[int | None] = mapped_column(ForeignKey("institutions.id"))
    public: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    """One decision or change, hash-chained to the event before it. Append-only."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False)
    time: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(50))
    target: Mapped[str] = mapped_column(String(1100))
    allowed: Mapped[bool]
    rule: Mapped[str] = mapped_column(String(80))
    reason: Mapped[str] = mapped_column(Text, default="")
    ip: Mapped[str] = mapped_column(String(45), default="-")  # truncated
    details: Mapped[dict] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The chain's head: the last seq and hash. Locked by every append; catches tail deletion."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    hash: Mapped[str] = mapped_column(String(64))


# --------------------------------------------------------------------------------------
# sign-in: local accounts (the embedded default) and identity-provider identities
# --------------------------------------------------------------------------------------
class LocalCredential(Base):
    """A local account's secrets: password hash (Argon2id), TOTP secret, lockout, e-mail token.

    Only the datastore service reads this table; the Hub asks the service to check a login.
    """

    __tablename__ = "local_credentials"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    totp_secret: Mapped[str | None] = mapped_column(String(64))
    totp_confirmed_at: Mapped[datetime | None]
    failed_attempts: Mapped[int] = mapped_column(default=0)
    locked_until: Mapped[datetime | None]
    email_token_hash: Mapped[str | None] = mapped_column(String(64), index=True)  # sha256 of the link's token
    email_token_expires_at: Mapped[datetime | None]
    adult_confirmed_at: Mapped[datetime | None]  # "I am 18 or older", ticked at sign-up
    signup_ip: Mapped[str | None] = mapped_column(String(45))  # full (privacy statement), account only
    totp_last_counter: Mapped[int | None] = mapped_column(BigInteger)  # a used code is never taken again
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime | None]


class ExternalIdentity(Base):
    """A user's identity at an identity provider (OAuth/OIDC ``iss`` + ``sub``)."""

    __tablename__ = "external_identities"
    __table_args__ = (UniqueConstraint("idp", "subject"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    idp: Mapped[str] = mapped_column(String(255))
    subject: Mapped[str] = mapped_column(String(255))
    claims: Mapped[dict] = mapped_column(JSON, default=dict)  # the membership claims last seen
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime | None]


# --------------------------------------------------------------------------------------
# lifecycle: notices (an outbox: recorded with the decision, sent after, exactly once)
# --------------------------------------------------------------------------------------
class Notice(Base):
    """A notice to send (e-mail), recorded in the same transaction as the decision behind it.

    ``key`` is unique per notice (e.g. ``retention:NLS-2026-0001:30:2027-12-01``), so a rerun
    never records it twice; ``sent_at`` is set once the SMTP server accepted it, so a crash
    between the two leaves it to be sent by the next run.
    """

    __tablename__ = "notices"
    __table_args__ = (Index("ix_notices_unsent", "sent_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(50))
    rule: Mapped[str] = mapped_column(String(80))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    subject: Mapped[str] = mapped_column(String(300))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)


__all__ = [
    "Base", "Institution", "InstitutionIdentifier", "Licence", "Department", "User",
    "DepartmentMembership", "Project", "Experiment", "RoleGrant", "Share", "DataKey",
    "StoredFile", "ReplicaFault", "PersonalShare", "ResultSet", "Result", "Comment", "Environment",
    "AuditEvent", "AuditHead", "LocalCredential", "ExternalIdentity", "Notice", "UserState", "Role", "ShareState", "experiment_projects",
    "result_set_projects", "utcnow",
]
