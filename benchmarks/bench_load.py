#!/usr/bin/env python3
"""200 concurrent, policy-checked experiment listings through the datastore service (issue 9).

    scripts/with-postgres .venv/bin/python benchmarks/bench_load.py [--clients 200] [--seconds 30]
        [--users 200] [--experiments 1000] [--departments 20] [--db sqlite,postgresql] [--json FILE]

Setup (not timed): the demo world plus ``--users`` scientists and ``--experiments`` experiments
of alice's (two thirds proprietary, one in thirty public), both spread over ``--departments``
departments (members read their department's data), each user holding roles on 5 random ones; every user gets a real Hub token. JupyterHub
(tests/hubtools.start_hub, node proxy) starts the service with its DEFAULT rate limit and token
cache: what a deployment runs.

Then ``--clients`` threads, each on its own connection and each as another user (round robin
over the users), call ``GET /api/v1/experiments`` -- the listing the service decides in SQL with
the policy for that user at that moment -- until ``--seconds`` are up. Every answer is checked:
status 200 and exactly the experiments that user may see (computed once beforehand with
``operations.list_visible_experiments``); anything else is an error. Printed: requests, errors
(target 0), requests/s, p50/p99 latency, per database.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def build_world(url: str, users: int, experiments: int, departments: int = 20, seed: int = 9):
    """The demo world, ``users`` scientists and ``experiments`` experiments spread over
    ``departments`` departments (members read their department's data), random roles;
    returns (now, names, expected listing per name)."""
    from labvault.datastore import demo, migrate
    from labvault.datastore import operations as ops
    from labvault.datastore.db import make_engine, session_factory

    now = datetime.now(timezone.utc).replace(microsecond=0)
    engine = make_engine(url)
    migrate.upgrade(engine)
    factory = session_factory(engine)
    op = ops.Actor(operator="bench")
    demo.seed(factory, op, now=now)
    rng = random.Random(seed)
    depts = [f"Group {d:02d}" for d in range(departments)]
    for d in depts:
        ops.add_department(factory, op, d, demo.UNI)
    names = [f"sci{i:04d}" for i in range(users)]
    for i, name in enumerate(names):
        ops.add_user(factory, op, name, institution=demo.UNI, department=depts[i % departments])
    exids = []
    for i in range(experiments):
        exid = f"BENCH-2026-{i:05d}"
        ops.add_experiment(factory, op, exid, pi="alice", title=f"load test {i}", facility="NLS X06SA",
                           start_at=now - timedelta(days=20), end_at=now - timedelta(days=5),
                           proprietary=i % 3 != 0, department=depts[i % departments])
        exids.append(exid)
    alice = ops.Actor(user_id=_uid(factory, "alice"))
    for i in range(0, experiments, 30):  # some of the non-proprietary ones (i % 3 == 0) are public
        ops.publish_experiment(factory, alice, exids[i], now=now)
    for name in names:
        for exid in rng.sample(exids, 5):
            ops.grant_role(factory, alice, exid, name, rng.choice(["viewer", "writer"]), now=now)
    expected = {}
    with factory() as s:
        for name in names + ["alice", "bob", "carol", "frank", "vera"]:
            expected[name] = sorted(e.exid for e in ops.list_visible_experiments(s, name, now))
    engine.dispose()
    return now, names + ["alice", "bob", "carol", "frank", "vera"], expected


def _uid(factory, name):
    from labvault.datastore import operations as ops

    with factory() as s:
        return ops.get_user(s, name).id


def load(url: str, tokens: dict[str, str], expected: dict[str, list[str]], clients: int, seconds: float) -> dict:
    import urllib3

    names = sorted(tokens)
    lock = threading.Lock()
    lat, errs = [], []
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def worker(i):
        http = urllib3.PoolManager(maxsize=1, retries=False, timeout=urllib3.Timeout(connect=10, read=60))
        name = names[i % len(names)]
        headers = {"Authorization": f"token {tokens[name]}"}
        mine, bad = [], []
        start.wait()
        while time.monotonic() < deadline[0]:
            t = time.perf_counter()
            try:
                r = http.request("GET", f"{url}/api/v1/experiments", headers=headers)
                if r.status != 200:
                    bad.append(f"{r.status} {r.data[:120]!r}")
                elif sorted(e["exid"] for e in json.loads(r.data)["experiments"]) != expected[name]:
                    bad.append(f"{name}: a listing other than the policy's")
            except Exception as e:  # noqa: BLE001 - counted, reported
                bad.append(repr(e)[:160])
            mine.append(time.perf_counter() - t)
        with lock:
            lat.extend(mine)
            errs.extend(bad)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for th in threads:
        th.start()
    deadline[0] = time.monotonic() + seconds
    t0 = time.perf_counter()
    start.wait()
    for th in threads:
        th.join(seconds + 180)
    wall = time.perf_counter() - t0
    sizes = [len(expected[names[i % len(names)]]) for i in range(clients)]
    return {"clients": clients, "users": len({names[i % len(names)] for i in range(clients)}),
            "seconds": wall, "requests": len(lat), "errors": len(errs), "error_samples": sorted(set(errs))[:5],
            "req_s": len(lat) / wall, "p50_ms": pct(lat, 50) * 1e3 if lat else None,
            "p99_ms": pct(lat, 99) * 1e3 if lat else None,
            "listing_sizes": {"min": min(sizes), "median": sorted(sizes)[len(sizes) // 2], "max": max(sizes)}}


def database_url(kind: str, workdir: Path) -> tuple[str, callable]:
    if kind == "sqlite":
        return f"sqlite:///{workdir / 'lv.sqlite'}", lambda: None
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from labvault.datastore.db import make_engine

    base = os.environ.get("LABVAULT_TEST_POSTGRES_URL")
    if not base:
        sys.exit("PostgreSQL: set LABVAULT_TEST_POSTGRES_URL (scripts/with-postgres does)")
    name = f"bench_load_{os.getpid()}"
    admin = make_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        c.execute(text(f'CREATE DATABASE "{name}"'))

    def drop():
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return make_url(base).set(database=name).render_as_string(hide_password=False), drop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--experiments", type=int, default=1000)
    ap.add_argument("--departments", type=int, default=20,
                    help="experiments and users are spread over this many departments")
    ap.add_argument("--db", default="sqlite,postgresql")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from hubtools import start_hub

    print(f"# {platform.node()} {os.cpu_count()} cpus, python {platform.python_version()}")
    results = {}
    for kind in args.db.split(","):
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-load-{kind}-"))
        url, drop = database_url(kind, workdir)
        hub = None
        try:
            t = time.perf_counter()
            now, names, expected = build_world(url, args.users, args.experiments, args.departments)
            hub = start_hub(workdir, url, now=now)
            tokens = {name: hub.token(name) for name in names}
            print(f"# {kind}: world of {len(names)} users and {args.experiments + 3} experiments, "
                  f"{len(tokens)} tokens, in {time.perf_counter() - t:.1f} s", flush=True)
            r = load(hub.service_url, tokens, expected, args.clients, args.seconds)
            results[kind] = r
            print(f"{kind}: {r['clients']} clients ({r['users']} users) x {r['seconds']:.1f} s of GET /experiments "
                  f"(listings of {r['listing_sizes']['min']}-{r['listing_sizes']['max']} experiments): "
                  f"{r['requests']} requests, {r['errors']} errors, {r['req_s']:.0f} req/s, "
                  f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms", flush=True)
            for e in r["error_samples"]:
                print(f"   error: {e}")
        finally:
            if hub is not None:
                hub.stop()
            drop()
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
