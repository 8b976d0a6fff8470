"""Domain operations: decide with the policy, record the audit event, apply the change.

Each operation runs in one transaction: the change and its audit event commit together.
A refusal is audited too (in its own transaction, which commits) and then raised as
:class:`Denied`, carrying the Decision. The admin CLI and the datastore service both call
these functions; they are the only code that writes the domain tables.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from labvault import policies as p
from labvault.policies import Decision

from . import audit
from .access import experiment_value, list_visible, load_subject, personal_shared_with
from .models import (
    Department,
    DepartmentMembership,
    Environment,
    Experiment,
    Institution,
    InstitutionIdentifier,
    Licence,
    PersonalShare,
    Project,
    ResultSet,
    Role,
    RoleGrant,
    Share,
    ShareState,
    User,
    UserState,
    experiment_projects,
    result_set_projects,
    utcnow,
)

EXID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,99}$")
DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9-]{1,63}\.)+[a-z]{2,63}$")
ORCID_RE = re.compile(r"^\d{4}-\d{4}-\d{4}-\d{3}[\dX]$")


class OperationError(Exception):
    """Bad input or a missing object: the message is one line for a person."""


class NotFound(OperationError):
    pass


class Denied(OperationError):
    def __init__(self, decision: Decision):
        super().__init__(f"refused by {decision.rule}: {decision.reason}")
        self.decision = decision


#: Decision recorded for changes made by an operator through the admin CLI.
OPERATOR = Decision(True, "admin.access_rights", "administrator, admin CLI")
#: The policy subject of an operator: an admin who is no labvault user (id 0 is never a row).
OPERATOR_SUBJECT = p.Subject(user_id=0, name="operator", is_admin=True, state="active")


@dataclass
class Actor:
    """Who performs an operation: a labvault user, or an operator at the admin CLI."""

    user_id: int | None = None
    operator: str | None = None
    ip: str | None = None

    def label(self, session: Session) -> str:
        if self.user_id is not None:
            u = session.get(User, self.user_id)
            return u.name if u else f"user:{self.user_id}"
        return f"operator:{self.operator or 'cli'}"


# --------------------------------------------------------------------------------------
# lookups
# --------------------------------------------------------------------------------------
def get_institution(session: Session, name: str) -> Institution:
    inst = session.scalar(select(Institution).where(Institution.name == name))
    if inst is None:
        raise NotFound(f"unknown institution {name!r}")
    return inst


def get_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"unknown user {name!r}")
    return user


def get_experiment(session: Session, exid: str) -> Experiment:
    e = session.scalar(select(Experiment).where(Experiment.exid == exid))
    if e is None:
        raise NotFound(f"unknown experiment {exid!r}")
    return e


def get_department(session: Session, institution: Institution, name: str) -> Department:
    d = session.scalar(
        select(Department).where(Department.institution_id == institution.id, Department.name == name)
    )
    if d is None:
        raise NotFound(f"unknown department {name!r} of {institution.name}")
    return d


def get_project(session: Session, name: str, institution: Institution | None = None) -> Project:
    q = select(Project).where(Project.name == name)
    if institution is not None:
        q = q.where(Project.institution_id == institution.id)
    found = session.scalars(q).all()
    if not found:
        raise NotFound(f"unknown project {name!r}")
    if len(found) > 1:
        raise OperationError(f"project name {name!r} is ambiguous: name the institution")
    return found[0]


# --------------------------------------------------------------------------------------
# the decide → audit → apply pattern
# --------------------------------------------------------------------------------------
def _record(session: Session, actor: Actor, action: str, target: str, decision: Decision,
            now: datetime, details: dict | None = None) -> None:
    audit.append(session, actor=actor.label(session), action=action, target=target,
                 decision=decision, ip=actor.ip, details=details, now=now)


def _refuse(factory: sessionmaker, actor: Actor, action: str, target: str, decision: Decision,
            now: datetime) -> Denied:
    with factory.begin() as session:
        _record(session, actor, action, target, decision, now)
    return Denied(decision)


def _subject(session: Session, actor: Actor, now: datetime) -> p.Subject | None:
    return load_subject(session, actor.user_id, now) if actor.user_id is not None else None


# --------------------------------------------------------------------------------------
# operator operations (admin CLI): institutions, users, departments, licences, environments
# --------------------------------------------------------------------------------------
def add_institution(factory, actor: Actor, name: str, *, domains: Iterable[str] = (),
                    idps: Iterable[str] = (), vendor: bool = False, facility: bool = False,
                    verified: bool = True, now: datetime | None = None) -> int:
    now = now or utcnow()
    name = name.strip()
    if not name:
        raise OperationError("institution name is empty")
    domains = [d.strip().lower() for d in domains]
    for d in domains:
        if not DOMAIN_RE.match(d):
            raise OperationError(f"not an e-mail domain: {d!r}")
    with factory.begin() as session:
        if session.scalar(select(Institution.id).where(Institution.name == name)):
            raise OperationError(f"institution {name!r} exists already")
        inst = Institution(name=name, verified=verified, is_vendor=vendor, is_facility=facility)
        for d in domains:
            _unique_identifier(session, "email_domain", d)
            inst.identifiers.append(InstitutionIdentifier(kind="email_domain", value=d))
        for i in idps:
            _unique_identifier(session, "idp", i.strip())
            inst.identifiers.append(InstitutionIdentifier(kind="idp", value=i.strip()))
        session.add(inst)
        session.flush()
        _record(session, actor, "institution.add", f"institution:{name}", OPERATOR, now,
                {"vendor": vendor, "facility": facility, "verified": verified})
        return inst.id


def _unique_identifier(session: Session, kind: str, value: str) -> None:
    if not value:
        raise OperationError(f"empty {kind}")
    taken = session.scalar(
        select(Institution.name).join(InstitutionIdentifier).where(
            InstitutionIdentifier.kind == kind, InstitutionIdentifier.value == value
        )
    )
    if taken:
        raise OperationError(f"{kind} {value!r} already belongs to {taken}")


def add_user(factory, actor: Actor, name: str, *, institution: str | None, display_name: str = "",
             email: str | None = None, department: str | None = None, admin: bool = False,
             state: str = "active", institutional_email: str | None = None,
             verified_institutional_email: bool = False, orcid: str | None = None,
             now: datetime | None = None) -> int:
    now = now or utcnow()
    if not NAME_RE.match(name):
        raise OperationError(
            f"bad user name {name!r}: lower-case letters, digits and . _ @ - (at most 100)"
        )
    if state not in p.model.ACCOUNT_STATES:
        raise OperationError(f"bad state {state!r}: one of {', '.join(p.model.ACCOUNT_STATES)}")
    if orcid and not ORCID_RE.match(orcid):
        raise OperationError(f"bad ORCID {orcid!r}: expected 0000-0000-0000-000X")
    for label, value in (("e-mail", email), ("institutional e-mail", institutional_email)):
        if value and not re.match(r"^[^@\s]+@[^@\s]+\.[^@\s]+$", value):
            raise OperationError(f"bad {label} {value!r}")
    with factory.begin() as session:
        if session.scalar(select(User.id).where(User.name == name)):
            raise OperationError(f"user {name!r} exists already")
        inst = get_institution(session, institution) if institution else None
        dept = get_department(session, inst, department) if (department and inst) else None
        if department and not inst:
            raise OperationError("a department needs an institution")
        if verified_institutional_email:
            if not institutional_email or inst is None:
                raise OperationError("a verified institutional e-mail needs the address and an institution")
            domain = institutional_email.rsplit("@", 1)[1].lower()
            domains = {i.value for i in inst.identifiers if i.kind == "email_domain"}
            if not any(domain == d or domain.endswith("." + d) for d in domains):
                raise OperationError(
                    f"{institutional_email} is not an address of {inst.name} "
                    f"(its domains: {', '.join(sorted(domains)) or 'none'})"
                )
        user = User(
            name=name, display_name=display_name or name, institution_id=inst.id if inst else None,
            department_id=dept.id if dept else None, email=email, is_admin=admin,
            state=UserState(state), institutional_email=institutional_email, orcid=orcid,
            institutional_email_verified_at=now if verified_institutional_email else None,
            confirmed_at=now if state == "active" else None, created_at=now,
        )
        session.add(user)
        session.flush()
        _record(session, actor, "user.add", f"user:{name}", OPERATOR, now,
                {"institution": institution, "admin": admin, "state": state})
        return user.id


def set_user_state(factory, actor: Actor, name: str, state: str, now: datetime | None = None) -> None:
    now = now or utcnow()
    if state not in p.model.ACCOUNT_STATES:
        raise OperationError(f"bad state {state!r}: one of {', '.join(p.model.ACCOUNT_STATES)}")
    with factory.begin() as session:
        user = get_user(session, name)
        old = user.state.value
        user.state = UserState(state)
        if state == "active" and user.confirmed_at is None:
            user.confirmed_at = now
        if state == "closed":
            user.closed_at = now
            # privacy statement: closing an account removes its active roles at once (history kept)
            for g in session.scalars(
                select(RoleGrant).where(RoleGrant.user_id == user.id, RoleGrant.revoked_at.is_(None))
            ):
                g.revoked_at = now
        if state == "deactivated":
            user.deactivated_at = now
        _record(session, actor, "user.state", f"user:{name}", OPERATOR, now, {"from": old, "to": state})


def add_department(factory, actor: Actor, name: str, institution: str, *, virtual: bool = False,
                   now: datetime | None = None) -> int:
    now = now or utcnow()
    if not name.strip():
        raise OperationError("department name is empty")
    with factory.begin() as session:
        inst = get_institution(session, institution)
        if session.scalar(select(Department.id).where(Department.institution_id == inst.id,
                                                      Department.name == name)):
            raise OperationError(f"department {name!r} of {institution} exists already")
        d = Department(name=name, institution_id=inst.id, virtual=virtual)
        session.add(d)
        session.flush()
        _record(session, actor, "department.add", f"department:{institution}/{name}", OPERATOR, now,
                {"virtual": virtual})
        return d.id


def add_membership(factory, actor: Actor, user: str, institution: str, department: str, *,
                   modify: bool = False, now: datetime | None = None) -> None:
    """Give ``user`` read (and with ``modify``, modify) access to a department's data."""
    now = now or utcnow()
    target = f"department:{institution}/{department}"
    with factory.begin() as session:
        u = get_user(session, user)
        d = get_department(session, get_institution(session, institution), department)
        subject = _subject(session, actor, now)
        decision = OPERATOR
        if subject is not None:
            change = p.DepartmentAccessChange(p.Department(d.id, d.institution_id, d.virtual),
                                              load_subject(session, u, now), modify)
            decision = p.decide(subject, "manage_access", change, now)
        if decision.allowed:
            session.add(DepartmentMembership(user_id=u.id, department_id=d.id, can_modify=modify,
                                             granted_by_id=actor.user_id, granted_at=now))
            _record(session, actor, "department.member", target, decision, now,
                    {"user": user, "modify": modify})
            return
    raise _refuse(factory, actor, "department.member", target, decision, now)


