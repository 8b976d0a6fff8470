"""REST handlers of the datastore service (``/services/labvault/api/v1/…``).

Every request: who (Hub token → labvault user) → policy → audit → answer. Errors are JSON
``{"error", "rule", "reason"}`` with the right status, never a traceback.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

from jupyterhub.services.auth import HubAuthenticated, UserNotAllowed
from sqlalchemy import or_, select
from tornado import web

from labvault import policies as p
from labvault.datastore import audit
from labvault.datastore import operations as ops
from labvault.datastore.access import experiment_value, list_visible, load_subject
from labvault.datastore.models import (
    AuditEvent,
    Department,
    Environment,
    Experiment,
    Institution,
    ResultSet,
    Role,
    Share,
    ShareState,
    StoredFile,
    User,
    UserState,
)
from labvault.datastore.store.errors import StoreError

from . import views

API = "/api/v1"


class APIError(web.HTTPError):
    """An HTTP error with the policy's rule and reason."""

    def __init__(self, status: int, error: str, rule: str = "", reason: str = ""):
        super().__init__(status, error)
        self.error, self.rule, self.reason = error, rule, reason or error


def denied(decision: p.Decision, status: int = 403) -> APIError:
    return APIError(status, "forbidden" if status == 403 else "not found", decision.rule, decision.reason)


def database_unavailable(exc: BaseException | None) -> bool:
    """The database cannot be reached or is restarting (not a bug of ours, not bad input)."""
    from sqlalchemy import exc as sa

    if isinstance(exc, (sa.DisconnectionError, sa.TimeoutError)):
        return True
    return isinstance(exc, (sa.OperationalError, sa.InterfaceError)) or (
        isinstance(exc, sa.DBAPIError) and exc.connection_invalidated)


_ROW_ID = re.compile(r"[0-9]{1,18}")  # ASCII digits that fit a 64-bit database integer


def row_id(value: str, what: str) -> int:
    """A numeric id from the path. Anything else -- letters, Unicode digits such as '²', a number
    too large for the database -- names nothing that exists: 404."""
    if not _ROW_ID.fullmatch(value):
        raise APIError(404, "not found", "", f"no {what} {value[:40]!r}")
    return int(value)


class JSONHandler(web.RequestHandler):
    """Speaks JSON: bodies in, answers and ``{"error", "rule", "reason"}`` errors out."""

    lv_user_name = "-"
    _decisions: set | None = None

    def record_decisions(self) -> None:
        """With ``DatastoreService.expose_decisions`` (tests only), name every rule decided while
        answering in the ``X-Labvault-Decisions`` header (``rule:1`` allowed, ``rule:0`` refused)."""
        if self.service.expose_decisions:
            from labvault.policies.engine import _RECORDER

            self._decisions = set()
            _RECORDER.set(self._decisions)

    def flush(self, *args, **kwargs):
        if self._decisions and not self._headers_written:
            self.set_header("X-Labvault-Decisions",
                            ",".join(f"{rule}:{int(allowed)}" for rule, allowed in sorted(self._decisions)))
        return super().flush(*args, **kwargs)

    @property
    def service(self):
        return self.settings["labvault"]

    @property
    def sessions(self):
        return self.service.sessions

    def set_default_headers(self):
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    def log_exception(self, typ, value, tb):
        """Tornado logs errors with the client's full IP; we log the path and user only."""
        if isinstance(value, web.HTTPError):
            self.service.log.info("%d %s %s: %s", value.status_code, self.request.method,
                                  self.request.path, getattr(value, "reason", "") or value.log_message)
        elif database_unavailable(value):  # one line per request while the database is away
            self.service.log.warning("database unavailable in %s %s: %s", self.request.method, self.request.path,
                                     str(value).splitlines()[0][:300])
        else:
            self.service.log.error("uncaught error in %s %s", self.request.method, self.request.path,
                                   exc_info=(typ, value, tb))

    def json_body(self) -> dict:
        if not self.request.body:
            return {}
        try:
            body = json.loads(self.request.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, "bad request", "", f"malformed JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "bad request", "", "expected a JSON object")
        return body

    def field(self, body: dict, name: str, kind: type = str, required: bool = True) -> Any:
        value = body.get(name)
        if value is None:
            if required:
                raise APIError(400, "bad request", "", f"missing field {name!r}")
            return None
        if kind is datetime:
            if not isinstance(value, str):
                raise APIError(400, "bad request", "", f"{name!r} must be an ISO date string")
            try:
                t = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise APIError(400, "bad request", "", f"{name!r} is not an ISO date: {value!r}") from None
            return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise APIError(400, "bad request", "", f"{name!r} must be a {kind.__name__}")
        return value

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data, default=views.json_default))

    def write_error(self, status_code: int, **kwargs):
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, APIError):
            body = {"error": exc.error, "rule": exc.rule, "reason": exc.reason}
        elif isinstance(exc, web.HTTPError):
            body = {"error": exc.log_message or self._reason, "rule": "", "reason": exc.log_message or self._reason}
        elif database_unavailable(exc):  # e.g. PostgreSQL restarting: the pool reconnects by itself
            self.set_status(503)
            self.set_header("Retry-After", "5")
            body = {"error": "database unavailable", "rule": "",
                    "reason": "the service cannot reach its database right now; try again in a moment"}
        else:  # a bug: say so, show nothing of it
            body = {"error": "internal error", "rule": "", "reason": "the service failed; the error was logged"}
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(body))


