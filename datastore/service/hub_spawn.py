"""Hub-internal API for the spawner and the reconciler: environments a user may start,
experiments a user may mount, and the notice when a server had to be stopped.

Only the Hub calls these (``Authorization: labvault-hub <secret>``, see :mod:`.hub_api`).
The decisions are the policy's: ``use`` on an Environment (``environment.licensed``,
``environment.proprietary_institution_only``) and ``read`` on the experiments (the same SQL
listing the service uses everywhere). Starting a server is a decision and is audited; the
periodic checks of the reconciler are lookups and are not.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

from sqlalchemy import select
from tornado.ioloop import IOLoop

from labvault import policies as p
from labvault.datastore import audit
from labvault.datastore.access import experiment_value, list_visible, load_subject
from labvault.datastore.models import Environment, Experiment, Notice, StoredFile, User, UserState

from . import views
from .handlers import APIError
from .hub_api import HubInternalHandler

#: Notices shown in the spawn form (``last_stop``) for this long after a server was stopped.
LAST_STOP_DAYS = 7


def _environment_view(env: Environment, decision: p.Decision) -> dict:
    return {**views.environment(env, decision), "public": env.public}


def _user_environments(session, subject: p.Subject, policy: p.Policy, now: datetime):
    """(environment row, decision) for every environment, in catalogue (name) order."""
    for env in session.scalars(select(Environment).order_by(Environment.name)):
        yield env, policy.decide(subject, "use", views.environment_value(env), now)


def _foreign_proprietary(env: Environment, subject: p.Subject) -> bool:
    """Custom proprietary environments are not even named outside their institution."""
    return env.proprietary and env.institution_id != subject.institution_id


def _locations(service) -> dict[str, str]:
    """Storage location name -> directory, as the service sees it (local locations only)."""
    out = {}
    for name, backend in service.store.backends.items():
        root = getattr(backend, "root", None)
        if root is not None:
            out[name] = str(root)
    return out


def _experiments(session, service, user: User, now: datetime, *, files: bool) -> list[dict]:
    """The experiments ``user`` may read now (the SQL listing), with their stored files."""
    from labvault.datastore.store.format import object_key

    rows = list_visible(session, user.id, now, service.policy)
    out = {e.id: {"exid": e.exid, "proprietary": e.proprietary} for e in rows if e.deleted_at is None}
    if files and out:
        q = (select(StoredFile.experiment_id, StoredFile.path, StoredFile.uuid, StoredFile.locations)
             .where(StoredFile.experiment_id.in_(list(out)), StoredFile.deleted_at.is_(None),
                    StoredFile.uuid.is_not(None))
             .order_by(StoredFile.experiment_id, StoredFile.path))
        for exp_id, path, uuid, locations in session.execute(q):
            out[exp_id].setdefault("files", []).append(
                {"path": path, "object": object_key(uuid), "locations": sorted(locations or [])})
        for item in out.values():
            item.setdefault("files", [])
    return sorted(out.values(), key=lambda x: x["exid"])


class UserEnvironmentsHandler(HubInternalHandler):
    """``GET /hub/users/{name}/environments``: what the spawn form offers.

    ``environments``: those the user may start, each with the policy's decision.
    ``unavailable``: the others the user may know of, with the reason (a missing licence);
    other institutions' proprietary environments are never named. ``last_stop``: the notice of
    a server the reconciler stopped in the last days, so the form can say why.
    """

    def get(self, name: str):
        with self.sessions() as s:
            user = self.user(s, name)
            subject = load_subject(s, user, self.now)
            usable, unavailable = [], []
            for env, d in _user_environments(s, subject, self.service.policy, self.now):
                if d.allowed:
                    usable.append(_environment_view(env, d))
                elif not _foreign_proprietary(env, subject):
                    unavailable.append({"name": env.name, "display_name": env.display_name,
                                        "rule": d.rule, "reason": d.reason})
            last = s.scalar(
                select(Notice).where(Notice.user_id == user.id, Notice.kind == "server.stopped",
                                     Notice.created_at >= self.now - timedelta(days=LAST_STOP_DAYS))
                .order_by(Notice.created_at.desc()).limit(1))
            self.write_json({
                "user": user.name, "state": user.state.value,
                "environments": usable, "unavailable": unavailable,
                "last_stop": ({"time": last.created_at, "subject": last.subject, "rule": last.rule}
                              if last is not None else None),
            })


class UserExperimentsHandler(HubInternalHandler):
    """``GET /hub/users/{name}/experiments[?environment=E][&files=1]``: the experiments the
    user may read now — what a server may mount read-only, and what the reconciler compares.

    With ``environment``, the answer also says whether the user may still use it; when not, no
    experiment is reachable from it (``experiments`` is empty).
    """

    def get(self, name: str):
        env_name = self.get_argument("environment", "")
        with_files = self.get_argument("files", "") == "1"
        with self.sessions() as s:
            user = self.user(s, name)
            subject = load_subject(s, user, self.now)
            out: dict = {"user": user.name, "active": user.state == UserState.active,
                         "direct_read_root": self.service.direct_read_root or None}
            reachable = True
            if env_name:
                env = s.scalar(select(Environment).where(Environment.name == env_name))
                if env is None:
                    out["environment"] = {"name": env_name, "usable": False, "rule": "default.deny",
                                          "reason": f"the environment {env_name!r} no longer exists"}
                else:
                    d = self.service.policy.decide(subject, "use", views.environment_value(env), self.now)
                    out["environment"] = {"name": env.name, "usable": d.allowed, "rule": d.rule, "reason": d.reason}
                reachable = out["environment"]["usable"]
            out["experiments"] = (_experiments(s, self.service, user, self.now, files=with_files)
                                  if reachable and out["active"] else [])
            if with_files:
                out["locations"] = _locations(self.service)
            self.write_json(out)


class StartEnvironmentHandler(HubInternalHandler):
    """``POST /hub/users/{name}/environments/{env}/start`` ``{"server": ""}``: the spawner's
    re-validation. Decides ``use`` (audited as ``environment.start``), and answers the
    environment with the experiments and files the server may mount.

    An unknown environment and another institution's proprietary one both answer 404 (their
    existence is not revealed; the audit event has the real rule); other refusals 403.
    """

    def post(self, name: str, env: str):
        body = self.json_body()
        server = body.get("server", "")
        if not isinstance(server, str) or len(server) > 255:
            raise APIError(400, "bad request", "", "'server' must be a server name (a string)")
        target = f"environment:{env}"
        with self.sessions() as s:
            user = self.user(s, name)
            subject = load_subject(s, user, self.now)
            row = s.scalar(select(Environment).where(Environment.name == env))
            if row is None:
                decision = p.Decision(False, "default.deny", f"there is no environment {env!r}")
            else:
                decision = self.service.policy.decide(subject, "use", views.environment_value(row), self.now)
            hidden = row is None or _foreign_proprietary(row, subject)
            if decision.allowed:
                experiments = _experiments(s, self.service, user, self.now, files=True)
                answer = {
                    "user": user.name, "server": server, "time": self.now,
                    "environment": _environment_view(row, decision),
                    "experiments": experiments,
                    "direct_read_root": self.service.direct_read_root or None,
                    "locations": _locations(self.service),
                }
        details = {"server": server, "via": "hub"}
        if not decision.allowed:
            self.audit("environment.start", target, decision, details, actor=name)
            if hidden:
                raise APIError(404, "not found", "default.deny", f"there is no environment {env!r} you may use")
            raise APIError(403, "forbidden", decision.rule, decision.reason)
        self.audit("environment.start", target, decision,
                   {**details, "experiments": [e["exid"] for e in experiments]}, actor=name)
        self.write_json(answer)


class ServerStoppedHandler(HubInternalHandler):
    """``POST /hub/users/{name}/server-stopped``: the reconciler stopped a server whose set of
    permitted experiments shrank (or whose environment may no longer be used).

    Body: ``{"server", "environment", "lost": [exIDs], "started_at", "environment_reason"?}``.
    The service decides each lost experiment again to name the rule, records the audit event
    and a notice (the outbox, in one transaction; a repeated report is recorded once), and
    mails the user.
    """

    async def post(self, name: str):
        body = self.json_body()
        server = body.get("server", "")
        env_name = body.get("environment", "")
        lost = body.get("lost", [])
        started_at = self.field(body, "started_at", datetime)
        env_reason = body.get("environment_reason") or ""
        env_rule = body.get("environment_rule") or "environment.licensed"
        if (not isinstance(server, str) or not isinstance(env_name, str) or not isinstance(env_reason, str)
                or not isinstance(env_rule, str) or len(env_rule) > 80
                or not isinstance(lost, list) or not all(isinstance(x, str) for x in lost)):
            raise APIError(400, "bad request", "", "expected server, environment (strings), lost (a list of exIDs)")
        if not lost and not env_reason:
            raise APIError(400, "bad request", "", "nothing was lost: name the lost experiments or the environment's reason")
        key = f"server-stopped:{name}:{server}:{started_at.isoformat()}"[:200]
        with self.sessions.begin() as s:
            user = self.user(s, name)
            subject = load_subject(s, user, self.now)
            reasons = []
            for exid in sorted(set(lost))[:100]:
                e = s.scalar(select(Experiment).where(Experiment.exid == exid))
                if e is None:
                    reasons.append((exid, p.Decision(False, "default.deny", f"{exid} no longer exists")))
                    continue
                d = self.service.policy.decide(subject, "read", experiment_value(s, e), self.now)
                reasons.append((exid, d if not d.allowed else p.Decision(
                    False, "default.deny", f"{exid} was not reachable from the environment any more")))
            first = p.Decision(False, env_rule, env_reason) if env_reason or not reasons else reasons[0][1]
            label = f"{server!r}" if server else "your server"
            lines = [f"{label} ({env_name or 'labvault'}) was stopped at {self.now:%Y-%m-%d %H:%M} UTC, "
                     f"because what it could reach changed:", ""]
            lines += [f"  - {exid}: {d.reason} ({d.rule})" for exid, d in reasons]
            if env_reason:
                lines.append(f"  - the environment {env_name!r}: {env_reason}")
            lines += ["", "Nothing of your own files was touched. Start a server again to go on with the "
                      "experiments you may still access.", ""]
            summary = f"server stopped: {', '.join(x for x, _ in reasons) or env_name}"
            existing = s.scalar(select(Notice).where(Notice.key == key))
            if existing is None:
                audit.append(s, actor="hub", action="server.stop", target=f"server:{name}/{server}",
                             decision=p.Decision(False, first.rule, f"{summary}: {first.reason}"),
                             details={"environment": env_name, "lost": [x for x, _ in reasons],
                                      "started_at": started_at.isoformat()},
                             now=self.now, ipv4_masked_bytes=self.service.policy.ipv4_masked_bytes,
                             ipv6_prefix_bits=self.service.policy.ipv6_prefix_bits)
                notice = Notice(key=key, kind="server.stopped", rule=first.rule, user_id=user.id,
                                subject="labvault: your server was stopped", body="\n".join(lines),
                                created_at=self.now)
                s.add(notice)
                s.flush()
            else:
                notice = existing
            notice_id, sent, to = notice.id, notice.sent_at is not None, user.email or user.institutional_email
        delivered = sent or await self._deliver(notice_id, to, key)
        self.write_json({"recorded": existing is None, "notice": key, "mailed": delivered,
                         "rule": first.rule, "reasons": [{"exid": x, "rule": d.rule, "reason": d.reason}
                                                         for x, d in reasons]})

    async def _deliver(self, notice_id: int, to: str | None, key: str) -> bool:
        """Mail the notice now; on failure it stays unsent in the outbox, where the lifecycle
        job's sender picks it up (same Message-ID, so a second delivery shows once)."""
        from email.utils import parseaddr

        from labvault.datastore.mail import Mailer, MailError

        with self.sessions() as s:
            n = s.get(Notice, notice_id)
            subject, text = n.subject, n.body
        mailer = Mailer(parent=self.service)
        # the outbox's Message-ID (labvault.datastore.lifecycle.LifecycleJob.message_id)
        domain = parseaddr(mailer.sender)[1].rpartition("@")[2] or "labvault.invalid"
        headers = {"Message-ID": f"<notice-{hashlib.sha256(key.encode()).hexdigest()[:40]}@{domain}>",
                   "X-Labvault-Notice": key, "Auto-Submitted": "auto-generated"}
        error = None
        if not to:
            error = "the account has no e-mail address"
        else:
            try:
                await IOLoop.current().run_in_executor(None, lambda: mailer.send(to, subject, text, headers))
            except MailError as e:
                error = str(e)
        now = self.service.now()
        with self.sessions.begin() as s:
            n = s.get(Notice, notice_id)
            if n is None or n.sent_at is not None:
                return error is None
            n.attempts = (n.attempts or 0) + 1
            if error is None:
                n.sent_at, n.last_error = now, None
                audit.append(s, actor="labvault", action="notice.send", target=f"user:{self.path_kwargs['name']}",
                             decision=p.Decision(True, n.rule, f"e-mail accepted by the SMTP server: {subject}"),
                             details={"key": key, "message_id": headers["Message-ID"]}, now=now,
                             ipv4_masked_bytes=self.service.policy.ipv4_masked_bytes,
                             ipv6_prefix_bits=self.service.policy.ipv6_prefix_bits)
            else:
                n.last_error = error[:1000]
                self.service.log.warning("notice %s not mailed yet: %s", key, error)
        return error is None


ROUTES: list[tuple[str, type]] = [
    ("/hub/users/{name}/environments", UserEnvironmentsHandler),
    ("/hub/users/{name}/environments/{env}/start", StartEnvironmentHandler),
    ("/hub/users/{name}/experiments", UserExperimentsHandler),
    ("/hub/users/{name}/server-stopped", ServerStoppedHandler),
]
