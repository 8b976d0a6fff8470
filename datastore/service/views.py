"""JSON shapes of the service's answers. What a person may see of others is decided here with
the policy: name and institution, never an e-mail unless its owner allowed it."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from labvault import policies as p
from labvault.datastore import audit
from labvault.datastore.models import (
    AuditEvent,
    Department,
    Environment,
    Experiment,
    Institution,
    RoleGrant,
    Share,
    User,
    experiment_projects,
)

#: Audit actions that are reads; the activity log shows changes, the audit trail everything.
READ_ACTIONS = ("read", "list", "file.read", "file.open", "lease", "request", "read_audit_trail",
                "read_activity_log", "export", "stub")

#: What stays after an account is closed (privacy statement), told to the user who closes it.
KEPT_AFTER_CLOSING = [
    "role history and activity logs of past roles (scientific integrity)",
    "descriptive metadata of experiments, including author names (needed for publication)",
    "audit events (tamper-evident log)",
    "personal data is anonymised one year after closing",
]


def json_default(o):
    if isinstance(o, datetime):
        return o.isoformat()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class NameCache:
    """Users' public identity (name + institution), loaded once per request."""

    def __init__(self, session: Session):
        self.session = session
        self._users: dict[int, dict] = {}
        self._departments: dict[int, Department | None] = {}
        self._institutions: dict[int, Institution | None] = {}

    def department(self, department_id: int | None) -> Department | None:
        """Held for the request: the session's identity map is weak and forgets them otherwise."""
        if department_id is None:
            return None
        if department_id not in self._departments:
            self._departments[department_id] = self.session.get(Department, department_id)
        return self._departments[department_id]

    def institution(self, institution_id: int | None) -> Institution | None:
        if institution_id is None:
            return None
        if institution_id not in self._institutions:
            self._institutions[institution_id] = self.session.get(Institution, institution_id)
        return self._institutions[institution_id]

    def person(self, user_id: int | None) -> dict | None:
        if user_id is None:
            return None
        if user_id not in self._users:
            row = self.session.execute(
                select(User.name, User.display_name, Institution.name)
                .outerjoin(Institution, Institution.id == User.institution_id).where(User.id == user_id)
            ).first()
            self._users[user_id] = (
                {"name": row[0], "display_name": row[1], "institution": row[2]} if row else {"name": f"#{user_id}"}
            )
        return self._users[user_id]


def experiments(es: list[Experiment], names: NameCache) -> list[dict]:
    """Many experiments at once: their projects in one query (a listing of 1,000 is 1 query, not 1,000)."""
    projects: dict[int, list[int]] = {e.id: [] for e in es}
    ids = list(projects)
    EP = experiment_projects.c
    for start in range(0, len(ids), 900):  # bound the IN list (SQLite's parameter limit)
        for exp_id, proj_id in names.session.execute(
                select(EP.experiment_id, EP.project_id).where(EP.experiment_id.in_(ids[start:start + 900]))):
            projects[exp_id].append(proj_id)
    return [experiment(e, names, sorted(projects[e.id])) for e in es]


def experiment(e: Experiment, names: NameCache, projects: list[int] | None = None) -> dict:
    s = names.session
    dept = names.department(e.department_id)
    inst = names.institution(e.institution_id)
    if projects is None:
        projects = sorted(s.scalars(select(experiment_projects.c.project_id)
                                    .where(experiment_projects.c.experiment_id == e.id)))
    return {
        "exid": e.exid, "title": e.title, "pi": names.person(e.pi_id), "institution": inst.name if inst else None,
        "facility": e.facility, "department": dept.name if dept else None, "project_ids": projects,
        "start": e.start_at, "end": e.end_at, "proprietary": e.proprietary, "public": e.public,
        "status": "deleted" if e.deleted_at else e.status, "archived_at": e.archived_at,
        "retain_until": e.retain_until, "deleted_at": e.deleted_at,
    }


def stub(e: Experiment, names: NameCache) -> dict:
    """Existence only: ID, name, owner, class/type, status (stub.existence)."""
    return {"exid": e.exid, "title": e.title, "owner": names.person(e.pi_id), "type": "experiment",
            "status": "deleted" if e.deleted_at else e.status, "stub": True}