class BaseAPIHandler(HubAuthenticated, JSONHandler):
    """Authenticates with the Hub token, maps to a labvault user, rate-limits, speaks JSON."""

    lv_user: User | None = None
    _subject: p.Subject | None = None

    def get_current_user(self):  # tornado's sync hook: prepare() has resolved it already
        return getattr(self, "_lv_model", None)

    async def prepare(self):
        self.record_decisions()
        try:
            model = await self.hub_auth.get_user(self, sync=False)
        except Exception:
            self.log_exception_quietly()
            raise APIError(503, "authentication unavailable", "default.deny",
                           "the Hub could not be asked who you are; try again") from None
        if not model:
            raise APIError(401, "authentication required", "account.state",
                           "send a valid JupyterHub token (Authorization: token …)")
        try:
            model = self.check_hub_user(model)
        except UserNotAllowed:
            raise APIError(403, "forbidden", "default.deny",
                           f"this token has no access to the labvault service (needs {sorted(self.hub_scopes or [])})") from None
        if model.get("kind", "user") != "user":
            raise APIError(403, "forbidden", "default.deny", "only users have labvault accounts")
        self._lv_model = model
        self.now = self.service.now()
        with self.sessions() as s:
            user = s.scalar(select(User).where(User.name == model["name"]))
            if user is not None:
                s.expunge(user)
        if user is None:
            raise APIError(403, "forbidden", "account.state", f"{model['name']} has no labvault account")
        self.lv_user, self.lv_user_name = user, user.name
        # every request is decided against the user's rate (abuse.rate_limit); refusals audited
        rate = p.RequestRate(not self.service.limiter.allow(user.name), self.service.rate_limit_per_second)
        decision = self.service.policy.decide(p.ANONYMOUS, "request", rate, self.now)
        if not decision.allowed:
            self.audit("request", f"path:{self.request.path[:200]}", decision)
            self.set_header("Retry-After", "1")
            raise denied(decision, 429)

    def log_exception_quietly(self):
        self.service.log.exception("hub authentication failed")

    # helpers --------------------------------------------------------------------------
    @property
    def actor(self) -> ops.Actor:
        return ops.Actor(user_id=self.lv_user.id, ip=self.request.remote_ip)

    def subject(self, session) -> p.Subject:
        """Who asks, as the policy sees them: loaded once per request (and decided anew for
        every request, so access that ends, ends at the next one)."""
        if self._subject is None:
            self._subject = load_subject(session, self.lv_user.id, self.now)
        return self._subject

    def audit(self, action: str, target: str, decision: p.Decision, details: dict | None = None) -> None:
        with self.sessions.begin() as s:
            audit.append(s, actor=self.lv_user_name, action=action, target=target, decision=decision,
                         ip=self.request.remote_ip, details=details, now=self.now,
                         ipv4_masked_bytes=self.service.policy.ipv4_masked_bytes,
                         ipv6_prefix_bits=self.service.policy.ipv6_prefix_bits)

    def allowed_by(self, decision: p.Decision) -> p.Decision:
        """Name the rule that allowed this request in the answer (``X-Labvault-Rule``)."""
        self.set_header("X-Labvault-Rule", decision.rule)
        return decision

    def decide(self, session, action: str, resource: object, target: str, *, audit_allowed: bool = True,
               status: int = 403) -> p.Decision:
        """Decide; audit (refusals always, allowances unless told not to); raise on refusal."""
        decision = self.service.policy.decide(self.subject(session), action, resource, self.now)
        self.allowed_by(decision)
        if not decision.allowed:
            self.audit(action, target, decision)
            raise denied(decision, status)
        if audit_allowed:
            self.audit(action, target, decision)
        return decision

    def experiment(self, session, exid: str, action: str = "read", target: str | None = None) -> Experiment:
        e = session.scalar(select(Experiment).where(Experiment.exid == exid))
        if e is None:  # a refusal like any other, audited (also: a hidden experiment's twin in one's own log)
            decision = p.Decision(False, "default.deny", f"no experiment {exid!r}")
            self.audit(action, target or f"experiment:{exid}", decision)
            raise APIError(404, "not found", decision.rule, decision.reason)
        return e

    def read_experiment(self, session, exid: str, action: str = "read") -> tuple[Experiment, p.Experiment]:
        """Load and decide read access. A proprietary experiment one cannot open is a 404:
        its existence is not revealed (no stubs for proprietary data)."""
        e = self.experiment(session, exid)
        ev = experiment_value(session, e)
        decision = self.allowed_by(self.service.policy.decide(self.subject(session), action, ev, self.now))
        if not decision.allowed:
            error = self.refused(e, decision)
            self.audit(action, f"experiment:{exid}", decision, audit.answered_as(decision, error.rule, error.reason))
            raise error
        return e, ev

    def refused(self, e: Experiment, decision: p.Decision) -> APIError:
        """The answer to a refused read of an experiment: 403 naming the rule; for a proprietary
        one 404, and exactly the unknown exID's answer, so that guessing exIDs tells nobody which
        exist (the audit event keeps the real rule; one's own access log shows the answer, see
        audit.answered_as). Only facility staff whose window closed are told why: they knew the
        experiment."""
        if not e.proprietary:
            return denied(decision, 403)
        if decision.rule == "facility.access_window":
            return denied(decision, 404)
        return APIError(404, "not found", "default.deny", f"no experiment {e.exid!r}")

    def guard(self, exid: str) -> None:
        """Before changing an experiment: one who cannot read it learns nothing more (404 for
        proprietary ones) than one who asks to read it."""
        with self.sessions() as s:
            self.read_experiment(s, exid)

    def run_op(self, fn, *args, **kwargs):
        """Call a datastore operation; map its errors to HTTP."""
        return self._mapped(fn, self.sessions, self.actor, *args, now=self.now, **kwargs)

    def store_op(self, fn, *args, **kwargs):
        """Call a chunk-store operation (``fn(actor, …)``); map its errors to HTTP. A path that
        holds a file already is a 409; a storage failure (e.g. a full disk) a 503, nothing stored."""
        return self._mapped(fn, self.actor, *args, now=self.now, conflict=True, **kwargs)

    @staticmethod
    def _mapped(fn, *args, conflict: bool = False, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ops.Denied as e:
            raise denied(e.decision) from None
        except ops.NotFound as e:
            raise APIError(404, "not found", "", str(e)) from None
        except ops.OperationError as e:
            status = 409 if conflict and "already" in str(e) else 400
            raise APIError(status, "bad request", "", str(e)) from None
        except StoreError as e:
            raise APIError(503, "storage error", "", str(e)) from None


# --------------------------------------------------------------------------------------
# me
# --------------------------------------------------------------------------------------
class MeHandler(BaseAPIHandler):
    def get(self):
        with self.sessions() as s:
            user = s.get(User, self.lv_user.id)
            self.write_json(views.me(user))

    def patch(self):  # right to rectification
        from .privacy import correct_me

        correct_me(self)


class MeExportHandler(BaseAPIHandler):
    def get(self):
        with self.sessions() as s:
            self.decide(s, "export", p.Account(self.lv_user.id), f"user:{self.lv_user_name}")
            self.write_json(views.export_personal_data(s, self.lv_user.id))


class MeAccessLogHandler(BaseAPIHandler):
    def get(self):
        with self.sessions() as s:
            self.decide(s, "read_audit_trail", p.Account(self.lv_user.id), f"user:{self.lv_user_name}",
                        audit_allowed=False)
            events = s.scalars(select(AuditEvent).where(AuditEvent.actor == self.lv_user_name)
                               .order_by(AuditEvent.seq.desc()).limit(self._limit())).all()
            self.write_json({"events": [views.event(e, as_actor=True) for e in events]})

    def _limit(self) -> int:
        try:
            return max(1, min(1000, int(self.get_argument("limit", "100"))))
        except ValueError:
            raise APIError(400, "bad request", "", "limit must be a number") from None


class UserAccessLogHandler(MeAccessLogHandler):
    """Someone's access log: shown to its subject and to admins (privacy.own_access_log)."""

    def get(self, name):
        with self.sessions() as s:
            user = s.scalar(select(User).where(User.name == name))
            if user is None:
                raise APIError(404, "not found", "", f"no user {name!r}")
            self.decide(s, "read_audit_trail", p.Account(user.id), f"user:{name}", audit_allowed=True)
            events = s.scalars(select(AuditEvent).where(AuditEvent.actor == name)
                               .order_by(AuditEvent.seq.desc()).limit(self._limit())).all()
            mine = user.id == self.lv_user.id  # admins see the rules as decided
            self.write_json({"events": [views.event(e, as_actor=mine) for e in events]})


class MeCloseHandler(BaseAPIHandler):
    def post(self):
        body = self.json_body()
        if body.get("confirm") != self.lv_user_name:
            raise APIError(400, "bad request", "", "type your user name as 'confirm' to close your account")
        with self.sessions() as s:
            self.decide(s, "close", p.Account(self.lv_user.id), f"user:{self.lv_user_name}", audit_allowed=False)
        ops.set_user_state(self.sessions, self.actor, self.lv_user_name, "closed", now=self.now)
        self.write_json({"state": "closed", "kept": views.KEPT_AFTER_CLOSING})


# --------------------------------------------------------------------------------------
# people
# --------------------------------------------------------------------------------------
class UsersHandler(BaseAPIHandler):
    """Find people to share with: name and institution only (privacy.identity)."""

    def get(self):
        q = self.get_argument("q", "").strip()
        if len(q) < 2:
            raise APIError(400, "bad request", "", "search needs at least 2 characters")
        like = f"%{q.lower()}%"
        with self.sessions() as s:
            subject = self.subject(s)
            rows = s.execute(
                select(User, Institution.name).outerjoin(Institution, Institution.id == User.institution_id)
                .where(User.state == UserState.active,
                       or_(User.name.ilike(like), User.display_name.ilike(like)))
                .order_by(User.name).limit(50)
            ).all()
            out = []
            for user, inst in rows:
                person = p.Person(user.id, user.institution_id, user.state.value, user.email_visible)
                if self.service.policy.decide(subject, "view_person", person, self.now).allowed:
                    item = {"name": user.name, "display_name": user.display_name, "institution": inst}
                    if self.service.policy.decide(subject, "view_email", person, self.now).allowed:
                        item["email"] = user.email
                    out.append(item)
        self.write_json({"users": out})


# --------------------------------------------------------------------------------------
# experiments
# --------------------------------------------------------------------------------------
class ExperimentsHandler(BaseAPIHandler):
    def get(self):
        q = self.get_argument("q", "").strip()
        with self.sessions() as s:
            visible = list_visible(s, self.lv_user.id, self.now, self.service.policy)
            names = views.NameCache(s)
            items = views.experiments(visible, names)
            stubs = []
            if q:
                subject = self.subject(s)
                items = [i for i in items if q.lower() in (i["exid"] + " " + i["title"]).lower()]
                seen = {e.id for e in visible}
                like = f"%{q}%"
                for e in s.scalars(select(Experiment).where(
                        or_(Experiment.exid.ilike(like), Experiment.title.ilike(like))).limit(200)):
                    if e.id in seen:
                        continue
                    d = self.service.policy.decide(subject, "stub", experiment_value(s, e), self.now)
                    if d.allowed:
                        stubs.append(views.stub(e, names))
        self.write_json({"experiments": items, "stubs": stubs})

    def post(self):
        body = self.json_body()
        exid = self.field(body, "exid")
        self.run_op(
            ops.add_experiment, exid, pi=self.field(body, "pi"), title=body.get("title") or "",
            facility=body.get("facility") or "", start_at=self.field(body, "start", datetime, False),
            end_at=self.field(body, "end", datetime, False), proprietary=bool(body.get("proprietary", True)),
            department=body.get("department"), projects=body.get("projects") or [],
        )
        with self.sessions() as s:
            self.write_json(views.experiment(self.experiment(s, exid), views.NameCache(s)), 201)


class ExperimentHandler(BaseAPIHandler):
    def get(self, exid):
        with self.sessions() as s:
            e, ev = self.read_experiment(s, exid)
            subject = self.subject(s)
            data = views.experiment(e, views.NameCache(s))
            d = self.service.policy.decide(subject, "read", ev, self.now)
            data["access"] = {"rule": d.rule, "reason": d.reason,
                              "facility_access_ends": self.service.policy.facility_access_ends(ev)}
            self.write_json(data)

    def patch(self, exid):
        """Correct descriptive metadata (the PI: privacy.metadata_exempt)."""
        body = self.json_body()
        unknown = set(body) - {"title", "facility"}
        if unknown:
            raise APIError(400, "bad request", "", f"only title and facility can be corrected, not {sorted(unknown)}")
        fields = {k: self.field(body, k) for k in body}
        self.guard(exid)
        self.run_op(ops.correct_experiment, exid, **fields)
        with self.sessions() as s:
            self.write_json(views.experiment(self.experiment(s, exid), views.NameCache(s)))


class RolesHandler(BaseAPIHandler):
    def get(self, exid):
        with self.sessions() as s:
            e, _ = self.read_experiment(s, exid)
            self.write_json({"members": views.members(s, e, self.service.policy, self.subject(s), self.now)})

    def post(self, exid):
        body = self.json_body()
        expires = self.field(body, "expires_at", datetime, False)
        self.guard(exid)
        self.run_op(ops.grant_role, exid, self.field(body, "user"), self.field(body, "role"), expires_at=expires)
        self.get(exid)


class RoleHandler(BaseAPIHandler):
    def delete(self, exid, user):
        role = self.get_argument("role", None)
        self.guard(exid)
        if role and role not in Role.__members__:
            raise APIError(400, "bad request", "", f"unknown role {role[:40]!r}: one of {', '.join(Role.__members__)}")
        n = self.run_op(ops.revoke_role, exid, user, role)
        self.write_json({"revoked": n})


class SharesHandler(BaseAPIHandler):
    def get(self, exid):
        with self.sessions() as s:
            e, _ = self.read_experiment(s, exid)
            q = select(Share).where(Share.experiment_id == e.id)
            if e.pi_id != self.lv_user.id:
                q = q.where(or_(Share.requested_by_id == self.lv_user.id, Share.shared_with_id == self.lv_user.id))
            names = views.NameCache(s)
            self.write_json({"shares": [views.share(x, names, e.exid) for x in s.scalars(q.order_by(Share.id))]})

    def post(self, exid):
        body = self.json_body()
        self.guard(exid)
        share = self.run_op(ops.share_experiment, exid, self.field(body, "user"), role=body.get("role") or "viewer")
        with self.sessions() as s:
            self.write_json(views.share(s.get(Share, share.id), views.NameCache(s), exid), 201)


class ShareConfirmHandler(BaseAPIHandler):
    confirm = True

    def post(self, share_id):
        share = self.run_op(ops.decide_share, row_id(share_id, "share"), self.confirm)
        with self.sessions() as s:
            e = s.get(Experiment, share.experiment_id)
            self.write_json(views.share(s.get(Share, share.id), views.NameCache(s), e.exid))


class ShareRefuseHandler(ShareConfirmHandler):
    confirm = False


class PendingSharesHandler(BaseAPIHandler):
    """Shares waiting for this user's confirmation (as PI)."""

    def get(self):
        with self.sessions() as s:
            rows = s.execute(select(Share, Experiment.exid).join(Experiment, Experiment.id == Share.experiment_id)
                             .where(Experiment.pi_id == self.lv_user.id, Share.state == ShareState.pending)
                             .order_by(Share.id)).all()
            names = views.NameCache(s)
            self.write_json({"shares": [views.share(x, names, exid) for x, exid in rows]})


class RetentionHandler(BaseAPIHandler):
    def post(self, exid):
        body = self.json_body()
        until = self.field(body, "retain_until", datetime)
        self.guard(exid)
        self.run_op(ops.extend_retention, exid, until)
        self._reply(exid)

    def _reply(self, exid):
        with self.sessions() as s:
            e = self.experiment(s, exid)
            self.write_json(views.retention(e, self.now))


class ArchiveHandler(RetentionHandler):
    def post(self, exid):
        self.guard(exid)
        self.run_op(ops.archive_experiment, exid, self.service.policy)
        self._reply(exid)


class PublishHandler(BaseAPIHandler):
    def post(self, exid):
        self.guard(exid)
        self.run_op(ops.publish_experiment, exid)
        self.write_json({"exid": exid, "public": True})


class ActivityHandler(BaseAPIHandler):
    """The experiment's activity log (participants) or its full audit trail (PI, admins)."""

    full = False

    def get(self, exid):
        with self.sessions() as s:
            e, ev = self.read_experiment(s, exid)
            action = "read_audit_trail" if self.full else "read_activity_log"
            self.decide(s, action, ev, f"experiment:{exid}", audit_allowed=self.full)
            # the experiment itself, and its files (file:EXID/path); exIDs may hold LIKE's wildcards
            escaped = exid.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            q = select(AuditEvent).where(or_(AuditEvent.target == f"experiment:{exid}",
                                             AuditEvent.target.like(f"file:{escaped}/%", escape="\\")))
            if not self.full:  # scientific activity: changes that happened, not every read
                q = q.where(AuditEvent.allowed.is_(True), AuditEvent.action.not_in(views.READ_ACTIONS))
            events = s.scalars(q.order_by(AuditEvent.seq.desc()).limit(500)).all()
            self.write_json({"events": [views.event(x, full=self.full) for x in events]})


class AuditTrailHandler(ActivityHandler):
    full = True


class ResultSetsHandler(BaseAPIHandler):
    """Result sets of an experiment: listed only where the policy lets the user read them."""

    def get(self, exid):
        with self.sessions() as s:
            e, ev = self.read_experiment(s, exid)
            subject = self.subject(s)
            out = []
            for rs in s.scalars(select(ResultSet).where(ResultSet.experiment_id == e.id).order_by(ResultSet.id)):
                value = ops.result_set_value(s, rs, ev)
                if self.service.policy.decide(subject, "list", value, self.now).allowed:
                    out.append(views.result_set(rs, value, views.NameCache(s), exid))
            self.write_json({"result_sets": out})

    def post(self, exid):
        body = self.json_body()
        name = self.field(body, "name")
        department = self.field(body, "department", required=False)
        self.guard(exid)
        department_id = None
        if department is not None:
            with self.sessions() as s:
                e = self.experiment(s, exid)
                department_id = s.scalar(select(Department.id).where(
                    Department.name == department, Department.institution_id == e.institution_id))
            if department_id is None:
                raise APIError(404, "not found", "", f"no department {department!r} in the experiment's institution")
        rs = self.run_op(ops.create_result_set, exid, name, kind=body.get("kind") or "analysis",
                         department_id=department_id)
        with self.sessions() as s:
            rs = s.get(ResultSet, rs.id)
            self.write_json(views.result_set(rs, ops.result_set_value(s, rs), views.NameCache(s), exid), 201)


class ResultSetPublishHandler(BaseAPIHandler):
    def post(self, result_set_id):
        rs_id = row_id(result_set_id, "result set")
        with self.sessions() as s:
            rs = s.get(ResultSet, rs_id)
            if rs is None:
                raise APIError(404, "not found", "", f"no result set {result_set_id}")
            value = ops.result_set_value(s, rs)
            if not self.service.policy.decide(self.subject(s), "read", value, self.now).allowed:
                raise APIError(404, "not found", "", f"no result set {result_set_id}")
        rs = self.run_op(ops.publish_result_set, rs_id)
        with self.sessions() as s:
            rs = s.get(ResultSet, rs.id)
            exid = s.get(Experiment, rs.experiment_id).exid
            self.write_json(views.result_set(rs, ops.result_set_value(s, rs), views.NameCache(s), exid))


# --------------------------------------------------------------------------------------
# files: the served path (Range reads decrypted here), uploads, and direct-read leases
# --------------------------------------------------------------------------------------
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class FilesHandler(BaseAPIHandler):
    def get(self, exid):
        with self.sessions() as s:
            e, _ = self.read_experiment(s, exid)
            rows = s.scalars(select(StoredFile).where(StoredFile.experiment_id == e.id)
                             .order_by(StoredFile.path, StoredFile.id)).all()
            self.write_json({"files": [views.stored_file(r) for r in rows]})


class FileAccess:
    """What the file handlers share: path checks, the per-request decision, readers."""

    def _path(self, path: str) -> str:
        from labvault.datastore.store.store import normalise_path

        try:
            return normalise_path(path)
        except ops.OperationError as e:
            raise APIError(400, "bad request", "", str(e)) from None

    def _decide_read(self, exid: str, path: str) -> StoredFile:
        """Decide this request (every request: access that ends, ends here); audit one event
        per file and user per read window, not one per byte range."""
        path = self._path(path)
        target = f"file:{exid}/{path}"
        with self.sessions() as s:
            e = self.experiment(s, exid, "file.read", target)
            # one decision per request: the file's (which is the experiment's, plus deletion)
            decision = self.allowed_by(self.service.policy.decide(
                self.subject(s), "read", p.File(experiment_value(s, e), path), self.now))
            if not decision.allowed and decision.rule != "retention.deleted":
                error = self.refused(e, decision)  # proprietary: not revealed
                self.audit("file.read", target, decision, audit.answered_as(decision, error.rule, error.reason))
                raise error
            row = s.scalars(select(StoredFile).where(StoredFile.experiment_id == e.id, StoredFile.path == path)
                            .order_by(StoredFile.id.desc())).first()
            if row is None:
                raise APIError(404, "not found", "", f"no file {path!r} in {exid}")
            if row.deleted_at is not None:
                d = p.Decision(False, "retention.deleted",
                               f"{exid}/{path} was permanently deleted on {row.deleted_at:%Y-%m-%d}: "
                               f"{row.deleted_reason or 'no reason recorded'}")
                self.audit("file.read", target, d)
                raise APIError(410, "gone", d.rule, d.reason)
            if not decision.allowed:  # the whole experiment was deleted
                self.audit("file.read", target, decision)
                raise APIError(410, "gone", decision.rule, decision.reason)
            s.expunge(row)
        if self.service.open_read_window(self.lv_user.id, row.id):
            self.audit("file.read", target, decision, {"uuid": row.uuid})
        return row

    def _reader(self, row: StoredFile):
        from labvault.datastore.store.errors import StoreError

        try:
            return self.service.reader(row.id)
        except StoreError as e:
            raise APIError(503, "storage error", "", str(e)) from None

    def _range(self, size: int) -> tuple[int, int] | None:
        header = self.request.headers.get("Range")
        if not header:
            return None
        m = _RANGE.match(header.strip())
        if not m or (not m.group(1) and not m.group(2)):
            self.set_header("Content-Range", f"bytes */{size}")
            raise APIError(416, "range not satisfiable", "", f"one byte range please, like bytes=0-1023 (got {header!r})")
        first, last = m.group(1), m.group(2)
        if first:
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
        else:  # suffix: the last N bytes
            start, end = max(0, size - int(last)), size - 1
        if start >= size or end < start:
            self.set_header("Content-Range", f"bytes */{size}")
            raise APIError(416, "range not satisfiable", "", f"bytes {start}-{end} are outside the file ({size} bytes)")
        return start, end



class StreamedUpload:
    """PUT bodies stream into a spooled temporary file (memory up to 8 MiB, then disk) as they
    arrive, up to ``DatastoreService.max_upload_size``; a larger declared size is refused with
    413 before anything is read. Use with ``@web.stream_request_body``."""

    _upload = None

    async def prepare(self):
        await super().prepare()
        if self.request.method != "PUT":
            return
        limit = self.service.max_upload_size
        declared = self.request.headers.get("Content-Length")
        if declared is None or not re.fullmatch(r"[0-9]{1,19}", declared):
            raise APIError(411, "length required", "", "send Content-Length with the upload")
        if int(declared) > limit:
            raise APIError(413, "payload too large", "",
                           f"{int(declared)} bytes is more than the {limit} bytes an upload may have; "
                           "store larger files with `labvault ingest` on the server")
        self.request.connection.set_max_body_size(limit)
        import tempfile

        self._upload = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)

    def data_received(self, chunk: bytes) -> None:
        if self._upload is not None:
            self._upload.write(chunk)

    def on_finish(self):
        if self._upload is not None:
            self._upload.close()

    def upload_blocks(self):
        self._upload.seek(0)
        return iter(lambda: self._upload.read(4 * 1024 * 1024), b"")


