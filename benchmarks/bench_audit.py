#!/usr/bin/env python3
"""Audit appends per second with concurrent writers, and the chain still intact afterwards.

    scripts/with-postgres .venv/bin/python benchmarks/bench_audit.py \
        [--writers 8] [--seconds 10] [--repeat 1] [--db postgresql,sqlite] [--variants]

Each writer is a separate process (multiprocessing, spawn) with its own engine
(``labvault.datastore.db.make_engine``). Every append is its own transaction, as the service
does it (datastore/service/handlers.py, ``BaseAPIHandler.audit``)::

    with sessions.begin() as s:      # sessions = labvault.datastore.db.session_factory(engine)
        audit.append(s, actor=..., action="file.open", target=..., decision=..., ip=...)

The time of a transaction is split into append() (up to the end of the last append, the wait
for the head lock included) and commit (the end of the ``with`` block: COMMIT and whatever the
library does after it before the caller goes on).

Measured per database, each run on a fresh migrated database (PostgreSQL: ``CREATE DATABASE
bench_audit_...`` from a migrated template, dropped afterwards; SQLite: a file in a temp dir):

    single writer   latency of one append transaction, split into append() (head lock + INSERT
                    + UPDATE of the head) and COMMIT; the head lock is held for both.
    chain           --writers processes appending for --seconds; then ``audit.verify`` must
                    report the chain intact with exactly as many events as appends were done.
    plain baseline  the same writers inserting the same rows (same columns and values, hash
                    computed alike) into a plain table with no chain, no head lock, no trigger.
                    Ratio = plain / chain.

``--variants`` (PostgreSQL) adds what-if runs that change no library code: the same chain with
``SET synchronous_commit = off`` on the writers' connections, with 10 appends per transaction
(a batching audit writer), and a proposed one-statement append (``append_one_statement``
below: same payload, same hash, verified by ``audit.verify``) inside the caller's transaction
(with and without synchronous_commit) and, for audit-only events, as one autocommit statement. ``--fsync-test`` runs ``pg_test_fsync`` next to the
server's data directory (the disk's flush rate bounds a chain whose lock is held across a
synchronous commit). No pass/fail timing asserts; the chain check is a hard failure.
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing as mp
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import world  # noqa: E402
from sqlalchemy import (  # noqa: E402
    JSON,
    BigInteger,
    Boolean,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    event,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.orm import Session  # noqa: E402

from labvault.datastore import audit  # noqa: E402
from labvault.datastore.db import make_engine, session_factory  # noqa: E402
from labvault.datastore.migrate import upgrade  # noqa: E402
from labvault.datastore.models import AuditEvent, UTCDateTime, utcnow  # noqa: E402
from labvault.policies import Decision, truncate_ip  # noqa: E402

TARGET = 2000  # appends/s on PostgreSQL with the chain intact

plain_md = MetaData()
plain_events = Table(
    "bench_plain_events", plain_md,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("time", UTCDateTime(), nullable=False),
    Column("actor", String(100), nullable=False),
    Column("action", String(50), nullable=False),
    Column("target", String(1100), nullable=False),
    Column("allowed", Boolean(), nullable=False),
    Column("rule", String(80), nullable=False),
    Column("reason", Text(), nullable=False),
    Column("ip", String(45), nullable=False),
    Column("details", JSON(), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

ALLOW = Decision(True, "role.grant", "your viewer role on FAC2-2026-0001234")


def _event_args(wid: int, i: int) -> dict:
    return dict(actor=f"user{wid:03d}", action="file.open",
                target=f"experiment:FAC2-2026-{(wid * 7919 + i) % 1000000:07d}/scan_{i:05d}.h5",
                decision=ALLOW, ip=f"192.168.{wid}.{i % 250 + 1}",
                details={"lease_s": 300, "bytes": 4096 * (i % 17)})


def _plain_row(wid: int, i: int) -> dict:
    """The row append() would write, without the chain: same values, hash computed alike."""
    a = _event_args(wid, i)
    now = utcnow()
    ip = truncate_ip(a["ip"], 2, 48)
    d = a["decision"]
    h = audit.event_hash(audit.GENESIS, i, now, a["actor"], a["action"], a["target"], d.allowed,
                         d.rule, d.reason, ip, a["details"])
    return dict(time=now, actor=a["actor"], action=a["action"], target=a["target"],
                allowed=d.allowed, rule=d.rule, reason=d.reason, ip=ip, details=a["details"],
                prev_hash=audit.GENESIS, hash=h)


# What-if (a proposal, not library code): the whole append as ONE statement on PostgreSQL.
# audit.append() needs four round trips while it holds the head lock (SELECT .. FOR UPDATE, the
# INSERT and the UPDATE of the flush, then COMMIT), so the lock is held for several network
# round trips plus Python work. Here the server locks the head, computes the same SHA-256 over
# the same JSON payload (the client sends the payload without its leading seq) and updates the
# head in one statement; audit.verify() checks the result with the library's own hashing.
ONE_STATEMENT_APPEND = text("""
WITH head AS (
    SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE
), ev AS (
    SELECT head.seq + 1 AS seq, head.hash AS prev_hash,
           encode(sha256(convert_to(head.hash || '[' || (head.seq + 1)::text || ',' || :tail,
                                    'UTF8')), 'hex') AS hash
      FROM head
), ins AS (
    INSERT INTO audit_events (seq, time, actor, action, target, allowed, rule, reason, ip,
                              details, prev_hash, hash)
    SELECT ev.seq, :time, :actor, :action, :target, :allowed, :rule, :reason, :ip,
           CAST(:details AS json), ev.prev_hash, ev.hash FROM ev
    RETURNING seq, hash
)
UPDATE audit_head SET seq = ins.seq, hash = ins.hash FROM ins WHERE audit_head.id = 1
RETURNING audit_head.seq
""")


def append_one_statement(session, *, actor, action, target, decision, ip=None, details=None,
                         now=None, ipv4_masked_bytes=2, ipv6_prefix_bits=48) -> int:
    """audit.append() semantics (same checks, truncation and hash) in one round trip."""
    import json
    from datetime import timezone

    if len(actor) > 100 or len(action) > 50:
        raise ValueError("audit actor or action name too long")
    t = (now or utcnow()).astimezone(timezone.utc)
    masked = truncate_ip(ip, ipv4_masked_bytes, ipv6_prefix_bits) if ip else "-"
    details = json.loads(json.dumps(details or {}, sort_keys=True, default=str))
    target = target[:1100]
    tail = json.dumps([audit._iso(t), actor, action, target, bool(decision.allowed),
                       decision.rule, decision.reason, masked, details],
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)[1:]
    return session.execute(ONE_STATEMENT_APPEND, dict(
        tail=tail, time=t.replace(tzinfo=None), actor=actor, action=action, target=target,
        allowed=decision.allowed, rule=decision.rule, reason=decision.reason, ip=masked,
        details=json.dumps(details, sort_keys=True))).scalar_one()


def _engine(url: str, sync_off: bool):
    engine = make_engine(url, pool_size=1, max_overflow=0)
    if sync_off and engine.dialect.name == "postgresql":
        @event.listens_for(engine, "connect")
        def _sync_off(dbapi_conn, _record):
            with dbapi_conn.cursor() as cur:
                cur.execute("SET synchronous_commit TO off")
            dbapi_conn.commit()
    return engine


def writer(mode: str, url: str, wid: int, seconds: float, batch: int, sync_off: bool,
           barrier, results) -> None:
    """One writer process: append (mode 'chain') or insert plainly (mode 'plain') until time is up."""
    engine = _engine(url, sync_off)
    sessions = session_factory(engine)
    with engine.connect() as c:  # connect (and warm the pool) before the clock starts
        c.execute(text("SELECT 1"))
    lat, split_append, split_commit = [], [], []
    count = errors = 0
    i = 0
    last_error = ""
    try:
        barrier.wait(timeout=120)
        start = time.perf_counter()
        deadline = start + seconds
        end = start
        while True:
            t0 = time.perf_counter()
            if t0 >= deadline:
                break
            if mode == "chain1ac":  # one statement = one implicit transaction, one round trip
                try:
                    with engine.connect() as c:
                        c = c.execution_options(isolation_level="AUTOCOMMIT")
                        i += 1
                        append_one_statement(c, **_event_args(wid, i))
                except Exception as exc:
                    errors += 1
                    last_error = f"{exc.__class__.__name__}: {str(exc)[:200]}"
                    continue
                t2 = time.perf_counter()
                count += 1
                end = t2
                lat.append((t2 - t0) * 1e3)
                split_append.append((t2 - t0) * 1e3)
                split_commit.append(0.0)
                continue
            try:
                # exactly the service's write path: `with sessions.begin() as s:` (commit, and
                # whatever the library does after it, happen when the block ends)
                with sessions.begin() as s:
                    if mode == "chain":
                        for _ in range(batch):
                            i += 1
                            audit.append(s, **_event_args(wid, i))
                    elif mode == "chain1":
                        for _ in range(batch):
                            i += 1
                            append_one_statement(s, **_event_args(wid, i))
                    else:
                        for _ in range(batch):
                            i += 1
                            s.execute(insert(plain_events), _plain_row(wid, i))
                    t1 = time.perf_counter()
                t2 = time.perf_counter()
            except Exception as exc:  # counted, reported; the chain check catches the rest
                errors += 1
                last_error = f"{exc.__class__.__name__}: {str(exc)[:200]}"
                continue
            count += batch
            end = t2
            lat.append((t2 - t0) * 1e3)
            split_append.append((t1 - t0) * 1e3)
            split_commit.append((t2 - t1) * 1e3)
        results.put(dict(wid=wid, count=count, errors=errors, last_error=last_error,
                         elapsed=end - start, lat=lat, split_append=split_append,
                         split_commit=split_commit))
    except BaseException as exc:
        results.put(dict(wid=wid, count=count, errors=errors + 1,
                         last_error=f"{exc.__class__.__name__}: {exc}", elapsed=0.0, lat=[],
                         split_append=[], split_commit=[]))
    finally:
        engine.dispose()


def _pct(values, q):
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def run_writers(url: str, mode: str, writers: int, seconds: float, batch: int = 1,
                sync_off: bool = False) -> dict:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(writers)
    results = ctx.Queue()
    procs = [ctx.Process(target=writer, args=(mode, url, w, seconds, batch, sync_off, barrier, results),
                         daemon=True) for w in range(writers)]
    for pr in procs:
        pr.start()
    got = []
    try:
        for _ in procs:
            got.append(results.get(timeout=seconds + 180))
    except BaseException:
        for pr in procs:  # interrupted: stop the writers now
            pr.terminate()
        raise
    finally:
        for pr in procs:
            pr.join(timeout=30)
            if pr.is_alive():
                pr.terminate()
                pr.join(timeout=10)
    total = sum(r["count"] for r in got)
    elapsed = max((r["elapsed"] for r in got), default=0.0) or float("nan")
    lat = [x for r in got for x in r["lat"]]
    return dict(
        mode=mode, writers=writers, batch=batch, sync_off=sync_off, total=total,
        errors=sum(r["errors"] for r in got),
        last_error=next((r["last_error"] for r in got if r["last_error"]), ""),
        elapsed=elapsed, rate=total / elapsed,
        p50=_pct(lat, 0.5), p95=_pct(lat, 0.95),
        append_p50=_pct([x for r in got for x in r["split_append"]], 0.5),
        commit_p50=_pct([x for r in got for x in r["split_commit"]], 0.5),
    )


def verify_chain(url: str, expected: int) -> str:
    engine = make_engine(url)
    try:
        with Session(engine) as s:
            t0 = time.perf_counter()
            report = audit.verify(s)
            took = time.perf_counter() - t0
            stored = s.scalar(select(func.count()).select_from(AuditEvent))
    finally:
        engine.dispose()
    if not report.ok or report.events != expected or stored != expected:
        raise SystemExit(f"CHAIN CHECK FAILED: {report} (appends done: {expected}, rows: {stored})")
    return f"verify: chain intact, {report.events:,} events == appends done ({took:.1f}s)"


# --------------------------------------------------------------------------------------
# databases
# --------------------------------------------------------------------------------------
class PgDatabases:
    """A migrated template (with the plain table) and fresh copies of it, all dropped at close."""

    def __init__(self, admin_url: str):
        self.admin_url = admin_url
        self.prefix = f"bench_audit_{os.getpid()}"
        self.template = f"{self.prefix}_tpl"
        self.made: list[str] = []
        url = world.create_database(admin_url, self.template)
        self.made.append(self.template)
        engine = make_engine(url)
        try:
            upgrade(engine)
            plain_md.create_all(engine)
        finally:
            engine.dispose()

    def fresh(self) -> str:
        name = f"{self.prefix}_{len(self.made)}"
        admin = make_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as c:
                c.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"'))
        finally:
            admin.dispose()
        self.made.append(name)
        return world.with_database(self.admin_url, name)

    def drop(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        name = make_url(url).database
        world.drop_database(self.admin_url, name)
        if name in self.made:
            self.made.remove(name)

    def close(self) -> None:
        for name in reversed(self.made):
            world.drop_database(self.admin_url, name)
        self.made.clear()

    def settings(self) -> dict:
        engine = make_engine(self.admin_url)
        try:
            with engine.connect() as c:
                out = {k: c.execute(text(f"SHOW {k}")).scalar() for k in
                       ("server_version", "fsync", "synchronous_commit", "wal_sync_method",
                        "commit_delay", "shared_buffers", "data_directory")}
        except Exception:
            out = {}
        finally:
            engine.dispose()
        return out


class SqliteDatabases:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="bench_audit_"))
        self.template = self.dir / "template.sqlite"
        engine = make_engine(f"sqlite:///{self.template}")
        try:
            upgrade(engine)
            plain_md.create_all(engine)
        finally:
            engine.dispose()
        self.n = 0

    def fresh(self) -> str:
        self.n += 1
        path = self.dir / f"run{self.n}.sqlite"
        shutil.copy(self.template, path)
        return f"sqlite:///{path}"

    def drop(self, url: str) -> None:
        path = url.removeprefix("sqlite:///")
        for suffix in ("", "-wal", "-shm"):
            Path(path + suffix).unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def pg_test_fsync(data_directory: str | None) -> str:
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_test_fsync"))
    binary = binaries[-1] if binaries else shutil.which("pg_test_fsync")
    if not binary:
        return "pg_test_fsync: not found"
    base = Path(data_directory).parent if data_directory and Path(data_directory).parent.is_dir() else None
    d = tempfile.mkdtemp(prefix="bench_fsync_", dir=base)
    try:
        out = subprocess.run([binary, "-s", "2", "-f", os.path.join(d, "test.out")],
                             capture_output=True, text=True, timeout=300).stdout
    finally:
        shutil.rmtree(d, ignore_errors=True)
    one = out.split("using two 8kB writes")[0]
    m = re.search(r"fdatasync\s+([\d.]+) ops/sec\s+(\d+) usecs/op", one)
    if not m:
        return "pg_test_fsync: could not parse:\n" + out
    return (f"pg_test_fsync ({d.rsplit('/', 2)[0]}): fdatasync of one 8kB write "
            f"{float(m.group(1)):,.0f} ops/s ({m.group(2)} us/op)")


# --------------------------------------------------------------------------------------
CHAIN_MODES = ("chain", "chain1", "chain1ac")


def configs(kind: str, args) -> list[tuple]:
    """(label, mode, writers, batch, sync_off, seconds) of every run, in the order they run."""
    w = args.writers
    single_s = min(args.seconds, 5)
    out = [
        ("single writer, chain", "chain", 1, 1, False, single_s),
        ("single writer, plain", "plain", 1, 1, False, single_s),
        (f"{w} writers, chain", "chain", w, 1, False, args.seconds),
        (f"{w} writers, plain", "plain", w, 1, False, args.seconds),
    ]
    for n in [int(x) for x in args.sweep.split(",") if x]:
        out.append((f"sweep: {n} writers, chain", "chain", n, 1, False, args.seconds))
        out.append((f"sweep: {n} writers, plain", "plain", n, 1, False, args.seconds))
    if args.variants and kind == "postgresql":
        out += [
            (f"{w} writers, chain, sync_commit=off", "chain", w, 1, True, args.seconds),
            (f"{w} writers, plain, sync_commit=off", "plain", w, 1, True, args.seconds),
            (f"{w} writers, chain, 10 per txn", "chain", w, 10, False, args.seconds),
            ("single writer, one-statement", "chain1", 1, 1, False, single_s),
            (f"{w} writers, one-statement", "chain1", w, 1, False, args.seconds),
            (f"{w} writers, one-statement, sync=off", "chain1", w, 1, True, args.seconds),
            (f"{w} writers, one-statement, autocommit", "chain1ac", w, 1, False, args.seconds),
        ]
    return out


def bench_database(kind: str, dbs, args) -> list[dict]:
    """Every configuration --repeat times, interleaved (round 1 of all, then round 2, ...), so
    that background load hits every configuration alike; one summary row per configuration."""
    runs: dict[str, list[dict]] = {}
    plan = configs(kind, args)
    for rep in range(args.repeat):
        for label, mode, writers, batch, sync_off, seconds in plan:
            url = dbs.fresh()
            try:
                r = run_writers(url, mode, writers, seconds, batch, sync_off)
                msg = verify_chain(url, r["total"]) if mode in CHAIN_MODES else ""
            finally:
                dbs.drop(url)
            r.update(db=kind, label=label)
            runs.setdefault(label, []).append(r)
            err = f", {r['errors']} errors (last: {r['last_error']})" if r["errors"] else ""
            print(f"  {kind:<10} #{rep + 1} {label:<38} {r['rate']:9,.0f}/s  p50 {r['p50']:6.2f} ms  "
                  f"p95 {r['p95']:6.2f} ms{err}", flush=True)
            if msg:
                print(f"  {'':<13} {msg}", flush=True)
    rows = []
    for label, *_ in plan:
        rs = runs[label]
        med = {k: statistics.median(r[k] for r in rs)
               for k in ("rate", "p50", "p95", "append_p50", "commit_p50")}
        rows.append(dict(db=kind, label=label, **med, total=sum(r["total"] for r in rs),
                         errors=sum(r["errors"] for r in rs),
                         runs="/".join(f"{r['rate']:.0f}" for r in rs)))
    return rows


def summarize(rows: list[dict], writers: int) -> None:
    print()
    print("bench_audit: events/s (median over rounds; every round's value in 'runs'), latency per "
          "transaction (median of the rounds' p50/p95)")
    print(f"{'db':<10} {'run':<40} {'events/s':>9} {'runs':>18} {'p50 ms':>7} {'p95 ms':>7} "
          f"{'append() p50':>12} {'commit p50':>10} {'events':>8}")
    for r in rows:
        print(f"{r['db']:<10} {r['label']:<40} {r['rate']:9,.0f} {r['runs']:>18} {r['p50']:7.2f} "
              f"{r['p95']:7.2f} {r['append_p50']:12.2f} {r['commit_p50']:10.2f} {r['total']:8,}")
    print("append() = from the start of the transaction to the end of audit.append (incl. the wait "
          "for the head lock); commit = the end of the `with sessions.begin()` block (COMMIT and "
          "whatever the library does after it). Every chain run was checked with audit.verify.")
    for db in sorted({r["db"] for r in rows}):
        by = {r["label"]: r for r in rows if r["db"] == db}
        c, p_ = by.get(f"{writers} writers, chain"), by.get(f"{writers} writers, plain")
        if not c or not p_:
            continue
        line = (f"{db}: {writers} writers chain {c['rate']:,.0f}/s, plain {p_['rate']:,.0f}/s, "
                f"ratio plain/chain {p_['rate'] / c['rate']:.1f}")
        if db == "postgresql":
            line += f"; target >= {TARGET:,}/s: {'met' if c['rate'] >= TARGET else 'NOT met'}"
        print(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per run")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds over all configurations (interleaved); medians are reported")
    ap.add_argument("--db", default="postgresql,sqlite")
    ap.add_argument("--variants", action="store_true",
                    help="PostgreSQL what-ifs: synchronous_commit=off, 10 appends per transaction")
    ap.add_argument("--sweep", default="",
                    help="also run chain and plain with these writer counts, e.g. 1,2,4 "
                         "(shows whether the chain scales with writers)")
    ap.add_argument("--fsync-test", action="store_true", help="run pg_test_fsync next to the data directory")
    ap.add_argument("--pg-url", default=None, help="PostgreSQL server (default $LABVAULT_TEST_POSTGRES_URL)")
    args = ap.parse_args(argv)
    world.install_signal_handlers()
    kinds = args.db.split(",")
    for k in kinds:
        if k not in ("postgresql", "sqlite"):
            raise SystemExit(f"unknown database {k!r}")
    print(f"bench_audit: python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{args.writers} writer processes, {args.seconds:g}s per run", flush=True)
    rows: list[dict] = []
    for kind in kinds:
        if kind == "postgresql":
            dbs = PgDatabases(world.postgres_admin_url(args.pg_url))
            try:
                st = dbs.settings()
                print("  postgresql: " + ", ".join(f"{k}={v}" for k, v in st.items() if k != "data_directory"))
                if args.fsync_test:
                    print("  " + pg_test_fsync(st.get("data_directory")), flush=True)
                rows += bench_database(kind, dbs, args)
            finally:
                dbs.close()
        else:
            dbs = SqliteDatabases()
            try:
                print("  sqlite: WAL, synchronous=NORMAL, BEGIN IMMEDIATE (labvault.datastore.db)")
                rows += bench_database(kind, dbs, args)
            finally:
                dbs.close()
    summarize(rows, args.writers)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
