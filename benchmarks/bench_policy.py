#!/usr/bin/env python3
"""Point decisions per second of ``labvault.policies.decide`` for a realistic mix of reads.

    .venv/bin/python benchmarks/bench_policy.py [--calls 200000] [--repeat 7]

Cases (all ``decide(subject, "read", experiment, now)`` with subjects that hold ~100 grants,
like the users of benchmarks/world.py):

    allowed  pi            the subject is the experiment's PI (proprietary)
    allowed  role_grant    an active viewer/writer grant among ~100 grants
    allowed  facility_in   facility_staff grant, experiment ended 10 days ago (window 30 days)
    allowed  department    non-proprietary experiment of the subject's department
    denied   vendor        vendor staff on a proprietary experiment
    denied   facility_out  facility_staff grant, experiment ended 100 days ago
    denied   no_access     proprietary experiment, no grant (and non-proprietary, other department)

Baseline, measured in the same run with the same loop shape: a bare Python function call doing
one dict lookup (``def f(d, k): return d.get(k)``). Ratio = cost of one decide / cost of one
baseline call. Each figure is the median of ``--repeat`` timed passes. No pass/fail asserts on
timing; the decisions themselves are checked before timing.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone

from labvault import policies as p

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
TARGET = 200_000  # decisions/s


def _grants(base: int, n: int = 100) -> dict[int, tuple[p.Grant, ...]]:
    """~n grants, as a real subject carries them (load_subject builds the same mapping)."""
    roles = ("viewer", "viewer", "writer", "viewer", "manager")
    return {base + i: (p.Grant(roles[i % len(roles)]),) for i in range(n)}


def cases() -> dict[str, list[tuple[bool, str, p.Subject, p.Experiment]]]:
    """(expected allowed, expected rule, subject, experiment) per case, grouped allowed/denied."""
    ended_recent = NOW - timedelta(days=10)
    ended_long = NOW - timedelta(days=100)

    pi = p.Subject(user_id=1, name="pi", institution_id=1, institution_verified=True,
                   department_id=10, read_departments=frozenset({10}),
                   modify_departments=frozenset({10}), grants=_grants(10_000))
    scientist = p.Subject(user_id=2, name="sci", institution_id=1, institution_verified=True,
                          department_id=11, read_departments=frozenset({11, 12}),
                          modify_departments=frozenset({11}), projects=frozenset({5}),
                          grants=_grants(20_000))
    staff_grants = dict(_grants(30_000, 98))
    staff_grants[500] = (p.Grant("facility_staff"),)
    staff_grants[501] = (p.Grant("facility_staff"),)
    staff = p.Subject(user_id=3, name="staff", institution_id=2, institution_verified=True,
                      is_facility=True, department_id=20, read_departments=frozenset({20}),
                      modify_departments=frozenset({20}), grants=staff_grants)
    vendor = p.Subject(user_id=4, name="vendor", institution_id=3, institution_verified=True,
                       is_vendor=True, department_id=30, read_departments=frozenset({30}),
                       modify_departments=frozenset({30}), grants=_grants(40_000, 20))

    own = p.Experiment(id=100, exid="FAC-2026-0000100", pi_id=1, institution_id=1,
                       department_id=10, proprietary=True)
    granted = p.Experiment(id=20_050, exid="FAC-2026-0020050", pi_id=9, institution_id=1,
                           department_id=13, proprietary=True, project_ids=frozenset({7}))
    fac_in = p.Experiment(id=500, exid="FAC-2026-0000500", pi_id=9, institution_id=1,
                          department_id=13, proprietary=True, end_at=ended_recent)
    dept = p.Experiment(id=600, exid="FAC-2026-0000600", pi_id=9, institution_id=1,
                        department_id=12, proprietary=False)
    prop = p.Experiment(id=700, exid="FAC-2026-0000700", pi_id=9, institution_id=1,
                        department_id=13, proprietary=True)
    fac_out = p.Experiment(id=501, exid="FAC-2026-0000501", pi_id=9, institution_id=1,
                           department_id=13, proprietary=True, end_at=ended_long)
    other_open = p.Experiment(id=800, exid="FAC-2026-0000800", pi_id=9, institution_id=1,
                              department_id=99, proprietary=False, project_ids=frozenset({8}))
    return {
        "allowed": [
            (True, "proprietary.pi_owner", pi, own),
            (True, "role.grant", scientist, granted),
            (True, "facility.access_window", staff, fac_in),
            (True, "department.member_read_modify", scientist, dept),
        ],
        "denied": [
            (False, "vendor.never", vendor, prop),
            (False, "facility.access_window", staff, fac_out),
            (False, "proprietary.assigned_only", scientist, prop),
            (False, "default.deny", scientist, other_open),
        ],
    }


def check(groups) -> None:
    for items in groups.values():
        for allowed, rule, s, e in items:
            d = p.decide(s, "read", e, NOW)
            if d.allowed is not allowed or d.rule != rule:
                raise SystemExit(f"unexpected decision for {s.name} on {e.exid}: {d} "
                                 f"(expected allowed={allowed} rule={rule})")


def time_decide(work: list[tuple[p.Subject, p.Experiment]]) -> float:
    """ns per decide over ``work`` (one pass)."""
    decide, action, now = p.decide, "read", NOW
    t0 = time.perf_counter_ns()
    for s, e in work:
        decide(s, action, e, now)
    return (time.perf_counter_ns() - t0) / len(work)


def _lookup(d, k):
    return d.get(k)


def time_baseline(work: list[tuple[dict, int]]) -> float:
    """ns per bare function call doing one dict lookup, same loop shape as time_decide."""
    f = _lookup
    t0 = time.perf_counter_ns()
    for d, k in work:
        f(d, k)
    return (time.perf_counter_ns() - t0) / len(work)


def _cycle(items, n):
    return [items[i % len(items)] for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200_000, help="decisions per timed pass")
    ap.add_argument("--repeat", type=int, default=7, help="timed passes; medians are reported")
    args = ap.parse_args(argv)

    groups = cases()
    check(groups)
    p.default_policy()  # build the default Policy outside the timed region

    base_dict = {i: i for i in range(100)}
    baseline_work = _cycle([(base_dict, 7), (base_dict, 42), (base_dict, 1000)], args.calls)
    work = {
        "allowed": _cycle([(s, e) for _, _, s, e in groups["allowed"]], args.calls),
        "denied": _cycle([(s, e) for _, _, s, e in groups["denied"]], args.calls),
        "mix (4 allowed : 4 denied)": _cycle(
            [(s, e) for items in groups.values() for _, _, s, e in items], args.calls),
    }
    per_case = {f"{kind}/{rule}": _cycle([(s, e)], args.calls // 4)
                for kind, items in groups.items() for _, rule, s, e in items}

    # warm up
    time_baseline(baseline_work[:10_000])
    for w in work.values():
        time_decide(w[:10_000])

    results: dict[str, list[float]] = {k: [] for k in ["baseline", *work, *per_case]}
    for _ in range(args.repeat):
        # interleave so that background noise hits baseline and decide alike
        results["baseline"].append(time_baseline(baseline_work))
        for name, w in work.items():
            results[name].append(time_decide(w))
        for name, w in per_case.items():
            results[name].append(time_decide(w))

    med = {k: statistics.median(v) for k, v in results.items()}
    base = med["baseline"]
    print(f"bench_policy: python {platform.python_version()} on {platform.machine()}, "
          f"{args.calls} calls/pass, median of {args.repeat} passes, gc "
          f"{'enabled' if gc.isenabled() else 'disabled'}")
    print(f"{'workload':<48} {'ns/call':>9} {'calls/s':>12} {'x baseline':>11}")
    print(f"{'baseline: f(d, k) -> d.get(k)':<48} {base:9.1f} {1e9 / base:12,.0f} {1.0:11.1f}")
    for name in [*work, *per_case]:
        ns = med[name]
        print(f"{'decide ' + name:<48} {ns:9.1f} {1e9 / ns:12,.0f} {ns / base:11.1f}")
    worst = max(med[k] for k in work)
    print(f"target >= {TARGET:,} decisions/s: "
          f"{'met' if 1e9 / worst >= TARGET else 'NOT met'} "
          f"(slowest workload {1e9 / worst:,.0f}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