def add_project(factory, actor: Actor, name: str, institution: str, *, pi: str | None = None,
                now: datetime | None = None) -> int:
    now = now or utcnow()
    with factory.begin() as session:
        inst = get_institution(session, institution)
        if session.scalar(select(Project.id).where(Project.institution_id == inst.id, Project.name == name)):
            raise OperationError(f"project {name!r} of {institution} exists already")
        pi_user = get_user(session, pi) if pi else None
        proj = Project(name=name, institution_id=inst.id, pi_id=pi_user.id if pi_user else None)
        session.add(proj)
        session.flush()
        _record(session, actor, "project.add", f"project:{institution}/{name}", OPERATOR, now,
                {"pi": pi})
        return proj.id


def link_project(factory, actor: Actor, exid: str, project: str, now: datetime | None = None) -> None:
    now = now or utcnow()
    with factory.begin() as session:
        e = get_experiment(session, exid)
        proj = get_project(session, project)
        exists = session.scalar(select(experiment_projects.c.project_id).where(
            experiment_projects.c.project_id == proj.id, experiment_projects.c.experiment_id == e.id))
        if exists:
            return
        session.execute(experiment_projects.insert().values(project_id=proj.id, experiment_id=e.id))
        _record(session, actor, "project.link", f"experiment:{exid}", OPERATOR, now, {"project": project})


