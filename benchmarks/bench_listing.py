#!/usr/bin/env python3
"""Latency of "the experiments this user may see" on generated worlds of 10k..1M experiments.

    scripts/with-postgres .venv/bin/python benchmarks/bench_listing.py \
        [--sizes 10000,100000,1000000] [--db sqlite,postgresql] [--queries 200] [--repeat 3]

For each database and world size (benchmarks/world.py; SQLite worlds are cached under
benchmarks/out/, PostgreSQL worlds are COPYed into a fresh database and dropped afterwards),
the probe users (each able to see ~100 experiments) are asked round-robin, ``--queries`` per
round, ``--repeat`` rounds:

    labvault  load_subject(session, user, now) + session.execute(visible_experiments(subject,
              now)).scalars().all() in a fresh ORM Session; reported as
              "subject" (load_subject), "sql" (build + execute + fetch the Experiment rows) and
              "total" (both).
    list_visible  where the library has it, access.list_visible(session, user_id, now): the
              service's listing, one statement built once (state and vendor checked in SQL).
    baseline  a minimal hand-written indexed SQL query (direct grants + facility window +
              department membership only) on a plain DBAPI connection, fetching the same
              columns. Ratio = labvault / baseline.

p50/p95 are per round; the table shows the median over rounds. Rows returned are counted
(~100 per probe for labvault). ``--check`` (default for sizes <= 100k) first proves, for every
probe, that the SQL returns exactly the experiments ``labvault.policies.decide`` allows.
``--explain`` prints EXPLAIN (ANALYZE, BUFFERS) (PostgreSQL) / EXPLAIN QUERY PLAN (SQLite) of
one probe's listing. No pass/fail timing asserts.
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import world  # noqa: E402
from sqlalchemy import Engine, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from labvault import policies as p  # noqa: E402
from labvault.datastore import access  # noqa: E402
from labvault.datastore.access import (  # noqa: E402
    load_subject,
    visible_experiment_ids,
    visible_experiments,
)
from labvault.datastore.db import make_engine  # noqa: E402
from labvault.datastore.models import Experiment, experiment_projects  # noqa: E402

NOW = world.NOW
TARGET_P50_MS = 3.0

EXP_COLUMNS = ", ".join(f"e.{c}" for c in world.COLUMNS["experiments"])
# The baseline: what a hand-written listing of direct grants + facility window + department
# membership looks like (no PI, project or public branch, no vendor filter, no ORM).
BASELINE_SQL = f"""
SELECT {EXP_COLUMNS} FROM experiments e JOIN (
    SELECT g.experiment_id AS id FROM role_grants g JOIN experiments x ON x.id = g.experiment_id
     WHERE g.user_id = {{uid}} AND g.experiment_id IS NOT NULL
       AND (g.revoked_at IS NULL OR g.revoked_at > {{now}})
       AND (g.expires_at IS NULL OR g.expires_at > {{now}})
       AND (g.role <> 'facility_staff' OR x.end_at IS NULL OR x.end_at > {{cutoff}})
    UNION
    SELECT x.id FROM experiments x
     WHERE x.proprietary = {{false}} AND x.department_id IN (
           SELECT department_id FROM users WHERE id = {{uid}}
           UNION
           SELECT department_id FROM department_memberships
            WHERE user_id = {{uid}} AND (revoked_at IS NULL OR revoked_at > {{now}}))
) v ON e.id = v.id
ORDER BY e.exid
"""


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


@dataclass
class Target:
    db: str
    size: int
    url: str
    meta: dict
    cleanup: object = None  # callable


class Baseline:
    """The hand-written query on a plain DBAPI connection (autocommit, no ORM)."""

    def __init__(self, target: Target):
        self.db = target.db
        cutoff = p.default_policy().facility_cutoff(NOW)
        if target.db == "sqlite":
            self.conn = sqlite3.connect(make_url(target.url).database, isolation_level=None)
            self.sql = BASELINE_SQL.format(uid=":uid", now=":now", cutoff=":cutoff", false="0")
            self.params = {"now": world.day(0), "cutoff": world.day(-world.FACILITY_DAYS)}
        else:
            import psycopg

            u = make_url(target.url)
            self.conn = psycopg.connect(
                host=u.host, port=u.port, user=u.username, password=u.password,
                dbname=u.database, autocommit=True)
            self.sql = BASELINE_SQL.format(uid="%(uid)s", now="%(now)s", cutoff="%(cutoff)s", false="false")
            self.params = {"now": NOW.replace(tzinfo=None), "cutoff": cutoff.replace(tzinfo=None)}

    def run(self, uid: int) -> tuple[int, int]:
        t0 = time.perf_counter_ns()
        cur = self.conn.execute(self.sql, self.params | {"uid": uid})
        rows = cur.fetchall()
        return time.perf_counter_ns() - t0, len(rows)

    def explain(self, uid: int) -> str:
        if self.db == "sqlite":
            rows = self.conn.execute("EXPLAIN QUERY PLAN " + self.sql, self.params | {"uid": uid}).fetchall()
            return "\n".join(str(r) for r in rows)
        rows = self.conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + self.sql, self.params | {"uid": uid}).fetchall()
        return "\n".join(r[0] for r in rows)

    def close(self):
        self.conn.close()


def labvault_once(engine: Engine, uid: int) -> tuple[int, int, int]:
    """(ns load_subject, ns build+execute+fetch, rows) in a fresh Session, as a request would."""
    with Session(engine) as s:
        t0 = time.perf_counter_ns()
        subject = load_subject(s, uid, NOW)
        t1 = time.perf_counter_ns()
        rows = s.execute(visible_experiments(subject, NOW)).scalars().all()
        t2 = time.perf_counter_ns()
    return t1 - t0, t2 - t1, len(rows)


# --------------------------------------------------------------------------------------
# What-ifs (--what-if): proposals measured here, not library code.
# --------------------------------------------------------------------------------------
WHATIF_INDEX = "bench_whatif_ix_projects_pi_id"


def add_projects_pi_index(engine: Engine) -> None:
    """projects.pi_id has no index: both load_subject and the project branch of
    visible_experiment_ids scan the whole projects table (it grows with the world)."""
    with engine.begin() as c:
        c.execute(text(f"CREATE INDEX IF NOT EXISTS {WHATIF_INDEX} ON projects (pi_id)"))
        c.execute(text("ANALYZE projects"))


def drop_projects_pi_index(engine: Engine) -> None:
    with engine.begin() as c:
        c.execute(text(f"DROP INDEX IF EXISTS {WHATIF_INDEX}"))


_BOUND: dict[bool, object] = {}


def _bound_statement(vendor: bool):
    """visible_experiments() built ONCE with bind parameters (:uid, :now, :cutoff) instead of
    rebuilding the whole SELECT (six unions, ~40 clauses) for every request. It is the library's
    own query: visible_experiments() is handed bind parameters where it expects values."""
    stmt = _BOUND.get(vendor)
    if stmt is None:
        from sqlalchemy import Integer, bindparam

        from labvault.datastore.models import UTCDateTime

        uid = bindparam("uid", type_=Integer)
        now = bindparam("now", type_=UTCDateTime())
        cutoff = bindparam("cutoff", type_=UTCDateTime())

        class _Cutoff:  # policy.facility_cutoff(now) -> the :cutoff parameter
            @staticmethod
            def facility_cutoff(_now):
                return cutoff

        subject = p.Subject(user_id=uid, is_vendor=vendor)  # type: ignore[arg-type]
        stmt = visible_experiments(subject, now, policy=_Cutoff())  # type: ignore[arg-type]
        _BOUND[vendor] = stmt
    return stmt


def proposed_once(engine: Engine, uid: int) -> tuple[int, int, int]:
    """The proposal: one query for what the listing needs of the user (state, vendor) and the
    bound statement; the same Experiment rows as visible_experiments()."""
    from labvault.datastore.models import Institution, User

    cutoff = p.default_policy().facility_cutoff(NOW)
    with Session(engine) as s:
        t0 = time.perf_counter_ns()
        row = s.execute(select(User.state, Institution.is_vendor)
                        .outerjoin(Institution, Institution.id == User.institution_id)
                        .where(User.id == uid)).one()
        t1 = time.perf_counter_ns()
        if row.state.value != "active":
            rows = []
        else:
            rows = s.execute(_bound_statement(bool(row.is_vendor)),
                             {"uid": uid, "now": NOW, "cutoff": cutoff}).scalars().all()
        t2 = time.perf_counter_ns()
    return t1 - t0, t2 - t1, len(rows)


def list_visible_once(engine: Engine, uid: int) -> tuple[int, int, int]:
    """The service's listing (datastore/service/handlers.py) where the library has it:
    ``access.list_visible(session, user_id, now)``, one statement; nothing loaded before."""
    with Session(engine) as s:
        t0 = time.perf_counter_ns()
        rows = access.list_visible(s, uid, NOW)
        t1 = time.perf_counter_ns()
    return 0, t1 - t0, len(rows)


def check_list_visible(engine: Engine, probes: list[int]) -> str:
    with Session(engine) as s:
        for uid in probes:
            subject = load_subject(s, uid, NOW)
            a = [e.id for e in s.execute(visible_experiments(subject, NOW)).scalars()]
            b = [e.id for e in access.list_visible(s, uid, NOW)]
            if a != b:
                raise SystemExit(f"list_visible differs from visible_experiments for user {uid}")
    return f"check: list_visible == visible_experiments() for {len(probes)} probes"


def has_projects_pi_index(engine: Engine) -> bool:
    from sqlalchemy import inspect

    return any(ix["column_names"] == ["pi_id"] for ix in inspect(engine).get_indexes("projects"))


def check_proposed(engine: Engine, probes: list[int]) -> str:
    """The proposal returns exactly the library's rows, in the same order, for every probe."""
    cutoff = p.default_policy().facility_cutoff(NOW)
    with Session(engine) as s:
        for uid in probes:
            subject = load_subject(s, uid, NOW)
            a = [e.id for e in s.execute(visible_experiments(subject, NOW)).scalars()]
            b = [e.id for e in s.execute(_bound_statement(subject.is_vendor),
                                         {"uid": uid, "now": NOW, "cutoff": cutoff}).scalars()]
            if a != b:
                raise SystemExit(f"proposed listing differs from visible_experiments for user {uid}")
    return f"check: proposed == visible_experiments() for {len(probes)} probes"


