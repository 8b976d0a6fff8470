"""From rows to policy values, and access filtering evaluated in the database.

:func:`load_subject` and :func:`experiment_value` turn ORM rows into the frozen values that
:mod:`labvault.policies` decides on. :func:`visible_experiments` is the SQL side of the same
rules for list views ("list.hide_inaccessible"): it returns only the experiments a user may
read at ``now``, and it must agree with ``decide(subject, "read", experiment, now)`` on every
world (tests/test_access_sql.py proves it with hypothesis). Each branch of the union is an
index lookup keyed by the user, so the cost grows with what the user can see, not with the
number of experiments.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from functools import lru_cache

from sqlalchemy import Integer, Select, and_, bindparam, exists, false, or_, select, union
from sqlalchemy.orm import Session

from labvault import policies as p

from .models import (
    DepartmentMembership,
    Experiment,
    Institution,
    Licence,
    PersonalShare,
    Project,
    RoleGrant,
    User,
    UserState,
    UTCDateTime,
    experiment_projects,
)


def _active(model, now: datetime):
    """Not revoked (and, where the row has one, not expired) at ``now``."""
    clauses = [or_(model.revoked_at.is_(None), model.revoked_at > now)]
    if hasattr(model, "expires_at"):
        clauses.append(or_(model.expires_at.is_(None), model.expires_at > now))
    return and_(*clauses)


def load_subject(session: Session, user: User | int, now: datetime) -> p.Subject:
    """Everything the policy needs to know about ``user`` (a handful of small queries)."""
    if isinstance(user, int):
        found = session.get(User, user)
        if found is None:
            raise LookupError(f"no user with id {user}")
        user = found
    inst: Institution | None = session.get(Institution, user.institution_id) if user.institution_id else None
    read_departments: set[int] = set()
    modify_departments: set[int] = set()
    if user.department_id is not None:
        read_departments.add(user.department_id)
        modify_departments.add(user.department_id)
    for dep_id, can_modify in session.execute(
        select(DepartmentMembership.department_id, DepartmentMembership.can_modify).where(
            DepartmentMembership.user_id == user.id, _active(DepartmentMembership, now)
        )
    ):
        read_departments.add(dep_id)
        if can_modify:
            modify_departments.add(dep_id)
    projects = set(session.scalars(select(Project.id).where(Project.pi_id == user.id)))
    grants: dict[int, list[p.Grant]] = defaultdict(list)
    for exp_id, proj_id, role, expires_at, revoked_at in session.execute(
        select(
            RoleGrant.experiment_id, RoleGrant.project_id, RoleGrant.role,
            RoleGrant.expires_at, RoleGrant.revoked_at,
        ).where(RoleGrant.user_id == user.id, RoleGrant.department_id.is_(None), _active(RoleGrant, now))
    ):
        if exp_id is not None:
            grants[exp_id].append(p.Grant(role.value, expires_at, revoked_at))
        elif proj_id is not None:
            projects.add(proj_id)
    licences: dict[str, datetime | None] = {}
    if inst is not None:
        for product, valid_until in session.execute(
            select(Licence.product, Licence.valid_until).where(Licence.institution_id == inst.id)
        ):
            licences[product] = valid_until
    return p.Subject(
        user_id=user.id,
        name=user.name,
        institution_id=user.institution_id,
        institution_verified=bool(inst and inst.verified),
        is_vendor=bool(inst and inst.is_vendor),
        is_facility=bool(inst and inst.is_facility),
        is_admin=user.is_admin,
        state=user.state.value,
        institutional_email_verified=user.institutional_email_verified_at is not None,
        department_id=user.department_id,
        read_departments=frozenset(read_departments),
        modify_departments=frozenset(modify_departments),
        projects=frozenset(projects),
        grants={k: tuple(v) for k, v in grants.items()},
        licences=licences,
    )


def experiment_value(session: Session, e: Experiment) -> p.Experiment:
    project_ids = frozenset(
        session.scalars(
            select(experiment_projects.c.project_id).where(experiment_projects.c.experiment_id == e.id)
        )
    )
    return p.Experiment(
        id=e.id,
        exid=e.exid,
        pi_id=e.pi_id,
        institution_id=e.institution_id,
        department_id=e.department_id,
        project_ids=project_ids,
        proprietary=e.proprietary,
        public=e.public,
        start_at=e.start_at,
        end_at=e.end_at,
        status=e.status,
        archived_at=e.archived_at,
        retain_until=e.retain_until,
        deleted_at=e.deleted_at,
        mirror_agreed=e.mirror_agreed,
    )


def visible_experiment_ids(subject: p.Subject, now: datetime, policy: p.Policy | None = None) -> Select:
    """A SELECT of the ids of experiments ``subject`` may read at ``now``, decided in SQL."""
    policy = policy or p.default_policy()
    E, G = Experiment, RoleGrant
    not_proprietary = E.proprietary.is_(False)
    public = select(E.id).where(E.public.is_(True), not_proprietary)
    if subject.user_id is None or subject.is_system:
        return public
    if subject.state != UserState.active.value:
        return select(E.id).where(false())
    uid = subject.user_id
    grant_ok = and_(G.user_id == uid, G.experiment_id.is_not(None), _active(G, now))
    by_pi = select(E.id).where(E.pi_id == uid)
    by_role = select(G.experiment_id.label("id")).where(grant_ok, G.role != p.ROLES[4])
    by_facility = (
        select(G.experiment_id.label("id"))
        .join(E, E.id == G.experiment_id)
        .where(grant_ok, G.role == p.ROLES[4], or_(E.end_at.is_(None), E.end_at > policy.facility_cutoff(now)))
    )
    departments = union(
        select(User.department_id).where(User.id == uid, User.department_id.is_not(None)),
        select(DepartmentMembership.department_id).where(
            DepartmentMembership.user_id == uid, _active(DepartmentMembership, now)
        ),
    )
    by_department = select(E.id).where(E.department_id.in_(departments.scalar_subquery()), not_proprietary)
    projects = union(
        select(G.project_id).where(G.user_id == uid, G.project_id.is_not(None), _active(G, now)),
        select(Project.id).where(Project.pi_id == uid),
    )
    EP = experiment_projects.c
    by_project = (
        select(EP.experiment_id.label("id"))
        .join(E, E.id == EP.experiment_id)
        .where(EP.project_id.in_(projects.scalar_subquery()), not_proprietary)
    )
    ids = union(by_pi, by_role, by_facility, by_department, by_project, public).subquery("visible")
    query = select(ids.c.id)
    if subject.is_vendor:
        query = select(ids.c.id).join(E, E.id == ids.c.id).where(not_proprietary)
    return query


def visible_experiments(subject: p.Subject, now: datetime, policy: p.Policy | None = None) -> Select:
    """A SELECT of Experiment rows ``subject`` may read, ordered by exID."""
    ids = visible_experiment_ids(subject, now, policy).subquery("ids")
    return select(Experiment).join(ids, Experiment.id == ids.c.id).order_by(Experiment.exid)


@lru_cache(maxsize=1)
def _listing_statement() -> Select:
    """The list query as ONE statement with bind parameters (:uid, :now, :cutoff), built once.

    Unlike :func:`visible_experiment_ids` it needs nothing loaded beforehand: the account
    state and the vendor flag are checked in SQL too, so a listing is one round trip.
    """
    uid = bindparam("uid", type_=Integer)
    now = bindparam("now", type_=UTCDateTime())
    cutoff = bindparam("cutoff", type_=UTCDateTime())
    anonymous_subject = p.Subject(user_id=uid)  # type: ignore[arg-type]

    class _BoundCutoff:  # policy.facility_cutoff(now) -> the :cutoff parameter
        @staticmethod
        def facility_cutoff(_now):
            return cutoff

    ids = visible_experiment_ids(anonymous_subject, now, _BoundCutoff()).subquery("visible")  # type: ignore[arg-type]
    active = exists().where(User.id == uid, User.state == UserState.active)
    vendor = exists().where(User.id == uid, Institution.id == User.institution_id, Institution.is_vendor.is_(True))
    return (
        select(Experiment)
        .join(ids, Experiment.id == ids.c.id)
        .where(active, or_(Experiment.proprietary.is_(False), ~vendor))
        .order_by(Experiment.exid)
    )


def list_visible(session: Session, user_id: int | None, now: datetime,
                 policy: p.Policy | None = None) -> list[Experiment]:
    """The experiments ``user_id`` may read at ``now`` (anonymous: ``None``), in one query."""
    policy = policy or p.default_policy()
    if user_id is None:
        return list(session.scalars(visible_experiments(p.ANONYMOUS, now, policy)))
    params = {"uid": user_id, "now": now, "cutoff": policy.facility_cutoff(now)}
    return list(session.scalars(_listing_statement(), params))


def personal_shared_with(session: Session, owner_id: int, path: str) -> frozenset[int]:
    """The users a personal file or folder ``path`` is shared with: by a share of the path
    itself or of a folder above it (``data`` covers ``data/run1/a.h5``). Revoked shares don't count."""
    rows = session.execute(
        select(PersonalShare.path, PersonalShare.shared_with_id)
        .where(PersonalShare.owner_id == owner_id, PersonalShare.revoked_at.is_(None))
    )
    return frozenset(uid for shared, uid in rows if path == shared or path.startswith(shared + "/"))