def grant_project_access(factory, actor: Actor, project: str, user: str, *, institution: str | None = None,
                         now: datetime | None = None) -> RoleGrant:
    """Give ``user`` read-only access to a project (admins and the project's PI decide)."""
    now = now or utcnow()
    with factory.begin() as session:
        inst = get_institution(session, institution) if institution else None
        proj = get_project(session, project, inst)
        inst_name = session.get(Institution, proj.institution_id).name
        target = f"project:{inst_name}/{proj.name}"
        u = get_user(session, user)
        subject = _subject(session, actor, now)
        decision = OPERATOR
        if subject is not None:
            change = p.ProjectAccessChange(p.Project(proj.id, proj.pi_id, proj.institution_id),
                                           load_subject(session, u, now))
            decision = p.decide(subject, "manage_access", change, now)
        if decision.allowed:
            grant = session.scalar(select(RoleGrant).where(
                RoleGrant.user_id == u.id, RoleGrant.project_id == proj.id, RoleGrant.revoked_at.is_(None)))
            if grant is None:
                grant = RoleGrant(user_id=u.id, project_id=proj.id, role=Role.viewer,
                                  granted_by_id=actor.user_id, granted_at=now)
                session.add(grant)
                session.flush()
            _record(session, actor, "project.member", target, decision, now, {"user": user})
            return grant
    raise _refuse(factory, actor, "project.member", target, decision, now)