class FileServing(FileAccess):
    """HEAD and GET (one HTTP Range) of a stored file the request was allowed to read."""

    def _data_headers(self, row: StoredFile) -> None:
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Accept-Ranges", "bytes")
        if row.checksum:
            self.set_header("ETag", f'"{row.checksum}"')

    def serve_head(self, row: StoredFile) -> None:
        self._data_headers(row)
        self.set_header("Content-Length", str(row.size))
        self.finish()

    async def serve(self, row: StoredFile) -> None:
        from labvault.datastore.store.errors import StoreError

        reader = self._reader(row)
        span = self._range(row.size)
        start, end = span if span else (0, row.size - 1)
        self._data_headers(row)
        if span:
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {start}-{end}/{row.size}")
        length = max(0, end - start + 1)
        self.set_header("Content-Length", str(length))
        piece = 4 * 1024 * 1024
        buf = bytearray(min(piece, length) or 1)
        pos = start
        while pos <= end and length:
            n = min(len(buf), end - pos + 1)
            view = memoryview(buf)[:n]
            try:
                reader.seek(pos)  # seek + read happen without yielding: the reader is shared
                got = reader.readinto(view)
            except StoreError as e:  # never wrong bytes: stop, and say why (headers may be out)
                self.service.log.error("integrity: %s", e)
                if not self._headers_written:
                    self.clear_header("Content-Range")
                    raise APIError(502, "integrity error", "", str(e)) from None
                self.request.connection.close()
                return
            if got != n:
                raise APIError(502, "integrity error", "", f"short read at {pos}")
            self.write(bytes(view))
            pos += n
            if pos <= end:
                await self.flush()
        self.finish()


