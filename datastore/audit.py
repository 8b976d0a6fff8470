"""The tamper-evident audit log: append-only events, each holding the hash of the one before.

``append`` locks the chain's head row (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite
transactions already begin IMMEDIATE), so parallel writers form one linear chain, and it
runs inside the caller's transaction: a change and its audit event commit together or not at
all. ``verify`` recomputes the chain and names the first event that was edited, deleted or
reordered; the head row catches a deleted tail.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import bindparam, select, text
from sqlalchemy.orm import Session

from labvault.policies import Decision, truncate_ip

from .db import WAIT_FOR_WAL, WRITE_PATH
from .models import AuditEvent, AuditHead, UTCDateTime, utcnow

GENESIS = "0" * 64


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_hash(prev_hash: str, seq: int, time: datetime, actor: str, action: str, target: str,
               allowed: bool, rule: str, reason: str, ip: str, details: dict) -> str:
    payload = json.dumps(
        [seq, _iso(time), actor, action, target, bool(allowed), rule, reason, ip, details],
        sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    )
    return hashlib.sha256((prev_hash + payload).encode()).hexdigest()


def _hash_of(e: AuditEvent, prev_hash: str) -> str:
    return event_hash(prev_hash, e.seq, e.time, e.actor, e.action, e.target, e.allowed,
                      e.rule, e.reason, e.ip, e.details or {})


#: ``details`` key of a refusal that was answered with another rule and reason than the one
#: decided: a proprietary experiment one may not read is answered as an unknown one.
ANSWERED = "answered"


def answered_as(decision: Decision, rule: str, reason: str) -> dict | None:
    """``details`` recording how a refusal was answered, when that differs from the decision."""
    if (rule, reason) == (decision.rule, decision.reason):
        return None
    return {ANSWERED: {"rule": rule, "reason": reason}}


def shown_to_actor(e: AuditEvent) -> tuple[str, str]:
    """(rule, reason) of ``e`` as its actor was answered. The actor's own access log and export
    show these, so they reveal no more than the answer did (a hidden experiment's existence);
    the event, the audit trail and admins keep the rule as decided."""
    answered = (e.details or {}).get(ANSWERED) if not e.allowed else None
    if isinstance(answered, dict):
        return str(answered.get("rule", e.rule)), str(answered.get("reason", e.reason))
    return e.rule, e.reason


def append(
    session: Session,
    *,
    actor: str,
    action: str,
    target: str,
    decision: Decision,
    ip: str | None = None,
    details: dict | None = None,
    now: datetime | None = None,
    ipv4_masked_bytes: int = 2,
    ipv6_prefix_bits: int = 48,
) -> AuditEvent:
    """Append one event in ``session``'s transaction. ``ip`` is truncated before storage."""
    if len(actor) > 100 or len(action) > 50:
        raise ValueError("audit actor or action name too long")
    time = (now or utcnow()).astimezone(timezone.utc)
    masked = truncate_ip(ip, ipv4_masked_bytes, ipv6_prefix_bits) if ip else "-"
    details = json.loads(json.dumps(details or {}, sort_keys=True, default=str))
    target = target[:1100]
    if session.get_bind().dialect.name == "postgresql":
        return _append_postgresql(session, time, actor, action, target, decision, masked, details)
    head = session.execute(
        select(AuditHead).where(AuditHead.id == 1).with_for_update()
    ).scalar_one()
    seq = head.seq + 1
    h = event_hash(head.hash, seq, time, actor, action, target, decision.allowed,
                   decision.rule, decision.reason, masked, details)
    event = AuditEvent(
        seq=seq, time=time, actor=actor, action=action, target=target,
        allowed=decision.allowed, rule=decision.rule, reason=decision.reason, ip=masked,
        details=details, prev_hash=head.hash, hash=h,
    )
    session.add(event)
    head.seq = seq
    head.hash = h
    session.flush()
    return event


# One statement: lock the head, advance it with the new hash (computed by the database from the
# same canonical JSON as event_hash), and insert the event. The head lock is the chain's one
# serialisation point, so it is held as briefly as possible: see _durable_after_commit.
_PG_APPEND = text("""
WITH old AS (SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE),
new AS (
    UPDATE audit_head
    SET seq = old.seq + 1,
        hash = encode(sha256(convert_to(old.hash || '[' || (old.seq + 1)::text || ',' || :tail, 'UTF8')), 'hex')
    FROM old WHERE audit_head.id = 1
    RETURNING audit_head.seq AS seq, audit_head.hash AS hash, old.hash AS prev_hash
)
INSERT INTO audit_events (seq, time, actor, action, target, allowed, rule, reason, ip, details, prev_hash, hash)
SELECT new.seq, :time, :actor, :action, :target, :allowed, :rule, :reason, :ip, CAST(:details AS JSON),
       new.prev_hash, new.hash
FROM new
RETURNING seq, prev_hash, hash
""").bindparams(bindparam("time", type_=UTCDateTime()))


def _append_postgresql(session, time, actor, action, target, decision, masked, details) -> AuditEvent:
    fields = [_iso(time), actor, action, target, bool(decision.allowed), decision.rule, decision.reason,
              masked, details]
    # event_hash hashes json.dumps([seq, *fields]); with these separators that is
    # "[" + str(seq) + "," + json.dumps(fields)[1:], so the database only adds the seq
    tail = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)[1:]
    _durable_after_commit(session)
    row = session.execute(_PG_APPEND, {
        "tail": tail, "time": time, "actor": actor, "action": action, "target": target,
        "allowed": bool(decision.allowed), "rule": decision.rule, "reason": decision.reason, "ip": masked,
        "details": json.dumps(details, sort_keys=True),
    }).one()
    return AuditEvent(seq=row.seq, time=time, actor=actor, action=action, target=target,
                      allowed=decision.allowed, rule=decision.rule, reason=decision.reason, ip=masked,
                      details=details, prev_hash=row.prev_hash, hash=row.hash)