def add_licence(factory, actor: Actor, institution: str, product: str, *,
                valid_until: datetime | None = None, seats: int | None = None,
                now: datetime | None = None) -> None:
    now = now or utcnow()
    if not product.strip():
        raise OperationError("licence product is empty")
    if seats is not None and seats < 1:
        raise OperationError("seats must be at least 1")
    with factory.begin() as session:
        inst = get_institution(session, institution)
        lic = session.scalar(select(Licence).where(Licence.institution_id == inst.id, Licence.product == product))
        if lic is None:
            lic = Licence(institution_id=inst.id, product=product)
            session.add(lic)
        lic.valid_until = valid_until
        lic.seats = seats
        _record(session, actor, "licence.set", f"institution:{institution}", OPERATOR, now,
                {"product": product, "valid_until": valid_until.isoformat() if valid_until else None})


def _check_environment(name: str, image: str | None, kernelspec: str | None, proprietary: bool,
                       institution: str | None, public: bool, now: datetime) -> None:
    if not re.match(r"^[a-z0-9][a-z0-9._-]{0,99}$", name):
        raise OperationError(f"bad environment name {name!r}")
    if not image and not kernelspec:
        raise OperationError("an environment needs an image or a kernelspec")
    if proprietary and public:
        d = p.decide(p.SYSTEM, "publish", p.Environment(0, name, proprietary=True), now)
        raise Denied(d)
    if proprietary and not institution:
        raise OperationError("a proprietary environment needs its owning institution")


def add_environment(factory, actor: Actor, name: str, *, display_name: str = "",
                    image: str | None = None, kernelspec: str | None = None,
                    licences: Iterable[str] = (), proprietary: bool = False,
                    institution: str | None = None, public: bool = False,
                    now: datetime | None = None) -> int:
    now = now or utcnow()
    _check_environment(name, image, kernelspec, proprietary, institution, public, now)
    with factory.begin() as session:
        if session.scalar(select(Environment.id).where(Environment.name == name)):
            raise OperationError(f"environment {name!r} exists already")
        inst = get_institution(session, institution) if institution else None
        env = Environment(name=name, display_name=display_name or name, image=image,
                          kernelspec=kernelspec, licences=sorted(set(licences)),
                          proprietary=proprietary, institution_id=inst.id if inst else None,
                          public=public)
        session.add(env)
        session.flush()
        _record(session, actor, "environment.add", f"environment:{name}", OPERATOR, now,
                {"licences": sorted(set(licences)), "proprietary": proprietary})
        return env.id


def update_environment(factory, actor: Actor, name: str, *, display_name: str = "",
                       image: str | None = None, kernelspec: str | None = None,
                       licences: Iterable[str] = (), proprietary: bool = False,
                       institution: str | None = None, public: bool = False,
                       now: datetime | None = None) -> list[str]:
    """Make environment ``name`` exactly this (the catalogue's sync). Returns the fields that
    changed (empty: nothing was written, nothing audited)."""
    now = now or utcnow()
    _check_environment(name, image, kernelspec, proprietary, institution, public, now)
    with factory.begin() as session:
        env = session.scalar(select(Environment).where(Environment.name == name))
        if env is None:
            raise NotFound(f"unknown environment {name!r}")
        inst = get_institution(session, institution) if institution else None
        wanted = {"display_name": display_name or name, "image": image, "kernelspec": kernelspec,
                  "licences": sorted(set(licences)), "proprietary": proprietary,
                  "institution_id": inst.id if inst else None, "public": public}
        changed = [k for k, v in wanted.items() if getattr(env, k) != v]
        if not changed:
            return []
        for k in changed:
            setattr(env, k, wanted[k])
        _record(session, actor, "environment.update", f"environment:{name}", OPERATOR, now,
                {"changed": changed, "licences": wanted["licences"], "proprietary": proprietary})
        return changed