def explain_labvault(engine: Engine, uid: int, label: str = "labvault") -> str:
    with Session(engine) as s:
        if label == "list_visible":  # the statement list_visible() executes, with its values
            cutoff = p.default_policy().facility_cutoff(NOW)
            stmt = access._listing_statement().params(uid=uid, now=NOW, cutoff=cutoff)
        else:
            subject = load_subject(s, uid, NOW)
            stmt = visible_experiments(subject, NOW)
        sql = str(stmt.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
        if engine.dialect.name == "sqlite":
            rows = s.execute(text("EXPLAIN QUERY PLAN " + sql)).all()
            return "\n".join(str(tuple(r)) for r in rows)
        rows = s.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + sql)).all()
        return "\n".join(r[0] for r in rows)


def check_against_policy(engine: Engine, probes: list[int]) -> str:
    """Every probe: SQL-visible ids == ids decide() allows over all experiments."""
    with Session(engine) as s:
        links: dict[int, set[int]] = defaultdict(set)
        for pid, eid in s.execute(select(experiment_projects.c.project_id, experiment_projects.c.experiment_id)):
            links[eid].add(pid)
        E = Experiment
        exps = [
            p.Experiment(id=r.id, exid=r.exid, pi_id=r.pi_id, institution_id=r.institution_id,
                         department_id=r.department_id, project_ids=frozenset(links.get(r.id, ())),
                         proprietary=r.proprietary, public=r.public, start_at=r.start_at,
                         end_at=r.end_at, status=r.status, archived_at=r.archived_at,
                         retain_until=r.retain_until, deleted_at=r.deleted_at)
            for r in s.execute(select(E.id, E.exid, E.pi_id, E.institution_id, E.department_id,
                                      E.proprietary, E.public, E.start_at, E.end_at, E.status,
                                      E.archived_at, E.retain_until, E.deleted_at))
        ]
        sizes = []
        for uid in probes:
            subject = load_subject(s, uid, NOW)
            want = {e.id for e in exps if p.decide(subject, "read", e, NOW).allowed}
            got = set(s.scalars(visible_experiment_ids(subject, NOW)))
            if want != got:
                raise SystemExit(
                    f"check FAILED for user {uid}: SQL-only {sorted(got - want)[:10]}, "
                    f"policy-only {sorted(want - got)[:10]}")
            sizes.append(len(got))
    return f"check: SQL == decide() for {len(probes)} probes over {len(exps):,} experiments " \
           f"(visible min/median/max {min(sizes)}/{statistics.median(sizes):g}/{max(sizes)})"


