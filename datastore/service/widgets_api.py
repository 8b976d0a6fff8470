"""Endpoints the notebook widgets (``labvault.widgets``) need beyond the core API.

    GET  /experiments/{exid}/retention/status   retain-until, days left (service clock), the
                                                earliest date an extension may choose, and
                                                whether the caller may manage retention
    POST /experiments/{exid}/delete             the PI deletes the whole experiment, typing its
                                                exID as ``confirm``: every file crypto-shredded,
                                                the metadata stub and the audit trail kept
    GET  /experiments/{exid}/audit/verify       recompute the audit hash chain (PI and admins)

Each goes through the policy with a named rule and is audited like the rest of the service.
"""

from __future__ import annotations

from sqlalchemy import func, or_, select
from tornado.ioloop import IOLoop

from labvault import policies as p
from labvault.datastore import audit
from labvault.datastore import operations as ops
from labvault.datastore.access import experiment_value, load_subject
from labvault.datastore.models import AuditEvent, Experiment, StoredFile

from . import views
from .handlers import APIError, BaseAPIHandler, denied

#: How often the delete loop looks again for files uploaded while it was shredding.
_DELETE_ROUNDS = 3


def _decision(d: p.Decision) -> dict:
    return {"allowed": d.allowed, "rule": d.rule, "reason": d.reason}


class RetentionStatusHandler(BaseAPIHandler):
    """What the retention panel shows, computed on the service's clock (the one the lifecycle
    job deletes by), with the rule that says whether the caller may change it."""

    def get(self, exid):
        with self.sessions() as s:
            e, ev = self.read_experiment(s, exid)
            policy = self.service.policy
            # a hint for the panel, not an action: the change itself is decided (and audited) again
            manage = policy.decide(self.subject(s), "archive", ev, self.now)
            data = views.retention(e, self.now)
            data.update(
                title=e.title,
                proprietary=e.proprietary,
                minimum_retain_until=policy.minimum_retain_until(e.archived_at or self.now),
                minimum_days=policy.retention_minimum_days,
                deleted_at=e.deleted_at,
                live_files=s.scalar(select(func.count()).select_from(StoredFile).where(
                    StoredFile.experiment_id == e.id, StoredFile.deleted_at.is_(None))) or 0,
                manage=_decision(manage),
            )
            self.write_json(data)


class ExperimentDeleteHandler(BaseAPIHandler):
    """The PI deletes an experiment: each live file is crypto-shredded through the chunk store
    (data key destroyed first, then every replica's chunks; one ``file.delete`` event each), then
    the experiment is marked deleted with one ``experiment.delete`` event. Its metadata stays as
    a stub (reads answer 410 with when and why), and so does its audit trail.

    Crash-safe by repetition: the experiment is marked deleted only once no live file is left,
    so a request interrupted half-way is finished by asking again."""

    async def post(self, exid):
        body = self.json_body()
        confirm = self.field(body, "confirm")
        if confirm != exid:
            raise APIError(400, "bad request", "",
                           f"type the experiment's ID ({exid}) as 'confirm' to delete it permanently")
        reason = " ".join(str(body.get("reason") or "").split())[:2000] or "deleted by its PI"
        self.guard(exid)
        target = f"experiment:{exid}"
        with self.sessions() as s:
            e = self.experiment(s, exid)
            decision = self.service.policy.decide(self.subject(s), "delete", experiment_value(s, e), self.now)
        if not decision.allowed:
            self.audit("experiment.delete", target, decision)
            raise denied(decision)
        # many files take a while: off the event loop; the readers are forgotten back on it
        shredded, file_ids = await IOLoop.current().run_in_executor(None, self._shred, exid, reason)
        for file_id in file_ids:
            self.service.forget_reader(file_id)
        with self.sessions() as s:
            e = self.experiment(s, exid)
            self.write_json({**views.retention(e, self.now), "status": "deleted", "deleted_at": e.deleted_at,
                             "deleted_reason": e.deleted_reason, "files_deleted": shredded})

    def _shred(self, exid: str, reason: str) -> tuple[int, list[int]]:
        from labvault.datastore.store.errors import FileDeleted, StoreError

        store, shredded, file_ids = self.service.store, 0, []
        for _ in range(_DELETE_ROUNDS):
            for info in store.list_files(exid, include_deleted=False):
                try:
                    done = store.delete_file(self.actor, exid, info.path, reason=reason, now=self.now)
                except FileDeleted:
                    continue  # deleted meanwhile by another request
                except ops.Denied as e:
                    raise denied(e.decision) from None
                except (ops.OperationError, StoreError) as e:
                    raise APIError(503, "storage error", "", f"deleting {info.path}: {e}") from None
                file_ids.append(done.id)
                shredded += 1
            with self.sessions.begin() as s:
                e = s.scalar(select(Experiment).where(Experiment.exid == exid).with_for_update())
                live = s.scalar(select(func.count()).select_from(StoredFile).where(
                    StoredFile.experiment_id == e.id, StoredFile.deleted_at.is_(None)))
                if live:
                    continue  # uploaded while we were shredding: another round
                # decided again inside the transaction that marks it
                decision = self.service.policy.decide(load_subject(s, self.lv_user.id, self.now), "delete",
                                                      experiment_value(s, e), self.now)
                if not decision.allowed:
                    break
                e.deleted_at, e.deleted_reason = self.now, reason
                audit.append(s, actor=self.lv_user_name, action="experiment.delete",
                             target=f"experiment:{exid}", decision=decision, ip=self.request.remote_ip,
                             details={"files_deleted": shredded, "reason": reason}, now=self.now,
                             ipv4_masked_bytes=self.service.policy.ipv4_masked_bytes,
                             ipv6_prefix_bits=self.service.policy.ipv6_prefix_bits)
                return shredded, file_ids
        else:
            raise APIError(409, "conflict", "", f"files keep arriving in {exid}; delete again")
        self.audit("experiment.delete", f"experiment:{exid}", decision)
        raise denied(decision)


class AuditVerifyHandler(BaseAPIHandler):
    """Recompute the whole hash chain (it is one chain for everything) and say whether it is
    intact, and how many of its events concern this experiment. Runs off the event loop."""

    async def get(self, exid):
        with self.sessions() as s:
            _, ev = self.read_experiment(s, exid)
            self.decide(s, "read_audit_trail", ev, f"experiment:{exid}")
        report = await IOLoop.current().run_in_executor(None, self._verify)
        with self.sessions() as s:
            mine = s.scalar(select(func.count()).select_from(AuditEvent).where(or_(
                AuditEvent.target == f"experiment:{exid}",
                AuditEvent.target.startswith(f"file:{exid}/", autoescape=True))))
        self.write_json({"ok": report.ok, "events": report.events, "first_broken": report.first_broken,
                         "problem": report.problem, "experiment_events": mine or 0,
                         "verified_at": self.now})

    def _verify(self) -> audit.ChainReport:
        with self.sessions() as s:
            return audit.verify(s)


ROUTES: list[tuple[str, type]] = [
    ("/experiments/{exid}/retention/status", RetentionStatusHandler),
    ("/experiments/{exid}/delete", ExperimentDeleteHandler),
    ("/experiments/{exid}/audit/verify", AuditVerifyHandler),
]
