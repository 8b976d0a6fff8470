"""Data-subject rights (privacy statement): export, correct, request deletion, close.

The datastore service (``/me``, ``/me/export``, ``/me/deletion-request``, ``/me/close``) and the
admin CLI (``labvault user export|correct|request-deletion|close``) both call these functions.
Each decides with the policy (the data subject, or an admin / operator acting for them),
records an audit event in the same transaction as the change, and never writes the personal
data itself into the audit log (which cannot be edited, so could never be erased): only the
names of the fields that changed.
"""

from __future__ import annotations

import re
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from labvault import policies as p
from labvault.policies import Decision

from . import audit
from . import operations as ops
from .access import experiment_value, load_subject
from .lifecycle import account_record, erase_personal_data, is_author, purge_file, revoke_roles
from .models import (
    AuditEvent,
    Comment,
    Department,
    DepartmentMembership,
    Experiment,
    ExternalIdentity,
    LocalCredential,
    Notice,
    PersonalShare,
    Project,
    ResultSet,
    RoleGrant,
    Share,
    StoredFile,
    User,
    UserState,
    utcnow,
)

EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}$")
PHONE_RE = re.compile(r"^\+[1-9]\d{6,14}$")  # E.164
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: What ``correct_account`` accepts, and from whom: the subject corrects their own data; the
#: ``under_18`` flag is set by admins and operators only (a person does not unflag themself).
CORRECTABLE = ("display_name", "email", "orcid", "phone", "email_visible")
UNSET = object()


def orcid_ok(orcid: str) -> bool:
    """An ORCID iD with a valid ISO 7064 11,2 check digit."""
    if not ops.ORCID_RE.match(orcid):
        return False
    total = 0
    for ch in orcid.replace("-", "")[:-1]:
        total = (total + int(ch)) * 2
    check = (12 - total % 11) % 11
    return orcid[-1] == ("X" if check == 10 else str(check))


def _decide(session: Session, actor: ops.Actor, action: str, resource: object, now: datetime) -> Decision:
    if actor.user_id is None:
        return ops.OPERATOR
    return p.decide(load_subject(session, actor.user_id, now), action, resource, now)


# --------------------------------------------------------------------------------------
# right of access: everything labvault holds about one person
# --------------------------------------------------------------------------------------
def _t(value):
    return value.isoformat() if isinstance(value, datetime) else value