def prepare(db: str, size: int, pg_admin: str | None) -> Target:
    if db == "sqlite":
        path, meta = world.build_sqlite(size)
        return Target(db, size, f"sqlite:///{path}", meta)
    name, url, meta = world.build_postgres(size, pg_admin)
    return Target(db, size, url, meta, cleanup=lambda: world.drop_database(pg_admin, name))


def measure(target: Target, args, label: str, listing) -> dict:
    engine = make_engine(target.url)
    base = Baseline(target)
    probes = target.meta["probes"]
    out: dict = {"db": target.db, "size": target.size, "variant": label}
    try:
        if label == "labvault" and (args.check == "always" or (args.check == "auto" and target.size <= 100_000)):
            print("  " + check_against_policy(engine, probes), flush=True)
        if label.startswith("proposed"):
            print("  " + check_proposed(engine, probes), flush=True)
        if label == "list_visible":
            print("  " + check_list_visible(engine, probes), flush=True)
        # warm up: every probe once on both sides (statement caches, pool, page cache)
        for uid in probes:
            listing(engine, uid)
            base.run(uid)
        rounds = defaultdict(list)
        rows_lv: dict[int, int] = {}
        rows_base: dict[int, int] = {}
        for r in range(args.repeat):
            samples = defaultdict(list)
            for i in range(args.queries):
                uid = probes[(i + r) % len(probes)]
                # alternate the order so that neither side always runs on a warmer cache
                if i % 2:
                    b_ns, b_rows = base.run(uid)
                    subj_ns, sql_ns, n = listing(engine, uid)
                else:
                    subj_ns, sql_ns, n = listing(engine, uid)
                    b_ns, b_rows = base.run(uid)
                samples["subject"].append(subj_ns / 1e6)
                samples["sql"].append(sql_ns / 1e6)
                samples["total"].append((subj_ns + sql_ns) / 1e6)
                samples["baseline"].append(b_ns / 1e6)
                rows_lv[uid] = n
                rows_base[uid] = b_rows
            for k, v in samples.items():
                rounds[f"{k}_p50"].append(_pct(v, 0.5))
                rounds[f"{k}_p95"].append(_pct(v, 0.95))
        for k, v in rounds.items():
            out[k] = statistics.median(v)
        # the floor of any ORM statement here: one SELECT 1 round trip through a Session
        rtt = []
        with Session(engine) as s:
            for _ in range(200):
                t0 = time.perf_counter_ns()
                s.execute(text("SELECT 1")).scalar()
                rtt.append((time.perf_counter_ns() - t0) / 1e6)
        out["rtt_p50"] = _pct(rtt, 0.5)
        lv = sorted(rows_lv.values())
        bs = sorted(rows_base.values())
        out["rows"] = (lv[0], statistics.median(lv), lv[-1])
        out["rows_base"] = (bs[0], statistics.median(bs), bs[-1])
        out["queries"] = args.queries * args.repeat
        explain = args.explain == "all" or (args.explain == "largest" and target.size == max(args.size_list))
        if explain and label in ("labvault", "+pi_id index", "list_visible"):
            uid = probes[1]
            print(f"  --- EXPLAIN {label} ({target.db}, {target.size:,}, user {uid}) ---")
            print("  " + explain_labvault(engine, uid, label).replace("\n", "\n  "))
            if label == "labvault":
                print(f"  --- EXPLAIN baseline ({target.db}, {target.size:,}, user {uid}) ---")
                print("  " + base.explain(uid).replace("\n", "\n  "))
    finally:
        base.close()
        engine.dispose()
    return out


