#!/usr/bin/env python3
"""The encrypted chunk store against plain h5py on the same plaintext file, in one run.

    .venv/bin/python benchmarks/bench_store.py [--frames 400] [--repeat 7]
        [--chunk-sizes 256K,512K,1M] [--workdir DIR] [--keep]

Data: an HDF5 file of detector-like frames (uint16, 512 x 512; Poisson background, a powder
ring and Bragg-like peaks), chunked per frame; ``--frames 400`` is 200 MiB. Two variants: an
uncompressed dataset and a gzip (level 4) one. Each is stored with ``ChunkStore.ingest_file``
into a SQLite-backed store with the default two replica directories, once per chunk size.

Cases, each timed in a fresh subprocess (imports excluded from the time, included in the
memory); plain = ``h5py.File(path)``, labvault = ``h5py.File(lease.open(backends))``, the direct
read path of a kernel (``ReadLease`` + ``EncryptedFile``: no database code in the process):

    whole         ds[...]                              the whole dataset
    random        ds[i] for 100 random frames          after opening (the same frames both)
    open1         open the file, ds[i] for one frame   open included
    open1-served  as open1, labvault opening through   the service's path: database lookup and
                  ChunkStore.open(file_id)             data-key unwrap, engine already connected;
                                                       its process carries the database layer
                                                       (~30 MiB), so no memory target

Peak memory is the child's resident-set high-water mark (VmHWM). Ingest is
``ChunkStore.ingest_file`` of the uncompressed file against ``cp`` of it into both replica
directories followed by ``sync`` of the two copies (ingest fsyncs too), interleaved, on the same
file system. Page cache: every file is read once before timing, so both sides read from memory.
Each figure is the median of ``--repeat`` runs, plain and labvault interleaved so that load from
other processes hits both alike. Ratios are labvault / plain time (ingest: labvault / cp
throughput); targets: whole <= 1.3, random <= 1.5, memory <= plain + 32 MiB, ingest >= 0.7.
No pass/fail asserts on timing; the arrays read are checked against the source once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FRAME = (512, 512)
RANDOM_FRAMES = 100
TARGETS = {"whole": 1.3, "random": 1.5}
MEMORY_SLACK_MIB = 32
INGEST_TARGET = 0.7


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(text[-1:], 1)
    return int(text.rstrip("KM")) * mult


def human(n: int) -> str:
    return f"{n // (1024 * 1024)}M" if n % (1024 * 1024) == 0 else f"{n // 1024}K"


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def make_frames(path: Path, frames: int, compression: str | None) -> None:
    import h5py
    import numpy as np

    rng = np.random.default_rng(42)
    y, x = np.indices(FRAME)
    r = np.hypot(y - 256.0, x - 256.0)
    ring = (np.exp(-((r - 150.0) ** 2) / 8.0) * 300).astype("uint16")
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(
            "entry/data/data", shape=(frames, *FRAME), dtype="uint16", chunks=(1, *FRAME),
            compression=compression, compression_opts=4 if compression else None,
        )
        for i in range(frames):
            frame = rng.poisson(2.0, FRAME).astype("uint16") + ring
            peaks = rng.integers(0, 512, (40, 2))
            frame[peaks[:, 0], peaks[:, 1]] += rng.integers(500, 20000, 40).astype("uint16")
            ds[i] = frame


# --------------------------------------------------------------------------------------
# the child: one measured case in a fresh process
# --------------------------------------------------------------------------------------
def child(args) -> None:
    import h5py
    import numpy as np

    indices = np.random.default_rng(7).integers(0, args.frames, RANDOM_FRAMES)
    if args.impl == "direct":
        # the direct read path of a kernel: a lease (layout + data key) and read-only
        # ciphertext; no database code is imported
        from labvault.datastore.store.backends import LocalDirectoryBackend
        from labvault.datastore.store.reader import ReadLease

        with open(args.lease) as f:
            spec = json.load(f)
        lease = ReadLease.from_json(spec["lease"])
        backends = {n: LocalDirectoryBackend(n, root) for n, root in spec["roots"].items()}

        def opener():
            return h5py.File(lease.open(backends), "r")
    elif args.impl == "served":
        # the service's path: ChunkStore.open looks the file up and unwraps its data key
        from labvault.datastore.db import make_engine, session_factory
        from labvault.datastore.store import ChunkStore

        store = ChunkStore(sessions=session_factory(make_engine(args.db)), data_dir=args.data_dir)
        store.list_files("BENCH-1")  # a running service has its engine and ORM ready

        def opener():
            return h5py.File(store.open(args.file_id), "r")
    else:
        def opener():
            return h5py.File(args.path, "r")

    t0 = time.perf_counter()
    if args.case == "whole":
        with opener() as f:
            data = f["entry/data/data"][...]
        checksum = int(data[::7, ::13, ::17].sum())
    elif args.case == "random":
        with opener() as f:
            ds = f["entry/data/data"]
            t0 = time.perf_counter()  # opening is the open1 case
            checksum = 0
            for i in indices:
                checksum += int(ds[i][::31, ::37].sum())
    else:  # open1
        with opener() as f:
            checksum = int(f["entry/data/data"][int(indices[0])][::31, ::37].sum())
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "maxrss_kib": peak_rss_kib(), "checksum": checksum}))


def peak_rss_kib() -> int:
    """This process's resident-set high-water mark. Not ru_maxrss: Linux carries that over
    from the parent through fork + exec, so every child would report at least the parent's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_child(script: Path, **kw) -> dict:
    cmd = [sys.executable, str(script), "--child"]
    for k, v in kw.items():
        cmd.append(f"--{k.replace('_', '-')}={v}")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child failed: {' '.join(cmd)}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# the parent