# --------------------------------------------------------------------------------------
# experiments and roles (decided by the policy, also from the CLI)
# --------------------------------------------------------------------------------------
def add_experiment(factory, actor: Actor, exid: str, *, pi: str, title: str = "",
                   facility: str = "", start_at: datetime | None = None,
                   end_at: datetime | None = None, proprietary: bool = True,
                   department: str | None = None, projects: Iterable[str] = (),
                   now: datetime | None = None) -> int:
    now = now or utcnow()
    if not EXID_RE.match(exid):
        raise OperationError(f"bad exID {exid!r}: letters, digits and . _ - (at most 64)")
    if start_at and end_at and end_at < start_at:
        raise OperationError("the experiment ends before it starts")
    target = f"experiment:{exid}"
    with factory.begin() as session:
        if session.scalar(select(Experiment.id).where(Experiment.exid == exid)):
            raise OperationError(f"experiment {exid!r} exists already")
        pi_user = get_user(session, pi)
        pi_subject = load_subject(session, pi_user, now)
        dept = None
        if department:
            if pi_user.institution is None:
                raise OperationError("the PI has no institution")
            dept = get_department(session, pi_user.institution, department)
        subject = _subject(session, actor, now)
        new = p.NewExperiment(pi_subject, dept.id if dept else None, proprietary)
        # An operator registers experiments as an admin would; the PI rules hold either way.
        decision = p.decide(subject or OPERATOR_SUBJECT, "create", new, now)
        if decision.allowed:
            owner_department = dept.id if dept else pi_user.department_id
            e = Experiment(
                exid=exid, title=title, pi_id=pi_user.id, institution_id=pi_user.institution_id,
                facility=facility, department_id=owner_department, start_at=start_at, end_at=end_at,
                proprietary=proprietary, public=False, created_by_id=actor.user_id, created_at=now,
            )
            session.add(e)
            session.flush()
            for name in projects:
                proj = get_project(session, name)
                session.execute(experiment_projects.insert().values(project_id=proj.id, experiment_id=e.id))
            _record(session, actor, "experiment.create", target, decision, now,
                    {"pi": pi, "proprietary": proprietary})
            return e.id
    raise _refuse(factory, actor, "experiment.create", target, decision, now)


def grant_role(factory, actor: Actor, exid: str, user: str, role: str, *,
               expires_at: datetime | None = None, now: datetime | None = None) -> int:
    """Grant ``role`` on an experiment. ``actor`` must be its PI or a manager (or an operator
    acting for the PI); vendor and account-state rules hold for everyone."""
    now = now or utcnow()
    if role not in p.ROLES:
        raise OperationError(f"unknown role {role!r}: one of {', '.join(p.ROLES)}")
    if expires_at is not None and expires_at <= now:
        raise OperationError("the grant would expire in the past")
    target = f"experiment:{exid}"
    with factory.begin() as session:
        e = get_experiment(session, exid)
        u = get_user(session, user)
        acting = actor.user_id if actor.user_id is not None else e.pi_id
        subject = load_subject(session, acting, now)
        change = p.RoleChange(experiment_value(session, e), load_subject(session, u, now), role)
        decision = p.decide(subject, "grant_role", change, now)
        if decision.allowed:
            g = RoleGrant(user_id=u.id, experiment_id=e.id, role=Role(role), granted_by_id=acting,
                          granted_at=now, expires_at=expires_at)
            session.add(g)
            session.flush()
            _record(session, actor, "role.grant", target, decision, now,
                    {"user": user, "role": role, "expires_at": expires_at.isoformat() if expires_at else None})
            return g.id
    raise _refuse(factory, actor, "role.grant", target, decision, now)


def revoke_role(factory, actor: Actor, exid: str, user: str, role: str | None = None,
                now: datetime | None = None) -> int:
    now = now or utcnow()
    target = f"experiment:{exid}"
    with factory.begin() as session:
        e = get_experiment(session, exid)
        u = get_user(session, user)
        acting = actor.user_id if actor.user_id is not None else e.pi_id
        subject = load_subject(session, acting, now)
        q = select(RoleGrant).where(RoleGrant.experiment_id == e.id, RoleGrant.user_id == u.id,
                                    RoleGrant.revoked_at.is_(None))
        if role:
            q = q.where(RoleGrant.role == Role(role))
        grants = session.scalars(q).all()
        if u.id == e.pi_id:  # the PI's own standing is not a grant: the policy refuses to end it
            change = p.RoleChange(experiment_value(session, e), load_subject(session, u, now), role or "viewer")
            decision = p.decide(subject, "revoke_role", change, now)
            if not decision.allowed:
                grants = []
        elif not grants:
            raise NotFound(f"{user} holds no active {role or 'role'} on {exid}")
        else:
            decision = Decision(True, "role.manage", "")
        for g in grants:
            change = p.RoleChange(experiment_value(session, e), load_subject(session, u, now), g.role.value)
            decision = p.decide(subject, "revoke_role", change, now)
            if not decision.allowed:
                break
        if decision.allowed:
            if not grants:
                raise NotFound(f"{user} holds no active {role or 'role'} on {exid}")
            for g in grants:
                g.revoked_at = now
                g.revoked_by_id = acting
            _record(session, actor, "role.revoke", target, decision, now,
                    {"user": user, "roles": sorted(g.role.value for g in grants)})
            return len(grants)
    raise _refuse(factory, actor, "role.revoke", target, decision, now)


