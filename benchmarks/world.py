#!/usr/bin/env python3
"""A generated labvault world of N experiments, loaded fast into SQLite or PostgreSQL.

    .venv/bin/python benchmarks/world.py --size 100000 [--db sqlite,postgresql] [--check]

Shape (all counts scale with N, so that what one user can see does not):

- institutions: max(6, N/5000): #1 is the vendor, ~10% are facilities, the rest universities
  (a few unverified); 2 licences each.
- departments: max(institutions, N/200) -> ~200 experiments per department at every size.
- users: N/10 (>= 200), ~95% active; a user's department (and so institution) is fixed;
  10% hold one extra department membership (30% with modify, 5% revoked).
- projects: max(20, N/100), each with a PI and 5 project viewer grants; 30% of experiments are
  linked to one project and 10% to two (~50 experiments per project).
- experiments 1..N: PI = a random user, department/institution = the PI's; 70% proprietary;
  30% running (no end), 10% ended within the last 29 days, 60% ended 60 days to 5 years ago
  (archived when older than a year). Facility experiments: the recently ended ones and 1 in 6
  of the long-ago ones (~10% of N, out of the 30-day window) carry a facility_staff grant.
- role grants: 10 per experiment (1 manager, 3 writer, 5 viewer, and either a facility_staff
  grant given to a facility institution's user or one more viewer); 3% revoked, 5% expired,
  5% expiring in the future. Total ~10 N.
- public: a fixed 10 non-proprietary experiments, whatever N (every user sees every public
  experiment, so their number is a floor of every listing).
- probes: the last 40 users (never picked by the random assignments above), each able to see
  ~100 experiments: a department (home department for even probes; an active membership plus
  a revoked one for odd probes; ~60 non-proprietary experiments), 20 direct grants (+3 revoked,
  +2 expired), 5 facility grants inside the window (+5 after it), one project grant (~15
  non-proprietary experiments), PI of 5 experiments, and the 10 public ones. Probes 0 and 20
  belong to the vendor institution (their direct grants are on non-proprietary experiments).

"now" is fixed (NOW = 2026-11-22 12:00 UTC) so that cached worlds stay valid. Generation is
deterministic (seeded), so the SQLite and PostgreSQL worlds of one size are identical.

Loading: SQLite via executemany of plain INSERTs, one transaction per table, into a database
migrated by ``labvault.datastore.migrate.upgrade`` (all of the migration's indexes and triggers
stay in place), then ANALYZE; cached as
benchmarks/out/world-<N>-v<version>-<migration head>-<digest of the migration files>.sqlite.
PostgreSQL via psycopg COPY into a fresh migrated database (``CREATE DATABASE bench_world_...``),
with ``session_replication_role = replica`` during the COPY when allowed (skips the per-row
foreign-key triggers; the generator's foreign keys are checked on SQLite with ``--check``),
then ANALYZE. PostgreSQL worlds are not cached: drop them with :func:`drop_postgres`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sqlite3
import sys
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import cache
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url

from labvault.datastore.db import make_engine, normalise_url
from labvault.datastore.migrate import head_revision, upgrade

WORLD_VERSION = 1
SEED = 20261122
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
N_PROBES = 40
N_PUBLIC = 10
FACILITY_DAYS = 30  # the policy default; the world places experiments well away from the edge
OUT = Path(__file__).resolve().parent / "out"

# experiment end categories
RUNNING, RECENT, OLD = 0, 1, 2


@cache
def day(offset: int) -> str:
    """NOW + offset days as the naive-UTC text both databases store ('YYYY-MM-DD HH:MM:SS.ffffff',
    SQLAlchemy's SQLite DateTime format; PostgreSQL parses it as a timestamp)."""
    return (NOW + timedelta(days=offset)).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


COLUMNS = {
    "institutions": ["id", "name", "verified", "is_vendor", "is_facility", "created_at"],
    "licences": ["id", "institution_id", "product", "valid_until", "seats"],
    "departments": ["id", "name", "institution_id", "virtual", "pi_id", "created_at"],
    "users": ["id", "name", "display_name", "institution_id", "department_id", "email",
              "email_visible", "institutional_email", "institutional_email_verified_at", "orcid",
              "phone", "state", "is_admin", "under_18", "last_login_ip", "last_login_at",
              "created_at", "confirmed_at", "deactivated_at", "closed_at", "anonymised_at"],
    "department_memberships": ["id", "user_id", "department_id", "can_modify", "granted_by_id",
                               "granted_at", "revoked_at"],
    "projects": ["id", "name", "institution_id", "pi_id", "status", "created_at"],
    "experiments": ["id", "exid", "title", "pi_id", "institution_id", "facility", "department_id",
                    "start_at", "end_at", "proprietary", "public", "mirror_agreed", "status",
                    "archived_at", "retain_until", "deleted_at", "deleted_reason",
                    "created_by_id", "created_at"],
    "experiment_projects": ["project_id", "experiment_id"],
    "role_grants": ["id", "user_id", "experiment_id", "project_id", "department_id", "role",
                    "granted_by_id", "granted_at", "expires_at", "revoked_at", "revoked_by_id"],
}
TABLE_ORDER = list(COLUMNS)  # foreign-key order


@dataclass
class Probe:
    user_id: int
    vendor: bool
    department_id: int  # home department (even probes) or membership (odd probes)
    home: bool
    revoked_department_id: int | None
    project_id: int
    pi_of: list[int] = field(default_factory=list)
    grants: list[int] = field(default_factory=list)  # active direct grants
    dead_grants: list[int] = field(default_factory=list)  # revoked or expired
    facility_in: list[int] = field(default_factory=list)
    facility_out: list[int] = field(default_factory=list)


class World:
    """The deterministic world of ``n`` experiments: attributes in compact arrays, rows on demand."""

    def __init__(self, n: int, seed: int = SEED):
        if n < 1000:
            raise ValueError("a world needs at least 1000 experiments")
        self.n = n
        self.seed = seed
        self.n_inst = max(6, n // 5000)
        self.n_fac = max(1, self.n_inst // 10)
        self.n_dep = max(self.n_inst, n // 200)
        self.n_users = max(200, n // 10)
        self.n_regular = self.n_users - N_PROBES
        self.n_proj = max(20, n // 100)
        rng = random.Random(f"{seed}/{n}/attributes")

        # institutions: 1 vendor, 2..1+n_fac facilities, the rest universities
        self.dep_inst = array("i", [0]) + array("i", ((d - 1) % self.n_inst + 1 for d in range(1, self.n_dep + 1)))
        self.user_dep = array("i", [0]) + array("i", ((u - 1) % self.n_dep + 1 for u in range(1, self.n_users + 1)))
        self.facility_users = [u for u in range(1, self.n_regular + 1)
                               if 2 <= self.dep_inst[self.user_dep[u]] <= 1 + self.n_fac]
        self.proj_pi = array("i", [0]) + array("i", (rng.randint(1, self.n_regular) for _ in range(self.n_proj)))

        # experiments
        self.exp_pi = array("i", bytes(4 * (n + 1)))
        self.exp_cat = bytearray(n + 1)
        self.exp_end = array("i", bytes(4 * (n + 1)))  # day offset (RUNNING: unused)
        self.exp_start = array("i", bytes(4 * (n + 1)))
        self.exp_prop = bytearray(n + 1)
        self.exp_fac = bytearray(n + 1)  # carries a facility_staff grant
        for e in range(1, n + 1):
            self.exp_pi[e] = rng.randint(1, self.n_regular)
            self.exp_prop[e] = rng.random() < 0.7
            r = rng.random()
            if r < 0.3:
                self.exp_cat[e] = RUNNING
                self.exp_start[e] = -rng.randint(0, 200)
            elif r < 0.4:
                self.exp_cat[e] = RECENT
                self.exp_end[e] = -rng.randint(0, FACILITY_DAYS - 2)
                self.exp_start[e] = self.exp_end[e] - rng.randint(1, 30)
                self.exp_fac[e] = 1
            else:
                self.exp_cat[e] = OLD
                self.exp_end[e] = -rng.randint(60, 1800)
                self.exp_start[e] = self.exp_end[e] - rng.randint(1, 30)
                self.exp_fac[e] = rng.random() < 1 / 6
        self.public: list[int] = []
        for e in range(1, n + 1):
            if not self.exp_prop[e]:
                self.public.append(e)
                if len(self.public) == N_PUBLIC:
                    break

        # probes: the last N_PROBES users, never picked above (rng.randint(1, n_regular))
        self.probes: list[Probe] = []
        taken_depts: set[int] = set()
        vendor_depts = [d for d in range(1, self.n_dep + 1) if self.dep_inst[d] == 1]
        other_depts = [d for d in range(1, self.n_dep + 1) if self.dep_inst[d] != 1]
        projects = rng.sample(range(1, self.n_proj + 1), min(N_PROBES, self.n_proj))
        for k in range(N_PROBES):
            vendor = k % 20 == 0
            pool = vendor_depts if vendor else other_depts
            dept = rng.choice([d for d in pool if d not in taken_depts] or pool)
            taken_depts.add(dept)
            revoked = None if k % 2 == 0 else rng.choice([d for d in other_depts if d != dept])
            self.probes.append(Probe(
                user_id=self.n_regular + 1 + k, vendor=vendor, department_id=dept,
                home=k % 2 == 0, revoked_department_id=revoked,
                project_id=projects[k % len(projects)],
            ))
        used: set[int] = set(self.public)

        def pick(cond=lambda e: True) -> int:
            while True:
                e = rng.randint(1, n)
                if e not in used and cond(e):
                    used.add(e)
                    return e

        for pr in self.probes:
            non_prop = (lambda e: not self.exp_prop[e]) if pr.vendor else (lambda e: True)
            for _ in range(5):
                e = pick()
                pr.pi_of.append(e)
                self.exp_pi[e] = pr.user_id
            pr.grants = [pick(non_prop) for _ in range(20)]
            pr.dead_grants = [pick() for _ in range(5)]
            pr.facility_in = [pick(lambda e: self.exp_cat[e] == RECENT) for _ in range(5)]
            pr.facility_out = [pick(lambda e: self.exp_cat[e] == OLD) for _ in range(5)]
        self.probe_by_user = {pr.user_id: pr for pr in self.probes}

    # ----------------------------------------------------------------------------------
    def user_department(self, u: int) -> int | None:
        pr = self.probe_by_user.get(u)
        if pr is not None:
            return pr.department_id if pr.home else None
        return self.user_dep[u]

    def user_institution(self, u: int) -> int:
        pr = self.probe_by_user.get(u)
        if pr is not None:
            return self.dep_inst[pr.department_id]
        return self.dep_inst[self.user_dep[u]]

    def meta(self) -> dict:
        return {
            "version": WORLD_VERSION, "seed": self.seed, "experiments": self.n,
            "institutions": self.n_inst, "departments": self.n_dep, "users": self.n_users,
            "projects": self.n_proj, "public": self.public, "now": NOW.isoformat(),
            "probes": [pr.user_id for pr in self.probes],
            "vendor_probes": [pr.user_id for pr in self.probes if pr.vendor],
        }

    # ----------------------------------------------------------------------------------
    # rows (tuples in COLUMNS order); booleans are 0/1, times are text (see day())
    # ----------------------------------------------------------------------------------
    def rows(self, table: str) -> Iterator[tuple]:
        return getattr(self, f"_rows_{table}")(random.Random(f"{self.seed}/{self.n}/{table}"))

    def tables(self) -> Iterator[tuple[str, list[str], Iterable[tuple]]]:
        for t in TABLE_ORDER:
            yield t, COLUMNS[t], self.rows(t)

    def _rows_institutions(self, rng):
        created = day(-3000)
        for i in range(1, self.n_inst + 1):
            if i == 1:
                yield (i, "DetectorCo Ltd. (vendor)", 1, 1, 0, created)
            elif i <= 1 + self.n_fac:
                yield (i, f"Light Source {i}", 1, 0, 1, created)
            else:
                yield (i, f"University {i}", int(rng.random() < 0.95), 0, 0, created)

    def _rows_licences(self, rng):
        lid = 0
        for i in range(1, self.n_inst + 1):
            for product in ("detectorco-analysis", "matlab"):
                lid += 1
                yield (lid, i, product, day(rng.randint(-30, 700)), rng.randint(5, 200))

    def _rows_departments(self, rng):
        for d in range(1, self.n_dep + 1):
            yield (d, f"Department {d}", self.dep_inst[d], int(rng.random() < 0.05), None, day(-2900))

    def _rows_users(self, rng):
        states = ["active"] * 95 + ["tentative"] * 2 + ["deactivated"] * 2 + ["closed"]
        for u in range(1, self.n_users + 1):
            probe = u in self.probe_by_user
            state = "active" if probe else states[rng.randrange(100)]
            created = -rng.randint(1, 2500)
            yield (
                u, f"u{u}" if not probe else f"probe{u}", f"User {u}", self.user_institution(u),
                self.user_department(u), f"u{u}@example.org", 0, f"u{u}@inst.example",
                day(created + 1) if state != "tentative" else None, None, None, state,
                int(u == 1), 0, "192.0.2.1", day(-rng.randint(0, 60)), day(created),
                day(created + 1) if state != "tentative" else None,
                day(created + 100) if state == "deactivated" else None,
                day(created + 200) if state == "closed" else None, None,
            )

    def _rows_department_memberships(self, rng):
        mid = 0
        for u in range(1, self.n_regular + 1):
            if rng.random() < 0.10:
                mid += 1
                revoked = day(-rng.randint(1, 300)) if rng.random() < 0.05 else None
                yield (mid, u, rng.randint(1, self.n_dep), int(rng.random() < 0.3), 1,
                       day(-rng.randint(300, 2000)), revoked)
        for pr in self.probes:
            if not pr.home:
                mid += 1
                yield (mid, pr.user_id, pr.department_id, 0, 1, day(-400), None)
                mid += 1
                yield (mid, pr.user_id, pr.revoked_department_id, 0, 1, day(-400), day(-10))

    def _rows_projects(self, rng):
        for j in range(1, self.n_proj + 1):
            pi = self.proj_pi[j]
            yield (j, f"Project {j}", self.user_institution(pi), pi, "active", day(-rng.randint(100, 2000)))

    def _rows_experiments(self, rng):
        public = set(self.public)
        for e in range(1, self.n + 1):
            pi = self.exp_pi[e]
            dept = self.user_department(pi)
            inst = self.user_institution(pi)
            start = self.exp_start[e]
            cat = self.exp_cat[e]
            end = None if cat == RUNNING else self.exp_end[e]
            archived = end is not None and end < -365
            fac = f"FAC{(e % self.n_fac) + 2}"
            year = (NOW + timedelta(days=start)).year
            yield (
                e, f"{fac}-{year}-{e:07d}", f"Experiment {e}", pi, inst, fac, dept,
                day(start), None if end is None else day(end), int(self.exp_prop[e]),
                int(e in public), 0, "archived" if archived else ("active" if end is None else "ended"),
                day(end + 30) if archived else None, day(end + 30 + 3 * 365) if archived else None,
                None, None, 1, day(start - 1),
            )

    def _rows_experiment_projects(self, rng):
        n_proj = self.n_proj
        probe_projects = {pr.project_id for pr in self.probes}
        for e in range(1, self.n + 1):
            r = rng.random()
            if r < 0.3:
                yield (rng.randint(1, n_proj), e)
            elif r < 0.4:
                a, b = rng.sample(range(1, n_proj + 1), 2)
                yield (a, e)
                yield (b, e)
        del probe_projects

    def _rows_role_grants(self, rng):
        gid = 0
        n_regular = self.n_regular
        fac_users = self.facility_users
        roles = ("manager", "writer", "writer", "writer", "viewer", "viewer", "viewer", "viewer", "viewer")
        rnd, randint = rng.random, rng.randint
        for e in range(1, self.n + 1):
            pi = self.exp_pi[e]
            granted = day(self.exp_start[e])
            for k in range(10):
                if k < 9:
                    role = roles[k]
                    u = randint(1, n_regular)
                    while u == pi:
                        u = randint(1, n_regular)
                else:
                    if self.exp_fac[e]:
                        role = "facility_staff"
                        u = fac_users[randint(0, len(fac_users) - 1)]
                    else:
                        role = "viewer"
                        u = randint(1, n_regular)
                expires = revoked = revoked_by = None
                r = rnd()
                if r < 0.03:
                    revoked, revoked_by = day(-randint(1, 400)), pi
                elif r < 0.08:
                    expires = day(-randint(1, 400))
                elif r < 0.13:
                    expires = day(randint(1, 400))
                gid += 1
                yield (gid, u, e, None, None, role, pi, granted, expires, revoked, revoked_by)
        for j in range(1, self.n_proj + 1):
            for _ in range(5):
                gid += 1
                yield (gid, randint(1, n_regular), None, j, None, "viewer", self.proj_pi[j],
                       day(-300), None, None, None)
        for pr in self.probes:
            u = pr.user_id
            for i, e in enumerate(pr.grants):
                gid += 1
                yield (gid, u, e, None, None, ("viewer", "writer", "manager", "viewer")[i % 4],
                       self.exp_pi[e], day(-100), None, None, None)
            for i, e in enumerate(pr.dead_grants):
                gid += 1
                if i < 3:
                    yield (gid, u, e, None, None, "viewer", self.exp_pi[e], day(-100), None, day(-5), self.exp_pi[e])
                else:
                    yield (gid, u, e, None, None, "writer", self.exp_pi[e], day(-100), day(-3), None, None)
            for e in pr.facility_in + pr.facility_out:
                gid += 1
                yield (gid, u, e, None, None, "facility_staff", self.exp_pi[e],
                       day(self.exp_start[e]), None, None, None)
            gid += 1
            yield (gid, u, None, pr.project_id, None, "viewer", self.proj_pi[pr.project_id],
                   day(-200), None, None, None)


# --------------------------------------------------------------------------------------
# loaders
# --------------------------------------------------------------------------------------
def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    """Ctrl-C and ``kill`` (TERM, HUP) end a run through its ``finally`` blocks, so that the
    databases it created are dropped. (A background job of a non-interactive shell starts with
    SIGINT ignored; this turns it back on.)"""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"world: {msg}", file=sys.stderr, flush=True)


def _batches(rows: Iterable[tuple], size: int = 50_000) -> Iterator[list[tuple]]:
    batch: list[tuple] = []
    for r in rows:
        batch.append(r)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def schema_key() -> str:
    """The migration head plus a digest of the migration sources: an edited migration (an index
    added to an existing revision, say) must not reuse a world built with the old schema."""
    from labvault.datastore.migrate import MIGRATIONS

    digest = hashlib.sha256()
    for f in sorted((MIGRATIONS / "versions").glob("*.py")):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return f"{head_revision()}-{digest.hexdigest()[:8]}"


def sqlite_path(n: int) -> Path:
    return OUT / f"world-{n}-v{WORLD_VERSION}-{schema_key()}.sqlite"


def build_sqlite(n: int, *, check: bool = False, force: bool = False, quiet: bool = False) -> tuple[Path, dict]:
    """The cached SQLite world of ``n`` experiments (built when missing). Returns (path, meta)."""
    path = sqlite_path(n)
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists() and not force:
        _log(f"using cached {path.relative_to(OUT.parent.parent)}", quiet)
        return path, json.loads(meta_path.read_text())
    OUT.mkdir(parents=True, exist_ok=True)
    for stale in OUT.glob(f"world-{n}-v*.sqlite"):  # older generator or schema: rebuild
        if stale != path:
            _log(f"removing stale {stale.name}", quiet)
            stale.unlink(missing_ok=True)
            stale.with_suffix(".json").unlink(missing_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    for f in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        f.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        engine = make_engine(f"sqlite:///{tmp}")
        upgrade(engine)
        engine.dispose()
        world = World(n)
        _log(f"{n:,} experiments: attributes in {time.perf_counter() - t0:.1f}s", quiet)
        con = sqlite3.connect(tmp, isolation_level=None)
        con.execute("PRAGMA journal_mode=OFF")  # a cache file, built under a temp name
        con.execute("PRAGMA synchronous=OFF")
        con.execute("PRAGMA cache_size=-2000000")  # 2 GB page cache while loading
        con.execute("PRAGMA temp_store=MEMORY")
        counts = {}
        for table, cols, rows in world.tables():
            t1 = time.perf_counter()
            sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            count = 0
            con.execute("BEGIN")
            for batch in _batches(rows):
                con.executemany(sql, batch)
                count += len(batch)
            con.execute("COMMIT")
            counts[table] = count
            _log(f"  {table}: {count:,} rows in {time.perf_counter() - t1:.1f}s", quiet)
        if check:
            bad = con.execute("PRAGMA foreign_key_check").fetchmany(5)
            if bad:
                raise RuntimeError(f"foreign key violations in the generated world: {bad}")
            _log("  foreign keys: ok", quiet)
        t1 = time.perf_counter()
        con.execute("ANALYZE")
        _log(f"  ANALYZE in {time.perf_counter() - t1:.1f}s", quiet)
        con.execute("PRAGMA journal_mode=WAL")
        con.close()
        meta = world.meta() | {"rows": counts, "build_seconds": round(time.perf_counter() - t0, 1)}
        os.replace(tmp, path)
        meta_path.write_text(json.dumps(meta, indent=1))
    finally:
        for f in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            f.unlink(missing_ok=True)
    _log(f"built {path.name} in {time.perf_counter() - t0:.1f}s "
         f"({path.stat().st_size / 1e6:,.0f} MB)", quiet)
    return path, meta


def postgres_admin_url(url: str | None = None) -> str:
    url = url or os.environ.get("LABVAULT_TEST_POSTGRES_URL")
    if not url:
        raise SystemExit("PostgreSQL: set LABVAULT_TEST_POSTGRES_URL or run under scripts/with-postgres")
    return normalise_url(url)


def with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def create_database(admin_url: str, name: str) -> str:
    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            c.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return with_database(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def build_postgres(n: int, admin_url: str, *, name: str | None = None, quiet: bool = False) -> tuple[str, str, dict]:
    """Create database ``name`` (default bench_world_<n>_<pid>), migrate it and COPY the world in.

    Returns (database name, SQLAlchemy URL, meta). The caller drops it (drop_database)."""
    name = name or f"bench_world_{n}_{os.getpid()}"
    t0 = time.perf_counter()
    url = create_database(admin_url, name)
    try:
        engine = make_engine(url)
        upgrade(engine)
        world = World(n)
        _log(f"{n:,} experiments -> PostgreSQL {name}: attributes in {time.perf_counter() - t0:.1f}s", quiet)
        raw = engine.raw_connection()
        counts = {}
        try:
            conn = raw.driver_connection
            conn.autocommit = False
            with conn.cursor() as cur:
                try:
                    cur.execute("SET session_replication_role = replica")
                except Exception as exc:  # not a superuser: keep the FK triggers (slower)
                    conn.rollback()
                    _log(f"  (foreign-key triggers stay on: {exc.__class__.__name__})", quiet)
                cur.execute("SET maintenance_work_mem = '512MB'")
                for table, cols, rows in world.tables():
                    t1 = time.perf_counter()
                    count = 0
                    with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as copy:
                        write = copy.write_row
                        for r in rows:
                            write(r)
                            count += 1
                    counts[table] = count
                    _log(f"  {table}: {count:,} rows in {time.perf_counter() - t1:.1f}s", quiet)
                    if "id" in cols:
                        cur.execute(
                            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                            f"(SELECT coalesce(max(id), 0) + 1 FROM {table}), false)")
                cur.execute("RESET session_replication_role")
            conn.commit()
            t1 = time.perf_counter()
            conn.autocommit = True
            conn.execute("ANALYZE")
            conn.autocommit = False
            _log(f"  ANALYZE in {time.perf_counter() - t1:.1f}s", quiet)
        finally:
            raw.close()
            engine.dispose()
    except BaseException:
        drop_database(admin_url, name)
        raise
    meta = world.meta() | {"rows": counts, "build_seconds": round(time.perf_counter() - t0, 1)}
    _log(f"built PostgreSQL world {name} in {time.perf_counter() - t0:.1f}s", quiet)
    return name, url, meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate (and cache) a benchmark world.")
    ap.add_argument("--size", type=int, default=10_000, help="number of experiments")
    ap.add_argument("--db", default="sqlite", help="sqlite,postgresql")
    ap.add_argument("--check", action="store_true", help="check foreign keys (SQLite)")
    ap.add_argument("--force", action="store_true", help="rebuild the cached SQLite world")
    ap.add_argument("--keep", action="store_true", help="keep the PostgreSQL database (print its URL)")
    args = ap.parse_args(argv)
    install_signal_handlers()
    for db in args.db.split(","):
        if db == "sqlite":
            path, meta = build_sqlite(args.size, check=args.check, force=args.force)
            print(path)
            print(json.dumps({k: v for k, v in meta.items() if k not in ("public", "probes")}, indent=1))
        elif db == "postgresql":
            admin = postgres_admin_url()
            name, url, meta = build_postgres(args.size, admin)
            print(json.dumps(meta["rows"], indent=1))
            if args.keep:
                print(url)
            else:
                drop_database(admin, name)
        else:
            raise SystemExit(f"unknown database {db!r}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