def export_personal_data(session: Session, user_id: int) -> dict:
    """Everything labvault holds about a person, as JSON-ready values (right of access).

    Secrets are described, never exported (a password hash or TOTP secret is nobody's to read).
    """
    u = session.get(User, user_id)
    if u is None:
        raise ops.NotFound(f"no user with id {user_id}")
    inst = u.institution
    exids = dict(session.execute(select(Experiment.id, Experiment.exid)).all())
    projects = dict(session.execute(select(Project.id, Project.name)).all())
    departments = dict(session.execute(select(Department.id, Department.name)).all())
    names = dict(session.execute(select(User.id, User.name)).all())
    profile = {
        "name": u.name, "display_name": u.display_name, "institution": inst.name if inst else None,
        "department": departments.get(u.department_id), "email": u.email, "email_visible": u.email_visible,
        "institutional_email": u.institutional_email,
        "institutional_email_verified": u.institutional_email_verified_at is not None,
        "institutional_email_verified_at": _t(u.institutional_email_verified_at),
        "orcid": u.orcid, "phone": u.phone, "state": u.state.value, "admin": u.is_admin,
        "under_18": u.under_18, "last_login_ip": u.last_login_ip, "last_login_at": _t(u.last_login_at),
        "created_at": _t(u.created_at), "confirmed_at": _t(u.confirmed_at),
        "deactivated_at": _t(u.deactivated_at), "closed_at": _t(u.closed_at), "anonymised_at": _t(u.anonymised_at),
    }
    cred = session.get(LocalCredential, u.id)
    sign_in = {
        "local_account": cred is not None,
        "password": "set (stored only as an Argon2id hash, not exported)" if cred else None,
        "totp_enrolled": bool(cred and cred.totp_confirmed_at),
        "failed_attempts": cred.failed_attempts if cred else None,
        "locked_until": _t(cred.locked_until) if cred else None,
        "adult_confirmed_at": _t(cred.adult_confirmed_at) if cred else None,
        "identity_providers": [
            {"idp": x.idp, "subject": x.subject, "claims": x.claims, "created_at": _t(x.created_at),
             "last_seen_at": _t(x.last_seen_at)}
            for x in session.scalars(select(ExternalIdentity).where(ExternalIdentity.user_id == u.id))],
    }
    grants = session.scalars(select(RoleGrant).where(RoleGrant.user_id == u.id).order_by(RoleGrant.granted_at)).all()
    roles = [{"experiment": exids.get(g.experiment_id), "project": projects.get(g.project_id),
              "department": departments.get(g.department_id), "project_id": g.project_id, "role": g.role.value,
              "granted_by": names.get(g.granted_by_id), "granted_at": _t(g.granted_at),
              "expires_at": _t(g.expires_at), "revoked_at": _t(g.revoked_at)} for g in grants]
    memberships = [{"department": departments.get(m.department_id), "can_modify": m.can_modify,
                    "granted_at": _t(m.granted_at), "revoked_at": _t(m.revoked_at)}
                   for m in session.scalars(select(DepartmentMembership).where(DepartmentMembership.user_id == u.id))]
    shares = [{"experiment": exids.get(x.experiment_id), "project": projects.get(x.project_id),
               "shared_with": names.get(x.shared_with_id), "requested_by": names.get(x.requested_by_id),
               "role": x.role.value, "state": x.state.value, "created_at": _t(x.created_at),
               "decided_at": _t(x.decided_at)}
              for x in session.scalars(select(Share).where(or_(Share.shared_with_id == u.id,
                                                               Share.requested_by_id == u.id)).order_by(Share.id))]
    files = [{"path": f.path, "size": f.size, "sha256": f.checksum, "created_at": _t(f.created_at),
              "deleted_at": _t(f.deleted_at), "deleted_reason": f.deleted_reason}
             for f in session.scalars(select(StoredFile).where(StoredFile.owner_id == u.id).order_by(StoredFile.path))]
    personal_shares = [{"owner": names.get(x.owner_id), "path": x.path, "shared_with": names.get(x.shared_with_id),
                        "created_at": _t(x.created_at), "revoked_at": _t(x.revoked_at)}
                       for x in session.scalars(select(PersonalShare).where(
                           or_(PersonalShare.owner_id == u.id, PersonalShare.shared_with_id == u.id)))]
    comments = [{"experiment": exids.get(c.experiment_id), "result_set_id": c.result_set_id, "result_id": c.result_id,
                 "body": c.body, "created_at": _t(c.created_at)}
                for c in session.scalars(select(Comment).where(Comment.author_id == u.id).order_by(Comment.id))]
    result_sets = [{"experiment": exids.get(r.experiment_id), "name": r.name, "created_at": _t(r.created_at)}
                   for r in session.scalars(select(ResultSet).where(ResultSet.created_by_id == u.id))]
    notices = [{"kind": n.kind, "rule": n.rule, "subject": n.subject, "body": n.body,
                "created_at": _t(n.created_at), "sent_at": _t(n.sent_at)}
               for n in session.scalars(select(Notice).where(Notice.user_id == u.id).order_by(Notice.id))]
    activity = []
    for e in session.scalars(select(AuditEvent).where(AuditEvent.actor == u.name).order_by(AuditEvent.seq)):
        rule, reason = audit.shown_to_actor(e)  # as they were answered (a hidden experiment stays hidden)
        activity.append({"seq": e.seq, "time": _t(e.time), "actor": e.actor, "action": e.action,
                         "target": e.target, "allowed": e.allowed, "rule": rule, "reason": reason, "ip": e.ip})
    return {
        "profile": profile,
        "sign_in": sign_in,
        "roles": roles,
        "department_memberships": memberships,
        "experiments_as_pi": list(session.scalars(select(Experiment.exid).where(Experiment.pi_id == u.id)
                                                  .order_by(Experiment.exid))),
        "projects_as_pi": list(session.scalars(select(Project.name).where(Project.pi_id == u.id).order_by(Project.name))),
        "shares": shares,
        "personal_files": files,
        "personal_shares": personal_shares,
        "result_sets": result_sets,
        "comments": comments,
        "notices": notices,
        "activity": activity,
    }