def publish_experiment(factory, actor: Actor, exid: str, now: datetime | None = None) -> None:
    """Make an experiment public at its PI's request (never a proprietary one)."""
    now = now or utcnow()
    target = f"experiment:{exid}"
    with factory.begin() as session:
        e = get_experiment(session, exid)
        acting = actor.user_id if actor.user_id is not None else e.pi_id
        decision = p.decide(load_subject(session, acting, now), "publish", experiment_value(session, e), now)
        if decision.allowed:
            e.public = True
            _record(session, actor, "experiment.publish", target, decision, now)
            return
    raise _refuse(factory, actor, "experiment.publish", target, decision, now)


def list_visible_experiments(session: Session, user: str, now: datetime | None = None) -> list[Experiment]:
    return list_visible(session, get_user(session, user).id, now or utcnow())


# --------------------------------------------------------------------------------------
# sharing: free inside the institution, PI-confirmed outside it
# --------------------------------------------------------------------------------------
def share_experiment(factory, actor: Actor, exid: str, user: str, *, role: str = "viewer",
                     now: datetime | None = None) -> Share:
    """Share an experiment with ``user``. Inside its institution (or by the PI) the role is
    granted at once; otherwise the share waits, ``pending``, for the PI to confirm it."""
    now = now or utcnow()
    if role not in ("viewer", "writer"):
        raise OperationError("a share grants the viewer or writer role")
    target = f"experiment:{exid}"
    with factory.begin() as session:
        e = get_experiment(session, exid)
        u = get_user(session, user)
        subject = load_subject(session, actor.user_id, now)
        ev = experiment_value(session, e)
        target_subject = load_subject(session, u, now)
        decision = p.decide(subject, "share", p.Share(ev, target_subject, requested_by=subject.user_id), now)
        pending = (not decision.allowed and decision.rule == "sharing.cross_institution_pi_confirm")
        if decision.allowed or pending:
            share = Share(experiment_id=e.id, shared_with_id=u.id, requested_by_id=actor.user_id,
                          role=Role(role), cross_institution=decision.rule != "sharing.same_institution",
                          state=ShareState.pending if pending else ShareState.confirmed, created_at=now)
            if not pending:
                grant = RoleGrant(user_id=u.id, experiment_id=e.id, role=Role(role),
                                  granted_by_id=actor.user_id, granted_at=now)
                session.add(grant)
                session.flush()
                share.role_grant_id = grant.id
                share.decided_by_id, share.decided_at = actor.user_id, now
            session.add(share)
            session.flush()
            _record(session, actor, "share.pending" if pending else "share.create", target, decision, now,
                    {"user": user, "role": role, "share": share.id})
            return share
    raise _refuse(factory, actor, "share.create", target, decision, now)


def decide_share(factory, actor: Actor, share_id: int, confirm: bool, now: datetime | None = None) -> Share:
    """The PI confirms (grants the role) or refuses a pending cross-institution share."""
    now = now or utcnow()
    with factory.begin() as session:
        share = session.get(Share, share_id)
        if share is None or share.experiment_id is None:
            raise NotFound(f"unknown share {share_id}")
        e = session.get(Experiment, share.experiment_id)
        target = f"experiment:{e.exid}"
        if share.state != ShareState.pending:
            raise OperationError(f"share {share_id} is already {share.state.value}")
        subject = load_subject(session, actor.user_id, now)
        sh = p.Share(experiment_value(session, e), load_subject(session, share.shared_with_id, now),
                     requested_by=share.requested_by_id)
        decision = p.decide(subject, "confirm_share", sh, now)
        if not confirm and subject.user_id == e.pi_id and subject.state == "active":
            # the PI may always say no, even when saying yes would be refused (e.g. a vendor)
            decision = p.Decision(True, "sharing.cross_institution_pi_confirm", "refused by the PI")
        if decision.allowed:
            share.state = ShareState.confirmed if confirm else ShareState.refused
            share.decided_by_id, share.decided_at = actor.user_id, now
            if confirm:
                grant = RoleGrant(user_id=share.shared_with_id, experiment_id=e.id, role=share.role,
                                  granted_by_id=actor.user_id, granted_at=now)
                session.add(grant)
                session.flush()
                share.role_grant_id = grant.id
            _record(session, actor, "share.confirm" if confirm else "share.refuse", target,
                    decision, now, {"share": share_id})
            return share
    raise _refuse(factory, actor, "share.confirm" if confirm else "share.refuse", target, decision, now)