def members(s: Session, e: Experiment, policy: p.Policy, subject: p.Subject, now: datetime) -> list[dict]:
    names = NameCache(s)
    out = [{**names.person(e.pi_id), "role": "pi", "granted_at": e.created_at, "expires_at": None}]
    ev_end = policy.facility_access_ends(p.Experiment(id=e.id, end_at=e.end_at))
    grants = s.scalars(select(RoleGrant).where(RoleGrant.experiment_id == e.id, RoleGrant.revoked_at.is_(None))
                       .order_by(RoleGrant.granted_at)).all()
    for g in grants:
        if g.expires_at is not None and g.expires_at <= now:
            continue
        item = {**names.person(g.user_id), "role": g.role.value, "granted_at": g.granted_at,
                "expires_at": g.expires_at}
        if g.role.value == "facility_staff":
            item["access_ends"] = ev_end
            item["active"] = ev_end is None or now < ev_end
        user = s.get(User, g.user_id)
        person = p.Person(user.id, user.institution_id, user.state.value, user.email_visible, shares_context=True)
        if not policy.decide(subject, "view_person", person, now).allowed:
            continue
        if policy.decide(subject, "view_email", person, now).allowed:
            item["email"] = user.email
        out.append(item)
    return out


def share(x: Share, names: NameCache, exid: str) -> dict:
    return {"id": x.id, "exid": exid, "user": names.person(x.shared_with_id),
            "requested_by": names.person(x.requested_by_id), "role": x.role.value,
            "cross_institution": x.cross_institution, "state": x.state.value,
            "decided_by": names.person(x.decided_by_id), "decided_at": x.decided_at, "created_at": x.created_at}


def result_set(rs, value: p.ResultSet, names: NameCache, exid: str) -> dict:
    return {"id": rs.id, "exid": exid, "name": rs.name, "kind": rs.kind, "published": value.published,
            "published_at": rs.published_at, "created_by": names.person(rs.created_by_id),
            "project_ids": sorted(value.project_ids), "created_at": rs.created_at}


def stored_file(r) -> dict:
    return {"path": r.path, "size": r.size, "checksum": r.checksum, "chunk_size": r.chunk_size,
            "replicas": len(r.locations or []), "created_at": r.created_at, "deleted_at": r.deleted_at,
            "deleted_reason": r.deleted_reason}


def retention(e: Experiment, now: datetime) -> dict:
    days_left = (e.retain_until - now).days if e.retain_until else None
    return {"exid": e.exid, "archived_at": e.archived_at, "retain_until": e.retain_until,
            "days_left": days_left, "status": e.status}


def event(e: AuditEvent, full: bool = True, as_actor: bool = False) -> dict:
    """An audit event; ``as_actor``: with the rule and reason its actor was answered (audit.shown_to_actor)."""
    rule, reason = audit.shown_to_actor(e) if as_actor else (e.rule, e.reason)
    out = {"seq": e.seq, "time": e.time, "actor": e.actor, "action": e.action, "target": e.target,
           "allowed": e.allowed, "rule": rule, "reason": reason}
    if full:
        out["ip"] = e.ip
    return out


def environment_value(env: Environment) -> p.Environment:
    return p.Environment(env.id, env.name, frozenset(env.licences), env.proprietary, env.institution_id, env.public)


def environment(env: Environment, decision: p.Decision) -> dict:
    return {"name": env.name, "display_name": env.display_name, "image": env.image, "kernelspec": env.kernelspec,
            "licences": env.licences, "proprietary": env.proprietary, "usable": decision.allowed,
            "rule": decision.rule, "reason": decision.reason}


def me(user: User) -> dict:
    inst = user.institution
    return {"name": user.name, "display_name": user.display_name, "institution": inst.name if inst else None,
            "email": user.email, "email_visible": user.email_visible, "orcid": user.orcid, "state": user.state.value,
            "admin": user.is_admin, "institutional_email": user.institutional_email,
            "institutional_email_verified": user.institutional_email_verified_at is not None,
            "created_at": user.created_at, "last_login_at": user.last_login_at}


def export_personal_data(s: Session, user_id: int) -> dict:
    """Everything labvault holds about one person (right of access), as JSON: see
    :func:`labvault.datastore.rights.export_personal_data` (the admin CLI's export too)."""
    from labvault.datastore.rights import export_personal_data as export_all

    return export_all(s, user_id)