@web.stream_request_body
class FileHandler(StreamedUpload, FileServing, BaseAPIHandler):
    """One file: GET/HEAD with HTTP Range (served path), PUT to upload, DELETE (PI)."""

    def head(self, exid, path):
        self.serve_head(self._decide_read(exid, path))

    async def get(self, exid, path):
        await self.serve(self._decide_read(exid, path))

    def put(self, exid, path):
        path = self._path(path)
        self.guard(exid)
        info = self.store_op(self.service.store.ingest_stream, exid, path, self.upload_blocks())
        with self.sessions() as s:
            self.write_json(views.stored_file(s.get(StoredFile, info.file.id)), 201)

    def delete(self, exid, path):
        path = self._path(path)
        reason = self.get_argument("reason", "").strip()
        self.guard(exid)
        info = self.store_op(self.service.store.delete_file, exid, path, reason=reason)
        self.service.forget_reader(info.id)
        with self.sessions() as s:
            self.write_json(views.stored_file(s.get(StoredFile, info.id)))


class LeaseHandler(FileAccess, BaseAPIHandler):
    """The direct path: after a fresh decision, lease one file's data key for minutes."""

    def post(self, exid):
        body = self.json_body()
        path = self.field(body, "path")
        if not self.service.direct_read_root:
            raise APIError(409, "direct reads unavailable", "",
                           "this deployment serves reads only (DatastoreService.direct_read_root is not set)")
        row = self._decide_read(exid, path)
        lease = self.service.store.lease(row.id)
        self.audit("file.lease", f"file:{exid}/{row.path}",
                   p.Decision(True, "derived.parent", f"key lease for {self.service.lease_seconds} s"),
                   {"uuid": row.uuid})
        from labvault.datastore.store.format import object_key

        self.write_json({**lease.to_json(), "root": self.service.direct_read_root,
                         "object": object_key(row.uuid), "expires_in": self.service.lease_seconds})