def _durable_after_commit(session: Session) -> None:
    """Commit without waiting for the disk while the head lock is held, then wait for it.

    Inside ``Sessions.begin()`` (the write path) the transaction commits with
    synchronous_commit off, which releases the head lock as soon as the commit is in the WAL
    buffers, so the next writer can go on; ``Sessions.begin()`` then runs a synchronous
    transaction that writes WAL (db.WAL_FLUSH_SQL) before the caller's ``with`` block returns,
    and concurrent writers' waits share one fsync (group commit). The caller hears of success
    only once the event is durable, and a failed wait raises to the caller. In any other session
    nothing would wait afterwards, so the commit stays synchronous.
    """
    if not session.info.get(WRITE_PATH) or session.info.get(WAIT_FOR_WAL):
        return
    session.execute(text("SET LOCAL synchronous_commit TO OFF"))
    session.info[WAIT_FOR_WAL] = True


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    events: int
    first_broken: int | None = None
    problem: str = ""


def iter_events(session: Session, batch: int = 5000) -> Iterator[AuditEvent]:
    last = 0
    while True:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(batch)
        ).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].seq
        session.expunge_all()


def verify(session: Session) -> ChainReport:
    """Recompute the chain; report the first event that does not fit."""
    expected_seq = 1
    running = GENESIS
    count = 0
    for e in iter_events(session):
        if e.seq != expected_seq:
            return ChainReport(False, count, expected_seq,
                               f"event {expected_seq} is missing (next present is {e.seq}): deleted")
        if e.prev_hash != running:
            return ChainReport(False, count, e.seq,
                               f"event {e.seq} does not follow event {e.seq - 1}: deleted or reordered")
        h = _hash_of(e, running)
        if h != e.hash:
            return ChainReport(False, count, e.seq, f"event {e.seq} was edited (hash mismatch)")
        running = h
        expected_seq += 1
        count += 1
    head = session.get(AuditHead, 1)
    if head is None:
        return ChainReport(False, count, None, "the chain head is missing")
    if head.seq != count or head.hash != running:
        if head.seq > count:
            return ChainReport(False, count, count + 1,
                               f"events {count + 1}..{head.seq} are missing: the tail was deleted")
        return ChainReport(False, count, head.seq, "the chain head does not match the last event")
    return ChainReport(True, count)