def export(factory, actor: ops.Actor, name: str, now: datetime | None = None) -> dict:
    """Decide and audit an export of ``name``'s data (the subject, an admin, or an operator)."""
    now = now or utcnow()
    target = f"user:{name}"
    with factory() as s:
        user = ops.get_user(s, name)
        decision = _decide(s, actor, "export", p.Account(user.id), now)
        if decision.allowed:
            data = export_personal_data(s, user.id)
    if not decision.allowed:
        raise ops._refuse(factory, actor, "account.export", target, decision, now)
    with factory.begin() as s:
        ops._record(s, actor, "account.export", target, decision, now)
    return data


# --------------------------------------------------------------------------------------
# right to correct
# --------------------------------------------------------------------------------------
def _clean_fields(changes: dict) -> dict:
    """Validate corrections; raise OperationError with one line for a person."""
    out = {}
    for key, value in changes.items():
        if key == "display_name":
            if not isinstance(value, str) or not value.strip() or len(value.strip()) > 200 or _CONTROL.search(value):
                raise ops.OperationError("display_name: your first and last name, 1 to 200 characters")
            out[key] = " ".join(value.split())
        elif key == "email":
            if not isinstance(value, str) or not EMAIL_RE.match(value.strip()) or len(value.strip()) > 255:
                raise ops.OperationError(f"email: not an e-mail address: {str(value)[:80]!r}")
            local, _, domain = value.strip().rpartition("@")
            out[key] = f"{local}@{domain.lower()}"
        elif key == "orcid":
            if value is None or value == "":
                out[key] = None
            elif not isinstance(value, str) or not orcid_ok(value.strip().upper()):
                raise ops.OperationError(f"orcid: not a valid ORCID iD (0000-0000-0000-000X with its check digit): "
                                         f"{str(value)[:40]!r}")
            else:
                out[key] = value.strip().upper()
        elif key == "phone":
            if value is None or value == "":
                out[key] = None
                continue
            compact = re.sub(r"[\s().-]", "", value) if isinstance(value, str) else ""
            if not PHONE_RE.match(compact):
                raise ops.OperationError("phone: an international number like +41 44 123 45 67")
            out[key] = compact
        elif key == "email_visible":
            if not isinstance(value, bool):
                raise ops.OperationError("email_visible: true or false")
            out[key] = value
        elif key == "under_18":
            if not isinstance(value, bool):
                raise ops.OperationError("under_18: true or false")
            out[key] = value
        else:
            raise ops.OperationError(
                f"{key!r} cannot be corrected here (correctable: {', '.join(CORRECTABLE)}; the institutional "
                "e-mail proves membership and is changed by re-verifying it, the institution by an admin)")
    return out


def correct_account(factory, actor: ops.Actor, name: str, changes: dict, now: datetime | None = None) -> User:
    """Correct ``name``'s personal data (right to rectification). Returns the updated user.

    The personal e-mail takes effect at once, without re-confirmation: in labvault it carries
    notices only -- signing in is by password (+ TOTP) or an identity provider, and membership of
    an institution is proven by the institutional e-mail (not correctable here) or the IdP.
    """
    now = now or utcnow()
    if not changes:
        raise ops.OperationError("nothing to correct: give one of " + ", ".join(CORRECTABLE))
    clean = _clean_fields(changes)
    if "under_18" in clean and actor.user_id is not None:
        with factory() as s:
            if not load_subject(s, actor.user_id, now).is_admin:
                raise ops.OperationError("under_18 is set by an administrator")
    target = f"user:{name}"
    with factory.begin() as s:
        user = ops.get_user(s, name)
        decision = _decide(s, actor, "correct", p.Account(user.id), now)
        if decision.allowed:
            if user.anonymised_at is not None:
                raise ops.OperationError(f"{name}'s personal data was removed on {user.anonymised_at:%Y-%m-%d}")
            changed = sorted(k for k, v in clean.items() if getattr(user, k) != v)
            for k in changed:
                setattr(user, k, clean[k])
            # the values stay out of the audit log: it cannot be edited, so could not be erased
            ops._record(s, actor, "account.correct", target, decision, now, {"fields": changed})
            s.flush()
            s.expunge(user)
            return user
    raise ops._refuse(factory, actor, "account.correct", target, decision, now)