class EnvironmentsHandler(BaseAPIHandler):
    def get(self):
        with self.sessions() as s:
            subject = self.subject(s)
            out = []
            for env in s.scalars(select(Environment).order_by(Environment.name)):
                d = self.service.policy.decide(subject, "use", views.environment_value(env), self.now)
                if d.allowed or self.get_argument("all", "") == "1":
                    out.append(views.environment(env, d))
            self.write_json({"environments": out})


#: The API, as OpenAPI path templates; ``{name}`` is one path segment, passed as a keyword.
ROUTES = [
    ("/me", MeHandler),
    ("/me/export", MeExportHandler),
    ("/me/access-log", MeAccessLogHandler),
    ("/me/close", MeCloseHandler),
    ("/users", UsersHandler),
    ("/users/{name}/access-log", UserAccessLogHandler),
    ("/environments", EnvironmentsHandler),
    ("/experiments", ExperimentsHandler),
    ("/experiments/{exid}", ExperimentHandler),
    ("/experiments/{exid}/roles", RolesHandler),
    ("/experiments/{exid}/roles/{user}", RoleHandler),
    ("/experiments/{exid}/shares", SharesHandler),
    ("/experiments/{exid}/retention", RetentionHandler),
    ("/experiments/{exid}/archive", ArchiveHandler),
    ("/experiments/{exid}/publish", PublishHandler),
    ("/experiments/{exid}/activity", ActivityHandler),
    ("/experiments/{exid}/audit", AuditTrailHandler),
    ("/experiments/{exid}/result-sets", ResultSetsHandler),
    ("/result-sets/{result_set_id}/publish", ResultSetPublishHandler),
    ("/experiments/{exid}/files", FilesHandler),
    ("/experiments/{exid}/files/{path+}", FileHandler),
    ("/experiments/{exid}/leases", LeaseHandler),
    ("/shares/pending", PendingSharesHandler),
    ("/shares/{share_id}/confirm", ShareConfirmHandler),
    ("/shares/{share_id}/refuse", ShareRefuseHandler),
]


# the personal repository lives in its own module (it imports this one)
from .org import ROUTES as _ORG_ROUTES  # noqa: E402
from .personal import ROUTES as _PERSONAL_ROUTES  # noqa: E402

ROUTES += _PERSONAL_ROUTES + _ORG_ROUTES

# what the notebook widgets need beyond the above (retention status, deleting an experiment,
# verifying the audit chain) lives in its own module too
from .widgets_api import ROUTES as _WIDGETS_ROUTES  # noqa: E402

ROUTES += _WIDGETS_ROUTES

# data-subject rights beyond /me, /me/export and /me/close (deletion requests)
from .privacy import ROUTES as _PRIVACY_ROUTES  # noqa: E402

ROUTES += _PRIVACY_ROUTES


def _pattern(template: str) -> str:
    """``{name}`` is one path segment; ``{name+}`` the rest of the path (a file's path)."""
    template = re.sub(r"\{(\w+)\+\}", r"(?P<\1>.+)", template)
    return re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)


default_handlers = [(API + _pattern(t), cls) for t, cls in ROUTES]
