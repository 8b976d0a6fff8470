#!/usr/bin/env python3
"""The datastore service behind a real JupyterHub: reads through the served and direct paths.

    .venv/bin/python benchmarks/bench_service.py [--frames 400] [--repeat 5] [--readers 50]
        [--seconds 60] [--workdir DIR] [--keep]

Setup (not timed): a SQLite database (migrated) with the demo world, an HDF5 file of uint16
512 x 512 frames chunked per frame (``--frames 400`` is 200 MiB), ingested by the PI (alice)
into NLS-2026-0001 as scan/frames.h5, and JupyterHub (tests/hubtools.start_hub, node proxy from
./node_modules) starting the labvault service with ``rate_limit_per_second = 0`` and
``direct_read_root`` set. Everything runs on 127.0.0.1; the service is called directly (its
service URL), as kernels do, with alice's real Hub token.

1. whole dataset into numpy, ``ds[...]`` through h5py, each timed in a fresh subprocess (open +
   read; imports excluded), cases interleaved per repeat, medians of ``--repeat``:
      plain      h5py.File(plaintext path)                       the baseline
      served     Client(direct=False).h5(...)                     HTTP Range through the service
      direct     Client().h5(...)                                 read lease, local decryption
      fsspec     h5py over fsspec HTTPFile, cache_type="readahead" (same URL, same token)
   Page cache: the plaintext and the ciphertext replicas are read once before timing, so all
   cases read from memory (no root needed to drop caches; every case is treated alike).
   Targets: served >= 1.5 x fsspec throughput and >= 1 GB/s; direct <= 1.4 x plain time.
2. latency of an authorised 4 KiB Range GET on the served path (one pooled urllib3 connection,
   random offsets, 20 warm-up requests, then ``--requests``); target p50 <= 2 ms.
3. ``--readers`` threads (each with its own pooled connection) doing random 64 KiB Range GETs
   for ``--seconds``: errors (target 0), MB/s, p50/p99 latency. Bounded: each thread stops at
   the deadline; loopback only.

No pass/fail asserts; the served/direct arrays are checked against the source once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRAME = (512, 512)
EXID, PATH = "NLS-2026-0001", "scan/frames.h5"
CASES = ("plain", "served", "direct", "fsspec")


# -- child: one timed whole-dataset read in a fresh process ---------------------------------
def child(case: str, url: str, token: str, plain: str) -> None:
    import h5py
    import numpy as np  # noqa: F401

    if case == "fsspec":
        import fsspec  # imported before timing, like the others
    else:
        from labvault.datastore.client import Client
    t0 = time.perf_counter()
    if case == "plain":
        f = h5py.File(plain, "r")
    elif case == "served":
        f = Client(url, token, direct=False).h5(EXID, PATH)
    elif case == "direct":
        f = Client(url, token).h5(EXID, PATH)
    else:
        fs = fsspec.filesystem("http", headers={"Authorization": f"token {token}"})
        fobj = fs.open(f"{url}/api/v1/experiments/{EXID}/files/{PATH}", "rb", cache_type="readahead")
        f = h5py.File(fobj, "r")
    ds = f["entry/data"]
    t1 = time.perf_counter()
    a = ds[...]
    t2 = time.perf_counter()
    dt, opened, read = t2 - t0, t1 - t0, t2 - t1
    f.close()
    print(json.dumps({"case": case, "seconds": dt, "open_s": opened, "read_s": read, "nbytes": a.nbytes, "sum": int(a.sum(dtype="u8"))}))


def run_child(case, url, token, plain) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", case, "--url", url, "--token", token,
                          "--plain", plain], capture_output=True, text=True, timeout=600, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{case} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- setup ------------------------------------------------------------------------------------
def make_frames(path: Path, n: int) -> None:
    import h5py
    import numpy as np

    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[: FRAME[0], : FRAME[1]]
    ring = (np.abs(np.hypot(yy - 256, xx - 256) - 150) < 3).astype(np.uint16) * 400
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("entry/data", shape=(n, *FRAME), dtype="u2", chunks=(1, *FRAME))
        for i in range(0, n, 50):
            k = min(50, n - i)
            block = rng.poisson(8, size=(k, *FRAME)).astype(np.uint16) + ring
            ds[i: i + k] = block


def setup(workdir: Path, frames: int):
    sys.path.insert(0, str(ROOT / "tests"))
    from hubtools import start_hub
    from sqlalchemy import select

    from labvault.datastore import demo, migrate
    from labvault.datastore import operations as ops
    from labvault.datastore.db import make_engine, session_factory
    from labvault.datastore.models import User
    from labvault.datastore.store import ChunkStore

    now = datetime.now(timezone.utc).replace(microsecond=0)
    url = f"sqlite:///{workdir / 'lv.sqlite'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    factory = session_factory(engine)
    demo.seed(factory, ops.Actor(operator="bench"), now=now)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    (data / "labvault_config.py").write_text(
        "c.DatastoreService.rate_limit_per_second = 0\n"
        f"c.DatastoreService.direct_read_root = {str(data / 'store')!r}\n"
    )
    store = ChunkStore(sessions=factory, data_dir=str(data))
    store.prepare_locations()
    src = workdir / "frames.h5"
    t = time.perf_counter()
    make_frames(src, frames)
    with factory() as s:
        alice_id = s.scalar(select(User.id).where(User.name == "alice"))
    store.ingest_file(ops.Actor(user_id=alice_id), EXID, src, PATH, now=now)
    print(f"# data: {src.stat().st_size / 2**20:.0f} MiB file ({frames} frames), made and ingested in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    engine.dispose()
    hub = start_hub(workdir, url, now=now)
    return hub, src


def warm(paths) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass


# -- 2: latency -------------------------------------------------------------------------------
def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def latency(url, token, size, n, target=None, length=4096) -> dict:
    import urllib3

    http = urllib3.PoolManager(maxsize=1, retries=False)
    ranged = target is None
    target = target or f"{url}/api/v1/experiments/{EXID}/files/{PATH}"
    rng = random.Random(1)
    times, errors = [], 0
    for i in range(20 + n):
        off = rng.randrange(0, size - 4096)
        t = time.perf_counter()
        headers = {"Authorization": f"token {token}"}
        if ranged:
            headers["Range"] = f"bytes={off}-{off + length - 1}"
        r = http.request("GET", target, headers=headers)
        dt = time.perf_counter() - t
        if (r.status != 206 or len(r.data) != length) if ranged else r.status != 200:
            errors += 1
        if i >= 20:
            times.append(dt)
    return {"n": n, "errors": errors, "p50_ms": pct(times, 50) * 1e3, "p99_ms": pct(times, 99) * 1e3,
            "mean_ms": statistics.fmean(times) * 1e3}


# -- 3: concurrent readers --------------------------------------------------------------------
def load(url, token, size, readers, seconds) -> dict:
    import urllib3

    target = f"{url}/api/v1/experiments/{EXID}/files/{PATH}"
    lock = threading.Lock()
    lat, errs, nbytes = [], [], [0]
    start = threading.Barrier(readers + 1)
    deadline = [0.0]

    def worker(seed):
        http = urllib3.PoolManager(maxsize=1, retries=False, timeout=urllib3.Timeout(connect=10, read=30))
        rng = random.Random(seed)
        mine, got, bad = [], 0, []
        start.wait()
        while time.monotonic() < deadline[0]:
            off = rng.randrange(0, size - 65536)
            t = time.perf_counter()
            try:
                r = http.request("GET", target, headers={"Authorization": f"token {token}",
                                                         "Range": f"bytes={off}-{off + 65535}"})
                ok = r.status == 206 and len(r.data) == 65536
                if not ok:
                    bad.append(f"{r.status} {r.data[:120]!r}")
                else:
                    got += 65536
            except Exception as e:  # noqa: BLE001 - counted, reported
                bad.append(repr(e)[:160])
            mine.append(time.perf_counter() - t)
        with lock:
            lat.extend(mine)
            errs.extend(bad)
            nbytes[0] += got

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(readers)]
    for th in threads:
        th.start()
    deadline[0] = time.monotonic() + seconds
    t0 = time.perf_counter()
    start.wait()
    for th in threads:
        th.join(seconds + 120)
    wall = time.perf_counter() - t0
    return {"readers": readers, "seconds": wall, "requests": len(lat), "errors": len(errs),
            "error_samples": sorted(set(errs))[:5], "MB_s": nbytes[0] / wall / 1e6,
            "req_s": len(lat) / wall, "p50_ms": pct(lat, 50) * 1e3 if lat else None,
            "p99_ms": pct(lat, 99) * 1e3 if lat else None}


# -- main -------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--readers", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--requests", type=int, default=500, help="4 KiB latency requests")
    ap.add_argument("--workdir")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--token", help=argparse.SUPPRESS)
    ap.add_argument("--plain", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.url, args.token, args.plain)
    try:
        import aiohttp  # noqa: F401
        import fsspec  # noqa: F401
    except ImportError:
        sys.exit("fsspec and aiohttp are needed for the baseline: .venv/bin/pip install fsspec aiohttp")

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-service-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"# {platform.node()} {os.cpu_count()} cpus, python {platform.python_version()}, workdir {workdir}")
    hub, src = setup(workdir, args.frames)
    results: dict = {"frames": args.frames, "file_bytes": src.stat().st_size}
    try:
        token = hub.token("alice")
        url = hub.service_url
        warm([src, *(p for p in (workdir / "data").rglob("*") if p.is_file())])
        # correctness, once (and a warm-up of the service)
        ref = run_child("plain", url, token, str(src))
        for case in CASES[1:]:
            r = run_child(case, url, token, str(src))
            assert r["sum"] == ref["sum"] and r["nbytes"] == ref["nbytes"], (case, r, ref)
        runs = {c: [] for c in CASES}
        for i in range(args.repeat):
            order = list(CASES) if i % 2 == 0 else list(reversed(CASES))
            for c in order:
                runs[c].append(run_child(c, url, token, str(src)))
        nbytes = ref["nbytes"]
        whole = {}
        for c, rs in runs.items():
            med = {k: statistics.median(r[k] for r in rs) for k in ("seconds", "open_s", "read_s")}
            whole[c] = {"median_s": med["seconds"], "open_s": med["open_s"], "read_s": med["read_s"],
                        "all_s": [r["seconds"] for r in rs], "GB_s": nbytes / med["seconds"] / 1e9}
        results["whole"] = whole
        print(f"\n1. whole dataset ({nbytes / 2**20:.0f} MiB into numpy), median of {args.repeat} "
              f"(open+read = open, read):")
        for c in CASES:
            w = whole[c]
            print(f"   {c:7s} {w['median_s'] * 1e3:8.1f} ms = {w['open_s'] * 1e3:6.1f} + {w['read_s'] * 1e3:7.1f} ms"
                  f"  {w['GB_s']:6.2f} GB/s  x plain {w['median_s'] / whole['plain']['median_s']:.2f}"
                  f" (read only {w['read_s'] / whole['plain']['read_s']:.2f})")
        s_vs_f = whole["served"]["GB_s"] / whole["fsspec"]["GB_s"]
        d_vs_p = whole["direct"]["median_s"] / whole["plain"]["median_s"]
        print(f"   served / fsspec throughput {s_vs_f:.2f} (target >= 1.5); served "
              f"{whole['served']['GB_s']:.2f} GB/s (target >= 1); direct / plain time {d_vs_p:.2f} (target <= 1.4)")

        size = src.stat().st_size
        lat = latency(url, token, size, args.requests)
        results["latency_4k"] = lat
        print(f"\n2. 4 KiB Range GET, served, {lat['n']} requests: p50 {lat['p50_ms']:.2f} ms, "
              f"p99 {lat['p99_ms']:.2f} ms, mean {lat['mean_ms']:.2f} ms, errors {lat['errors']} (target p50 <= 2 ms)")

        me = latency(url, token, size, args.requests, target=f"{url}/api/v1/me")
        results["latency_me"] = me
        print(f"   reference: GET /me (Hub token check + user lookup, no file): p50 {me['p50_ms']:.2f} ms, "
              f"p99 {me['p99_ms']:.2f} ms")
        big = latency(url, token, size, max(50, args.requests // 5), length=512 * 1024)
        results["latency_512k"] = big
        print(f"   reference: 512 KiB Range GET (one frame): p50 {big['p50_ms']:.2f} ms, p99 {big['p99_ms']:.2f} ms")

        ld = load(url, token, size, args.readers, args.seconds)
        results["load"] = ld
        print(f"\n3. {ld['readers']} readers x {ld['seconds']:.1f} s of 64 KiB Range GETs: {ld['requests']} requests, "
              f"{ld['errors']} errors, {ld['MB_s']:.1f} MB/s, {ld['req_s']:.0f} req/s, "
              f"p50 {ld['p50_ms']:.1f} ms, p99 {ld['p99_ms']:.1f} ms")
        for e in ld["error_samples"]:
            print(f"   error: {e}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        hub.stop()
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