# --------------------------------------------------------------------------------------
# retention: the PI extends, archives, deletes
# --------------------------------------------------------------------------------------
def archive_experiment(factory, actor: Actor, exid: str, policy: p.Policy | None = None,
                       now: datetime | None = None) -> Experiment:
    """Archive: keep at least ``retention_minimum_days`` from now (longer if already set)."""
    now = now or utcnow()
    policy = policy or p.default_policy()
    target = f"experiment:{exid}"
    with factory.begin() as session:
        e = get_experiment(session, exid)
        decision = p.decide(load_subject(session, actor.user_id, now), "archive", experiment_value(session, e), now)
        if decision.allowed:
            if e.archived_at is None:
                e.archived_at = now
            floor = policy.minimum_retain_until(e.archived_at)
            if e.retain_until is None or e.retain_until < floor:
                e.retain_until = floor
            e.status = "archived"
            _record(session, actor, "retention.archive", target, decision, now,
                    {"retain_until": e.retain_until.isoformat()})
            return e
    raise _refuse(factory, actor, "retention.archive", target, decision, now)


def extend_retention(factory, actor: Actor, exid: str, retain_until: datetime,
                     now: datetime | None = None) -> Experiment:
    now = now or utcnow()
    target = f"experiment:{exid}"
    with factory.begin() as session:
        e = get_experiment(session, exid)
        change = p.RetentionChange(experiment_value(session, e), retain_until)
        decision = p.decide(load_subject(session, actor.user_id, now), "extend_retention", change, now)
        if decision.allowed:
            before = e.retain_until
            e.retain_until = retain_until
            _record(session, actor, "retention.extend", target, decision, now,
                    {"from": before.isoformat() if before else None, "to": retain_until.isoformat()})
            return e
    raise _refuse(factory, actor, "retention.extend", target, decision, now)


# --------------------------------------------------------------------------------------
# result sets: derived data, visible outside their department once published
# --------------------------------------------------------------------------------------
def result_set_value(session: Session, rs: ResultSet, ev: p.Experiment | None = None) -> p.ResultSet:
    if ev is None:
        ev = experiment_value(session, session.get(Experiment, rs.experiment_id))
    projects = frozenset(session.scalars(
        select(result_set_projects.c.project_id).where(result_set_projects.c.result_set_id == rs.id)))
    return p.ResultSet(rs.id, ev, rs.department_id, projects, rs.published_at is not None, rs.created_by_id)


def correct_experiment(factory, actor: Actor, exid: str, *, title: str | None = None,
                       facility: str | None = None, now: datetime | None = None) -> None:
    """The PI corrects an experiment's descriptive metadata (kept, so it must be right)."""
    now = now or utcnow()
    target = f"experiment:{exid}"
    changes = {k: v.strip() for k, v in (("title", title), ("facility", facility)) if v is not None}
    if not changes:
        raise OperationError("nothing to correct: give a title or a facility")
    if "title" in changes and not 0 < len(changes["title"]) <= 500:
        raise OperationError("a title has 1 to 500 characters")
    with factory.begin() as session:
        e = get_experiment(session, exid)
        decision = p.decide(load_subject(session, actor.user_id, now), "correct", experiment_value(session, e), now)
        if decision.allowed:
            before = {k: getattr(e, k) for k in changes}
            for k, v in changes.items():
                setattr(e, k, v)
            _record(session, actor, "experiment.correct", target, decision, now, {"before": before, "after": changes})
            return
    raise _refuse(factory, actor, "experiment.correct", target, decision, now)


