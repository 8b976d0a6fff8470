#!/usr/bin/env python3
"""The single-user server extension: listing /experiments through the service against the stock
contents manager listing equal local directories, and reading a large dataset slice through the
kernel-side client.

    .venv/bin/python benchmarks/bench_extension.py [--experiments 1000] [--files 1000]
        [--slice-mb 1024] [--repeat 9] [--workdir DIR] [--keep] [--json FILE]

Setup (not timed): a SQLite database (migrated) with the demo world plus ``--experiments``
experiments whose PI is alice, ``--files`` small files ingested into NLS-2026-0001 under
``many/`` and an HDF5 file of uint16 512 x 512 frames chunked per frame (``--slice-mb`` MiB)
ingested as ``scan/big.h5``; JupyterHub (tests/hubtools.start_hub) starting the labvault service
with ``rate_limit_per_second = 0`` and ``direct_read_root`` set. Everything on 127.0.0.1, with
alice's real Hub token.

1. listing, in one process and event loop, medians of ``--repeat`` after 2 warm-ups:
      overlay  LabvaultContentsManager.get("experiments")             (service: GET /experiments)
      stock    AsyncLargeFileManager.get(dir with one folder per experiment, same names)
   and the same for one experiment's ``--files`` files (service: GET /experiments/X/files)
   against a local directory of as many files. Target: overlay <= 2 x stock.
2. the whole dataset ``ds[...]`` through ``Client().h5(...)`` as a notebook would: served
   (direct=False) and direct (a read lease, local decryption), with plain h5py on the local
   plaintext file as the baseline; page cache warmed first; medians (and best) of 3.

No pass/fail asserts; the arrays read through the client are checked against the source once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRAME = (512, 512)
BIG_EXID, BIG_PATH = "NLS-2026-0001", "scan/big.h5"


def setup(workdir: Path, experiments: int, files: int, slice_mb: int):
    sys.path.insert(0, str(ROOT / "tests"))
    import h5py
    import numpy as np
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
    op = ops.Actor(operator="bench")
    demo.seed(factory, op, now=now)
    t = time.perf_counter()
    for i in range(experiments):
        ops.add_experiment(factory, op, f"BENCH-{i:05d}", pi="alice", title=f"bench experiment {i}",
                           facility="NLS X06SA", start_at=now - timedelta(days=5), end_at=now - timedelta(days=1),
                           department="Structural Biology", now=now)
    print(f"# {experiments} experiments added in {time.perf_counter() - t:.1f} s", flush=True)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    (data / "labvault_config.py").write_text(
        "c.DatastoreService.rate_limit_per_second = 0\n"
        f"c.DatastoreService.direct_read_root = {str(data / 'store')!r}\n"
    )
    store = ChunkStore(sessions=factory, data_dir=str(data))
    store.prepare_locations()
    with factory() as s:
        alice = ops.Actor(user_id=s.scalar(select(User.id).where(User.name == "alice")))
    t = time.perf_counter()
    for i in range(files):
        store.ingest_stream(alice, BIG_EXID, f"many/file-{i:05d}.txt", [f"file {i}\n".encode()], now=now)
    print(f"# {files} files ingested in {time.perf_counter() - t:.1f} s", flush=True)
    src = workdir / "big.h5"
    n = max(1, slice_mb * 2**20 // (FRAME[0] * FRAME[1] * 2))
    t = time.perf_counter()
    rng = np.random.default_rng(6)
    with h5py.File(src, "w") as f:
        ds = f.create_dataset("entry/data", shape=(n, *FRAME), dtype="u2", chunks=(1, *FRAME))
        block = rng.integers(0, 4096, size=(64, *FRAME), dtype=np.uint16)
        for i in range(0, n, 64):
            k = min(64, n - i)
            ds[i: i + k] = block[:k] + np.uint16(i % 7)
    store.ingest_file(alice, BIG_EXID, src, BIG_PATH, now=now)
    print(f"# {src.stat().st_size / 2**20:.0f} MiB HDF5 file ({n} frames) made and ingested in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    engine.dispose()
    hub = start_hub(workdir, url, now=now)
    return hub, src


def local_twins(base: Path, experiments: int, files: int) -> None:
    exps = base / "exps"
    exps.mkdir(parents=True)
    for i in range(experiments):
        (exps / f"BENCH-{i:05d}").mkdir()
    many = base / "many"
    many.mkdir()
    for i in range(files):
        (many / f"file-{i:05d}.txt").write_text(f"file {i}\n")


async def timed(fn, repeat: int) -> tuple[float, list[float], dict]:
    for _ in range(2):
        model = await fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        model = await fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, model


async def listing(hub, token: str, workdir: Path, experiments: int, files: int, repeat: int) -> dict:
    from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager

    from labvault.extension.contents import LabvaultContentsManager

    home, local = workdir / "home", workdir / "local"
    home.mkdir()
    local_twins(local, experiments, files)
    overlay = LabvaultContentsManager(root_dir=str(home))
    overlay.connection.service_url, overlay.connection.api_token = hub.service_url, token
    stock = AsyncLargeFileManager(root_dir=str(local))
    out = {}
    for label, ours, theirs in (("experiments", "experiments", "exps"),
                                ("files", f"experiments/{BIG_EXID}/many", "many")):
        t_ours, runs_ours, m1 = await timed(lambda p=ours: overlay.get(p), repeat)
        t_stock, runs_stock, m2 = await timed(lambda p=theirs: stock.get(p), repeat)
        client = overlay.connection.client  # the service call alone, for where the time goes
        call = client.experiments if label == "experiments" else partial(client.files, BIG_EXID)
        t_service, _, _ = await timed(lambda c=call: asyncio.to_thread(c), repeat)
        n_ours = len(m1["content"])
        n_stock = len(m2["content"])
        out[label] = {"overlay_ms": t_ours * 1e3, "stock_ms": t_stock * 1e3, "ratio": t_ours / t_stock,
                      "service_call_ms": t_service * 1e3, "entries": [n_ours, n_stock],
                      "runs_overlay_ms": [round(x * 1e3, 1) for x in runs_ours],
                      "runs_stock_ms": [round(x * 1e3, 1) for x in runs_stock]}
        print(f"listing {label:<11} overlay {t_ours * 1e3:7.1f} ms ({n_ours} entries)  "
              f"stock {t_stock * 1e3:7.1f} ms ({n_stock})  ratio {t_ours / t_stock:5.2f}  (target <= 2); "
              f"the service call alone {t_service * 1e3:.1f} ms",
              flush=True)
    overlay.connection.close()
    return out


def slice_read(hub, token: str, src: Path) -> dict:
    import h5py
    import numpy as np

    from labvault.datastore.client import Client

    size = src.stat().st_size
    for p in [src, *(hub.workdir / "data" / "store").rglob("*")]:  # page cache, all alike
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(16 << 20):
                    pass
    with h5py.File(src, "r") as f:
        want = f["entry/data"][...]
    out = {"bytes": int(want.nbytes), "file_bytes": size}
    for case in ("plain", "served", "direct"):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            if case == "plain":
                f = h5py.File(src, "r")
            else:
                f = Client(hub.service_url, token, direct=None if case == "direct" else False).h5(BIG_EXID, BIG_PATH)
            with f:
                a = f["entry/data"][...]
            times.append(time.perf_counter() - t)
        if case != "plain" and not np.array_equal(a, want):
            raise SystemExit(f"{case}: the data read through the client differs from the source")
        del a
        dt = statistics.median(times)
        best = min(times)
        out[case] = {"s": dt, "GBps": want.nbytes / dt / 1e9, "best_s": best,
                     "runs_s": [round(x, 3) for x in times]}
        print(f"slice {case:<7} {dt * 1e3:8.0f} ms  {want.nbytes / dt / 1e9:5.2f} GB/s (median); best "
              f"{best * 1e3:.0f} ms, {want.nbytes / best / 1e9:.2f} GB/s; runs {[round(x, 2) for x in times]}",
              flush=True)
    out["served_vs_plain"] = out["served"]["s"] / out["plain"]["s"]
    out["direct_vs_plain"] = out["direct"]["s"] / out["plain"]["s"]
    print(f"slice served/plain time {out['served_vs_plain']:.1f}x, direct/plain {out['direct_vs_plain']:.1f}x")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experiments", type=int, default=1000)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--slice-mb", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--workdir", help="keep the world here (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="do not delete the temporary directory")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lv-bench-ext-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"# bench_extension {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} "
          f"({platform.python_version()}); workdir {workdir}", flush=True)
    hub = None
    try:
        hub, src = setup(workdir, args.experiments, args.files, args.slice_mb)
        token = hub.token("alice")
        results = {"experiments": args.experiments, "files": args.files,
                   "listing": asyncio.run(listing(hub, token, workdir, args.experiments, args.files, args.repeat)),
                   "slice": slice_read(hub, token, src)}
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        if hub is not None:
            hub.stop()
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