# --------------------------------------------------------------------------------------
# right to deletion (with the documented exemptions) and closing
# --------------------------------------------------------------------------------------
def _exemptions(session: Session, subject: p.Subject, user: User, now: datetime) -> list[dict]:
    """What stays after a deletion, each with the policy's reason (asked, not assumed)."""
    kept = []
    d = p.decide(subject, "delete_role_history", p.Account(user.id), now)
    kept.append({"what": f"role history and activity logs of past roles, under the account name {user.name!r}",
                 "rule": d.rule, "reason": d.reason})
    kept.append({"what": "audit events (the tamper-evident log of decisions and changes)",
                 "rule": d.rule, "reason": d.reason})
    for e in session.scalars(select(Experiment).where(Experiment.pi_id == user.id).order_by(Experiment.exid)):
        d = p.decide(subject, "erase_metadata", experiment_value(session, e), now)
        kept.append({"what": f"descriptive metadata of {e.exid}, including your name as its PI",
                     "rule": d.rule, "reason": d.reason})
    return kept


def request_deletion(factory, actor: ops.Actor, name: str, now: datetime | None = None,
                     store=None) -> dict:
    """Delete ``name``'s personal data now (right to deletion) and close the account.

    Without the personal data the account cannot be used, so it is closed (active roles end).
    Exempt, and kept: role history and audit events (privacy.role_history_kept), descriptive
    metadata of experiments including the PI's name (privacy.metadata_exempt). Personal files
    are crypto-shredded; their chunks are removed here if ``store`` is given, else by the next
    lifecycle run (or scrub).
    """
    now = now or utcnow()
    target = f"user:{name}"
    with factory.begin() as s:
        user = ops.get_user(s, name)
        record = account_record(s, user, now)
        decision = _decide(s, actor, "erase_personal_data", record, now)
        if decision.allowed:
            if user.anonymised_at is not None:
                raise ops.OperationError(f"{name}'s personal data was already removed on {user.anonymised_at:%Y-%m-%d}")
            subject = load_subject(s, user.id, now)
            kept = _exemptions(s, subject, user, now)
            was = user.state.value
            if user.state != UserState.closed:
                user.state, user.closed_at = UserState.closed, now
            roles = revoke_roles(s, user.id, now)
            keep_name = is_author(s, user.id)
            summary = erase_personal_data(s, user, now, keep_name=keep_name,
                                          reason=f"deleted at its owner's request ({decision.rule})")
            details = {**summary, "closed_from": was, "roles_ended": roles,
                       "kept": [k["rule"] for k in kept]}
            ops._record(s, actor, "account.erase", target, decision, now, details)
            file_ids = list(s.scalars(select(StoredFile.id).where(
                StoredFile.owner_id == user.id, StoredFile.deleted_at.is_not(None), StoredFile.purged_at.is_(None))))
            result = {"state": "closed", "erased": summary["erased"], "personal_files_deleted": summary["personal_files"],
                      "roles_ended": len(roles), "kept": kept}
    if not decision.allowed:
        raise ops._refuse(factory, actor, "account.erase", target, decision, now)
    if store is not None:
        for fid in file_ids:
            try:
                purge_file(factory, store, fid, now)
            except OSError:  # a location is down: the next lifecycle run (or scrub) finishes it
                pass
    return result


def close_account(factory, actor: ops.Actor, name: str, now: datetime | None = None) -> None:
    """Close an account: active roles end at once; personal data is anonymised a year later."""
    now = now or utcnow()
    with factory() as s:
        user = ops.get_user(s, name)
        decision = _decide(s, actor, "close", p.Account(user.id), now)
        state = user.state
    if not decision.allowed:
        raise ops._refuse(factory, actor, "account.close", f"user:{name}", decision, now)
    if state == UserState.closed:
        raise ops.OperationError(f"{name}'s account is closed already")
    ops.set_user_state(factory, actor, name, "closed", now=now)


__all__ = ["export", "export_personal_data", "correct_account", "request_deletion", "close_account",
           "orcid_ok", "CORRECTABLE"]