def report(results: list[dict]) -> None:
    print()
    print("bench_listing: ms per listing, p50 / p95 (median over rounds); rows min/median/max "
          "per probe")
    hdr = (f"{'db':<10} {'experiments':>11} {'variant':<16} {'subject p50':>11} {'sql p50':>8} "
           f"{'sql p95':>8} {'total p50':>9} {'total p95':>9} {'base p50':>8} {'base p95':>8} "
           f"{'ratio':>6} {'sql/base':>8} {'rtt':>5} {'rows':>12} {'base rows':>12}")
    print(hdr)
    for r in results:
        ratio = r["total_p50"] / r["baseline_p50"]
        sql_ratio = r["sql_p50"] / r["baseline_p50"]
        rows = "/".join(f"{x:g}" for x in r["rows"])
        brows = "/".join(f"{x:g}" for x in r["rows_base"])
        print(f"{r['db']:<10} {r['size']:>11,} {r['variant']:<16} {r['subject_p50']:>11.2f} "
              f"{r['sql_p50']:>8.2f} {r['sql_p95']:>8.2f} {r['total_p50']:>9.2f} "
              f"{r['total_p95']:>9.2f} {r['baseline_p50']:>8.2f} {r['baseline_p95']:>8.2f} "
              f"{ratio:>6.1f} {sql_ratio:>8.1f} {r['rtt_p50']:>5.2f} {rows:>12} {brows:>12}")
    print("ratio = total p50 / baseline p50; sql/base = sql p50 / baseline p50. sql = build + "
          "execute + fetch ORM rows; subject = load_subject (proposed: one state/vendor query); "
          "rtt = p50 of one SELECT 1 through a Session (the cost of any round trip here).")
    for db in sorted({r["db"] for r in results}):
        for variant in ("labvault", "list_visible"):
            rs = sorted((r for r in results if r["db"] == db and r["variant"] == variant),
                        key=lambda r: r["size"])
            if not rs:
                continue
            big = rs[-1]
            verdict = "met" if big["total_p50"] <= TARGET_P50_MS else "NOT met"
            growth = big["total_p50"] / rs[0]["total_p50"]
            print(f"{variant}: target p50 <= {TARGET_P50_MS} ms at the largest size ({db}, "
                  f"{big['size']:,}): {verdict} ({big['total_p50']:.2f} ms total, "
                  f"{big['sql_p50']:.2f} ms sql); total p50 {rs[0]['size']:,} -> {big['size']:,}: "
                  f"x{growth:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated world sizes")
    ap.add_argument("--db", default="sqlite,postgresql", help="sqlite,postgresql")
    ap.add_argument("--queries", type=int, default=200, help="listings per round (>= 200)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported")
    ap.add_argument("--check", choices=["auto", "always", "never"], default="auto",
                    help="compare SQL with decide() for every probe (auto: sizes <= 100k)")
    ap.add_argument("--explain", choices=["none", "largest", "all"], default="largest",
                    help="print the query plans (default: at the largest size)")
    ap.add_argument("--pg-url", default=None,
                    help="PostgreSQL server (default $LABVAULT_TEST_POSTGRES_URL); a database "
                         "bench_world_<size>_<pid> is created there and dropped afterwards")
    ap.add_argument("--what-if", default="",
                    help="comma-separated proposals to measure as well: 'index' (an index on "
                         "projects.pi_id, created for the run and dropped afterwards), 'proposed' "
                         "(visible_experiments built once with bind parameters + a one-query "
                         "subject); see the functions of the same names")
    args = ap.parse_args(argv)
    world.install_signal_handlers()
    args.what_if = {w for w in args.what_if.split(",") if w}
    if args.what_if - {"index", "proposed"}:
        raise SystemExit(f"unknown --what-if {sorted(args.what_if - {'index', 'proposed'})}")
    args.size_list = [int(s.replace("_", "")) for s in args.sizes.split(",")]
    dbs = args.db.split(",")
    for db in dbs:
        if db not in ("sqlite", "postgresql"):
            raise SystemExit(f"unknown database {db!r}")
    pg_admin = world.postgres_admin_url(args.pg_url) if "postgresql" in dbs else None
    print(f"bench_listing: python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"sizes {args.size_list}, {args.queries} queries x {args.repeat} rounds, now={NOW:%Y-%m-%d}")
    results = []
    for db in dbs:
        for size in args.size_list:
            t0 = time.perf_counter()
            target = prepare(db, size, pg_admin)
            print(f"{db} {size:,}: world ready in {time.perf_counter() - t0:.1f}s", flush=True)
            try:
                variants = [("labvault", labvault_once, None)]
                if hasattr(access, "list_visible"):
                    variants.append(("list_visible", list_visible_once, None))
                e = make_engine(target.url)
                try:
                    indexed = has_projects_pi_index(e)
                finally:
                    e.dispose()
                if "index" in args.what_if:
                    if indexed:
                        print("  --what-if index: projects.pi_id is already indexed by the "
                              "migrations; nothing to add", flush=True)
                    else:
                        variants.append(("+pi_id index", labvault_once, add_projects_pi_index))
                if "proposed" in args.what_if:
                    label = "proposed+index" if ("index" in args.what_if or indexed) else "proposed"
                    variants.append((label, proposed_once, None))
                for label, listing, setup in variants:
                    if setup:
                        e = make_engine(target.url)
                        try:
                            setup(e)
                        finally:
                            e.dispose()
                    res = measure(target, args, label, listing)
                    results.append(res)
                    print(f"{db} {size:,} {label}: total p50 {res['total_p50']:.2f} ms, sql p50 "
                          f"{res['sql_p50']:.2f} ms, baseline p50 {res['baseline_p50']:.2f} ms, "
                          f"rows {res['rows']}", flush=True)
            finally:
                if "index" in args.what_if and not target.cleanup:  # the cached SQLite world
                    e = make_engine(target.url)
                    try:
                        drop_projects_pi_index(e)
                    finally:
                        e.dispose()
                if target.cleanup:
                    target.cleanup()
    report(results)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