def create_result_set(factory, actor: Actor, exid: str, name: str, *, kind: str = "analysis",
                      department_id: int | None = None, now: datetime | None = None) -> ResultSet:
    """Upload a result set: it belongs to the experiment's department and inherits its projects."""
    now = now or utcnow()
    name = (name or "").strip()
    if not name or len(name) > 200:
        raise OperationError("a result set needs a name (at most 200 characters)")
    target = f"experiment:{exid}"
    with factory.begin() as session:
        e = get_experiment(session, exid)
        ev = experiment_value(session, e)
        subject = load_subject(session, actor.user_id, now)
        decision = None
        if department_id is not None and department_id != e.department_id:
            # new data belongs to the uploader's department unless they may write to the other
            d = session.get(Department, department_id)
            if d is None:
                raise NotFound(f"unknown department {department_id}")
            owner = p.decide(subject, "assign_owner", p.Department(d.id, d.institution_id, d.virtual), now)
            if not owner.allowed:
                decision = owner
        if decision is None:
            decision = p.decide(subject, "upload_results", p.NewResultSet(ev, department_id), now)
        if decision.allowed:
            rs = ResultSet(experiment_id=e.id, department_id=department_id or e.department_id, name=name,
                           kind=kind, created_by_id=actor.user_id, created_at=now)
            session.add(rs)
            session.flush()
            for pid in ev.project_ids:  # a result set inherits the experiment's projects
                session.execute(result_set_projects.insert().values(project_id=pid, result_set_id=rs.id))
            _record(session, actor, "result_set.create", target, decision, now, {"result_set": rs.id, "name": name})
            return rs
    raise _refuse(factory, actor, "result_set.create", target, decision, now)


def publish_result_set(factory, actor: Actor, result_set_id: int, now: datetime | None = None) -> ResultSet:
    now = now or utcnow()
    with factory.begin() as session:
        rs = session.get(ResultSet, result_set_id)
        if rs is None:
            raise NotFound(f"unknown result set {result_set_id}")
        e = session.get(Experiment, rs.experiment_id)
        target = f"experiment:{e.exid}/result-set:{rs.id}"
        decision = p.decide(load_subject(session, actor.user_id, now), "publish", result_set_value(session, rs), now)
        if decision.allowed:
            rs.published_at = rs.published_at or now
            rs.status = "published"
            _record(session, actor, "result_set.publish", target, decision, now)
            return rs
    raise _refuse(factory, actor, "result_set.publish", target, decision, now)


# --------------------------------------------------------------------------------------
# personal repositories: their owner's alone, shared file by file or folder by folder
# --------------------------------------------------------------------------------------
def share_personal(factory, actor: Actor, path: str, user: str, now: datetime | None = None) -> PersonalShare:
    """Share a file or folder (``path``, a prefix) of the actor's personal repository with
    ``user``. From then on that user sees the owner's name and institution (privacy statement)."""
    now = now or utcnow()
    path = path.strip("/")
    if not path:
        raise OperationError("share a file or a folder, not the whole repository")
    with factory.begin() as session:
        owner = session.get(User, actor.user_id) if actor.user_id is not None else None
        if owner is None:
            raise OperationError("only a user shares their personal repository")
        target = f"personal:{owner.name}/{path}"
        u = get_user(session, user)
        item = p.PersonalItem(owner.id, path, personal_shared_with(session, owner.id, path))
        decision = p.decide(load_subject(session, owner.id, now), "share", item, now)
        if decision.allowed:
            if u.id == owner.id:
                raise OperationError("it is yours already")
            if u.state != UserState.active:
                raise OperationError(f"{user} has no active account")
            share = session.scalar(select(PersonalShare).where(
                PersonalShare.owner_id == owner.id, PersonalShare.path == path,
                PersonalShare.shared_with_id == u.id, PersonalShare.revoked_at.is_(None)))
            if share is None:
                share = PersonalShare(owner_id=owner.id, path=path, shared_with_id=u.id, created_at=now)
                session.add(share)
                session.flush()
            _record(session, actor, "personal.share", target, decision, now, {"user": user, "share": share.id})
            return share
    raise _refuse(factory, actor, "personal.share", target, decision, now)


def revoke_personal_share(factory, actor: Actor, share_id: int, now: datetime | None = None) -> PersonalShare:
    """The owner withdraws a personal share; the history row stays (``revoked_at``)."""
    now = now or utcnow()
    with factory.begin() as session:
        share = session.get(PersonalShare, share_id)
        if share is None or share.owner_id != actor.user_id:  # others' shares: not revealed
            raise NotFound(f"unknown share {share_id}")
        owner = session.get(User, share.owner_id)
        target = f"personal:{owner.name}/{share.path}"
        decision = p.decide(load_subject(session, actor.user_id, now), "share",
                            p.PersonalItem(owner.id, share.path), now)
        if decision.allowed:
            if share.revoked_at is None:
                share.revoked_at = now
            _record(session, actor, "personal.unshare", target, decision, now, {"share": share.id})
            return share
    raise _refuse(factory, actor, "personal.unshare", target, decision, now)