# --------------------------------------------------------------------------------------
def object_key(file_uuid: str) -> str:
    from labvault.datastore.store.format import object_key as key

    return key(file_uuid)


def setup_store(work: Path, chunk_size: int):
    from labvault.datastore import operations as ops
    from labvault.datastore.db import make_engine, session_factory
    from labvault.datastore.migrate import upgrade
    from labvault.datastore.store import ChunkStore

    data = work / f"data-{human(chunk_size)}"
    db = f"sqlite:///{data / 'labvault.sqlite'}"
    shutil.rmtree(data, ignore_errors=True)  # a fresh store every run
    data.mkdir(parents=True)
    engine = make_engine(db)
    upgrade(engine)
    sessions = session_factory(engine)
    op = ops.Actor(operator="bench")
    ops.add_institution(sessions, op, "Bench University", domains=["bench.example"])
    ops.add_user(sessions, op, "pi", institution="Bench University",
                 institutional_email="pi@bench.example", verified_institutional_email=True)
    ops.add_experiment(sessions, op, "BENCH-1", pi="pi")
    store = ChunkStore(sessions=sessions, data_dir=str(data), chunk_size=chunk_size)
    store.prepare_locations()
    return store, op, db, data


def warm(*paths: Path) -> None:
    buf = bytearray(1 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def median(xs):
    return statistics.median(xs)


def bench_ingest(store, op, src: Path, repeat: int) -> tuple[float, float]:
    """(median cp seconds, median ingest seconds) for the same bytes into the same directories."""
    from labvault.datastore.models import StoredFile

    roots = [store.backend(n).root for n in store.locations]
    cp_times, lv_times = [], []
    for i in range(repeat):
        targets = [r / f"cp-{i}.h5" for r in roots]
        warm(src)
        t0 = time.perf_counter()
        for t in targets:
            subprocess.run(["cp", str(src), str(t)], check=True)
        subprocess.run(["sync", *map(str, targets)], check=True)
        cp_times.append(time.perf_counter() - t0)
        for t in targets:
            t.unlink()
        warm(src)
        t0 = time.perf_counter()
        info = store.ingest_file(op, "BENCH-1", src, f"ingest/{i}.h5").file
        lv_times.append(time.perf_counter() - t0)
        store.delete_file(ops_pi(store), "BENCH-1", f"ingest/{i}.h5", reason="benchmark run")
        with store.sessions() as s:
            assert s.get(StoredFile, info.id).purged_at is not None
    return median(cp_times), median(lv_times)


def ops_pi(store):
    from sqlalchemy import select

    from labvault.datastore import operations as ops
    from labvault.datastore.models import User

    with store.sessions() as s:
        return ops.Actor(user_id=s.scalar(select(User.id).where(User.name == "pi")))


def report(results: list, chunk: str, variant: str, case: str, plain: list, lv: list) -> None:
    if {r["checksum"] for r in plain} != {r["checksum"] for r in lv}:
        raise SystemExit(f"{variant}/{case}: labvault read different data than plain h5py")
    row = {
        "chunk": chunk, "variant": variant, "case": case,
        "plain_s": median([r["seconds"] for r in plain]),
        "lv_s": median([r["seconds"] for r in lv]),
        "plain_rss_mib": median([r["maxrss_kib"] for r in plain]) / 1024,
        "lv_rss_mib": median([r["maxrss_kib"] for r in lv]) / 1024,
    }
    row["ratio"] = row["lv_s"] / row["plain_s"]
    row["rss_delta_mib"] = row["lv_rss_mib"] - row["plain_rss_mib"]
    results.append(row)
    target = TARGETS.get(case)
    verdict = "" if target is None else ("  ok" if row["ratio"] <= target else f"  ABOVE target {target}")
    if case.endswith("-served"):  # the service process: its database layer is loaded too
        mem = "service process, not a reader target"
    else:
        mem = "ok" if row["rss_delta_mib"] <= MEMORY_SLACK_MIB else "ABOVE target"
    print(f"chunk {chunk:>4}  {variant:5} {case:12}  plain {row['plain_s'] * 1e3:8.1f} ms  "
          f"labvault {row['lv_s'] * 1e3:8.1f} ms  ratio {row['ratio']:.2f}{verdict}  |  "
          f"peak RSS plain {row['plain_rss_mib']:.0f} MiB, labvault {row['lv_rss_mib']:.0f} MiB "
          f"(+{row['rss_delta_mib']:.1f}, {mem})", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--ingest-repeat", type=int, default=5)
    ap.add_argument("--chunk-sizes", default="256K,512K,1M")
    ap.add_argument("--variants", default="plain,gzip")
    ap.add_argument("--cases", default="whole,random,open1")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for opt in ("impl", "case", "path", "db", "data-dir", "file-id", "lease"):
        ap.add_argument(f"--{opt}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.file_id = int(args.file_id) if args.file_id else None
        child(args)
        return 0

    import numpy as np  # noqa: F401 - fail early if missing

    script = Path(__file__).resolve()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-store-"))
    work.mkdir(parents=True, exist_ok=True)
    chunk_sizes = [parse_size(c) for c in args.chunk_sizes.split(",")]
    variants = args.variants.split(",")
    cases = args.cases.split(",")
    print(f"# bench_store: {platform.node()} {os.cpu_count()} cpu, Python {platform.python_version()}, "
          f"{args.frames} frames of {FRAME[0]}x{FRAME[1]} uint16, repeat {args.repeat}")
    try:
        sources = {}
        for v in variants:
            src = work / f"frames-{v}.h5"
            if not src.exists():
                t0 = time.perf_counter()
                make_frames(src, args.frames, "gzip" if v == "gzip" else None)
                print(f"# generated {src.name}: {src.stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s")
            sources[v] = src
        results = []
        for cs in chunk_sizes:
            store, op, db, data = setup_store(work, cs)
            stored, leases = {}, {}
            for v, src in sources.items():
                info = store.ingest_file(op, "BENCH-1", src, f"{v}.h5").file
                stored[v] = info
                leases[v] = work / f"lease-{human(cs)}-{v}.json"
                spec = {"lease": store.lease(info.id).to_json(),
                        "roots": {n: str(store.backend(n).root) for n in store.locations}}
                leases[v].touch(mode=0o600)
                leases[v].write_text(json.dumps(spec))
            for v in variants:
                ciphertext = store.backend(next(iter(store.locations))).root / object_key(stored[v].uuid)
                for case in [*cases, *(["open1-served"] if "open1" in cases else [])]:
                    plain, lv = [], []
                    for _ in range(args.repeat):
                        # re-read into the page cache before every run: other work on the
                        # machine may have evicted it (a no-op when it is still there)
                        warm(sources[v])
                        plain.append(run_child(script, impl="plain", case=case.split("-")[0],
                                               path=sources[v], frames=args.frames))
                        warm(ciphertext)
                        if case == "open1-served":  # database lookup + key unwrap, as the service
                            lv.append(run_child(script, impl="served", case="open1", db=db, data_dir=data,
                                                file_id=stored[v].id, frames=args.frames))
                        else:
                            lv.append(run_child(script, impl="direct", case=case, lease=leases[v],
                                                frames=args.frames))
                    report(results, human(cs), v, case, plain, lv)
            if args.ingest_repeat:
                src = sources[variants[0]]
                cp_s, lv_s = bench_ingest(store, op, src, args.ingest_repeat)
                mb = src.stat().st_size / 1e6
                ratio = cp_s / lv_s
                print(f"chunk {human(cs):>4}  ingest {src.name}: cp+sync x2 {mb / cp_s:7.0f} MB/s  "
                      f"labvault {mb / lv_s:7.0f} MB/s  ratio {ratio:.2f}"
                      f"{'  ok' if ratio >= INGEST_TARGET else '  BELOW target 0.7'}", flush=True)
                results.append({"chunk": human(cs), "case": "ingest", "cp_s": cp_s, "lv_s": lv_s, "ratio": ratio})
        print("# json " + json.dumps(results))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
