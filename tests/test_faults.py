"""Faults, through the real service where there is one: damaged replicas, a full disk, the
database going away under the service, and SIGKILL in the middle of an upload or of audit
appends. What must hold: never wrong bytes (an error instead), nothing half-stored or
half-audited, a clean JSON answer (or a cut connection once data was on its way), recovery
without restarting anything, `labvault audit verify` passing, and the rerun completing.

Covered elsewhere and not repeated here: one damaged replica read from the next one and
repaired by scrub, both replicas damaged at the store level, truncated replicas, crash
leftovers (tests/test_store_scrub.py); ENOSPC/EIO injected at each step of an ingest
(tests/test_store_ingest.py); `labvault ingest` killed mid-write (tests/test_store_cli.py);
the lifecycle job killed at every step (tests/test_lifecycle_crash.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import urllib3
from conftest import REQUIRE_PG, fresh_database_url
from hubtools import free_port, start_hub
from sqlalchemy import func, select, text
from store_support import flip_byte, object_path

from labvault.datastore import audit, demo
from labvault.datastore import operations as ops
from labvault.datastore.client import Client, LabvaultError
from labvault.datastore.db import make_engine, session_factory
from labvault.datastore.migrate import upgrade
from labvault.datastore.models import AuditEvent, ReplicaFault, StoredFile, User
from labvault.datastore.store import ChunkStore
from labvault.datastore.store.format import Layout

pytestmark = pytest.mark.slow
NOW = datetime.now(timezone.utc).replace(microsecond=0)
CHUNK = 64 * 1024  # the service's chunk size here: many chunks in a few MiB
PIECE = 4 * 1024 * 1024  # what the service sends per write (FileServing.serve)
OP = ops.Actor(operator="test")


# --- helpers ---------------------------------------------------------------------------------
def labvault(*args: str, db_url: str, data_dir: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The admin CLI in a subprocess, as an operator would run it."""
    env = {**os.environ, "LABVAULT_DB_URL": db_url}
    if data_dir is not None:
        env["LABVAULT_DATA_DIR"] = str(data_dir)
    return subprocess.run([sys.executable, "-m", "labvault.datastore.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def audit_verify_ok(db_url: str) -> str:
    r = labvault("audit", "verify", db_url=db_url)
    assert r.returncode == 0, r.stderr
    assert "audit chain intact" in r.stdout
    return r.stdout


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def service_pid(hub) -> int:
    """The datastore service the Hub started (its child running ``labvault.datastore.cli service``)."""
    for pid in children(hub.process.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"labvault.datastore.cli" in cmd and b"service" in cmd:
            return pid
    raise AssertionError("the Hub's labvault service process was not found")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Api:
    def __init__(self, hub, user: str):
        self.hub, self.token = hub, hub.token(user)
        self.http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=60))

    def __call__(self, method: str, path: str, **kw):
        headers = {"Authorization": f"token {self.token}", **kw.pop("headers", {})}
        return self.http.request(method, self.hub.service_url + "/api/v1" + path, headers=headers, **kw)


def json_error(r) -> dict:
    assert r.headers.get("Content-Type", "").startswith("application/json"), (r.status, r.headers, r.data[:200])
    body = json.loads(r.data)
    assert set(body) == {"error", "rule", "reason"}, body
    return body


# --- a Hub with the service, per database kind; one replica on a tiny filesystem -------------
def mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` at ``path``; None, or why it could not be done."""
    if os.geteuid() != 0:
        return "not root: a real full disk needs a filesystem mounted for the test"
    if not shutil.which("mount"):
        return "no mount(8)"
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"mount -t tmpfs failed: {r.stderr.strip()}"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def hub(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"faults-{request.param}")
    url = fresh_database_url(request, request.param, workdir)
    engine = make_engine(url)
    factory = session_factory(engine)
    demo.seed(factory, OP, now=NOW)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    (data / "labvault_config.py").write_text(
        f"c.ChunkStore.chunk_size = {CHUNK}\n"
        "c.DatastoreService.max_upload_size = 256 * 1024 * 1024\n"
        "c.DatastoreService.rate_limit_per_second = 0.0\n"
    )
    small = data / "store" / "replica-2"  # a small disk for one replica (the disk-full test)
    no_tmpfs = mount_tmpfs(small, "96m")
    store = ChunkStore(sessions=factory, data_dir=str(data), chunk_size=CHUNK)
    store.prepare_locations()
    h = start_hub(workdir, url, now=NOW)
    h.kind, h.factory, h.store, h.data, h.url = request.param, factory, store, data, url
    h.no_tmpfs, h.small = no_tmpfs, small
    with factory() as s:
        h.alice = ops.Actor(user_id=s.scalar(select(User.id).where(User.name == "alice")))
    yield h
    h.stop()
    for pid in getattr(h, "relaunched", []):  # a service this test started itself
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    engine.dispose()
    if not no_tmpfs:
        subprocess.run(["umount", "-l", str(small)], check=False)


def stored(hub, path: str, data: bytes, exid: str = "NLS-2026-0001"):
    src = hub.data / "src.bin"
    src.write_bytes(data)
    info = hub.store.ingest_file(hub.alice, exid, src, path, now=NOW).file
    src.unlink()
    return info, Layout(info.uuid, info.chunk_size, info.size)


def read_all(api, path: str, headers=None) -> tuple[int, bytes, bool]:
    """(status, bytes received, whether the connection was cut before Content-Length)."""
    r = api("GET", path, headers=headers or {}, preload_content=False)
    got, cut = bytearray(), False
    try:
        for piece in r.stream(1024 * 1024):
            got += piece
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.IncompleteRead):
        cut = True
    expected = int(r.headers.get("Content-Length", len(got)))
    r.release_conn()
    return r.status, bytes(got), cut or len(got) < expected


# --- damaged replicas ---------------------------------------------------------------------
def test_one_damaged_replica_the_service_still_serves_the_right_bytes(hub):
    """Served reads fail over to the next replica and report the fault; scrub repairs it (the
    store-level cases are in tests/test_store_scrub.py)."""
    data = os.urandom(3 * CHUNK + 123)
    info, layout = stored(hub, "faults/one-bad.bin", data)
    flip_byte(object_path(hub.store, "replica-1", info.uuid), layout.record_offset(1) + 40)
    status, got, cut = read_all(Api(hub, "bob"), "/experiments/NLS-2026-0001/files/faults/one-bad.bin")
    assert (status, cut) == (200, False) and got == data
    with hub.factory() as s:
        faults = s.execute(select(ReplicaFault.location, ReplicaFault.chunk_index, ReplicaFault.detected_by)
                           .where(ReplicaFault.file_id == info.id)).all()
    assert ("replica-1", 1, "read") in faults
    report = hub.store.scrub(OP, "NLS-2026-0001")
    assert report.ok and report.replicas_repaired >= 1
    assert hub.store.scrub(OP, "NLS-2026-0001").replicas_repaired == 0  # mended


def test_every_replica_damaged_never_wrong_bytes_through_the_service(hub):
    """The same chunk damaged on both replicas: before any byte went out the answer is a 502
    JSON error; once the first piece was sent the connection is cut short. Whatever arrived is
    the file's true prefix; the client library raises, never returns other bytes."""
    data = os.urandom(PIECE + 6 * CHUNK)
    bad = PIECE // CHUNK + 3  # a chunk in the second piece the service sends
    info, layout = stored(hub, "faults/all-bad.bin", data)
    for location in ("replica-1", "replica-2"):
        flip_byte(object_path(hub.store, location, info.uuid), layout.record_offset(bad) + 17)
    bob = Api(hub, "bob")
    path = "/experiments/NLS-2026-0001/files/faults/all-bad.bin"
    status, got, cut = read_all(bob, path)  # the whole file: headers left with the first piece
    assert status == 200 and cut and len(got) < len(data)
    assert got == data[:len(got)]  # never a wrong byte, only fewer
    start = bad * CHUNK + 10  # a range inside the damaged chunk: nothing sent yet
    r = bob("GET", path, headers={"Range": f"bytes={start}-{start + 99}"})
    assert r.status == 502 and "Content-Range" not in r.headers
    err = json_error(r)
    assert err["error"] == "integrity error" and "could not be verified on any replica" in err["reason"]
    r = bob("GET", path, headers={"Range": f"bytes=0-{CHUNK - 1}"})  # the good parts still read
    assert r.status == 206 and r.data == data[:CHUNK]
    f = Client(hub.service_url, bob.token, direct=False).open("NLS-2026-0001", "faults/all-bad.bin")
    f.seek(start - 5)
    with pytest.raises(LabvaultError) as e:
        f.read(100)
    assert e.value.status == 502


# --- a full disk under one replica ----------------------------------------------------------
def test_disk_full_on_one_replica_during_an_upload(hub):
    """One replica's filesystem (a real tmpfs, nearly full) fills up during an upload through the
    service: a clean 503 naming the location, nothing stored on either replica, the earlier
    files intact; once there is room again the same upload succeeds."""
    if hub.no_tmpfs:
        if os.environ.get("LABVAULT_REQUIRE_ROOT") == "1":
            pytest.fail(f"disk-full test needs a tmpfs: {hub.no_tmpfs}")
        pytest.skip(f"disk-full test needs a real small filesystem: {hub.no_tmpfs}")
    alice = Api(hub, "alice")
    before = Api(hub, "bob")("GET", "/experiments/NLS-2026-0001/files")
    ballast = hub.small / "ballast"  # leave about 1 MiB free
    st = os.statvfs(hub.small)
    free = st.f_bavail * st.f_frsize
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, free - 1024 * 1024))
    payload = os.urandom(3 * 1024 * 1024)
    r = alice("PUT", "/experiments/NLS-2026-0001/files/faults/too-big.bin", body=payload)
    assert r.status == 503, (r.status, r.data[:300])
    err = json_error(r)
    assert err["error"] == "storage error" and "replica-2" in err["reason"], err
    assert "No space left on device" in err["reason"] and "nothing was stored" in err["reason"]
    assert str(hub.data) not in err["reason"]  # no server paths in the answer
    with hub.factory() as s:
        assert s.scalar(select(func.count()).select_from(StoredFile)
                        .where(StoredFile.path == "faults/too-big.bin")) == 0
    for location in ("replica-1", "replica-2"):  # no published object, no unfinished upload
        backend = hub.store.backend(location)
        assert list(backend.list_incomplete()) == []
    after = Api(hub, "bob")("GET", "/experiments/NLS-2026-0001/files")
    assert json.loads(after.data) == json.loads(before.data)
    ballast.unlink()
    r = alice("PUT", "/experiments/NLS-2026-0001/files/faults/too-big.bin", body=payload)
    assert r.status == 201, r.data[:300]
    status, got, cut = read_all(alice, "/experiments/NLS-2026-0001/files/faults/too-big.bin")
    assert (status, cut, got == payload) == (200, False, True)
    audit_verify_ok(hub.url)


# --- SIGKILL of the service in the middle of an upload --------------------------------------
def service_command(pid: int) -> tuple[list[str], dict[str, str], str]:
    """How the Hub started the service (command, environment, working directory), to start it
    again the same way: JupyterHub restarts a managed service itself at its next poll (up to
    30 s later); the test does not wait for that."""
    cmd = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
    env = {k.decode(): v.decode() for k, v in env.items()}
    cwd = os.readlink(f"/proc/{pid}/cwd")
    return cmd, env, cwd


def test_service_killed_during_an_upload_nothing_partial_and_the_rerun_completes(hub):
    """SIGKILL while the service writes an upload to the replicas: no file row, nothing
    published, the audit chain intact; the service started again takes the same upload."""
    alice = Api(hub, "alice")
    pid = service_pid(hub)
    cmd, env, cwd = service_command(pid)
    payload = os.urandom(24 * 1024 * 1024)
    path = "/experiments/NLS-2026-0001/files/faults/killed.bin"
    outcome: dict = {}

    def upload():
        try:
            outcome["status"] = alice("PUT", path, body=payload).status
        except urllib3.exceptions.HTTPError as e:
            outcome["error"] = e

    thread = threading.Thread(target=upload)
    thread.start()
    tmp_dirs = [hub.store.backend(loc).root / ".tmp" for loc in ("replica-1", "replica-2")]

    def writing():  # the body arrived and the service is writing the replicas
        return any(d.is_dir() and any(d.iterdir()) for d in tmp_dirs) or not thread.is_alive()

    wait_for(writing, 60, "the service to start writing the upload", interval=0.002)
    os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert "status" not in outcome, f"the upload finished ({outcome}) before the kill: make it bigger"
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
             10, "the service to die")
    # nothing partial: no row, and no published object (only unfinished uploads, swept by scrub)
    with hub.factory() as s:
        assert s.scalar(select(func.count()).select_from(StoredFile)
                        .where(StoredFile.path == "faults/killed.bin")) == 0
        uuids = set(s.scalars(select(StoredFile.uuid)))
    for loc in ("replica-1", "replica-2"):
        objects = {o.key for o in hub.store.backend(loc).list("") if not o.key.startswith(".")}
        assert all(any(u in key for u in uuids) for key in objects), objects
    audit_verify_ok(hub.url)
    # the service again (as the Hub would, without waiting for its poll); the rerun completes
    log = open(hub.workdir / "service-relaunched.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    hub.relaunched = getattr(hub, "relaunched", []) + [proc.pid]
    wait_for(lambda: _answers(alice), 30, "the service to answer again")
    r = alice("PUT", path, body=payload)
    assert r.status == 201, r.data[:300]
    status, got, cut = read_all(alice, path)
    assert (status, cut, got == payload) == (200, False, True)
    report = hub.store.scrub(OP, grace_seconds=0)  # the killed upload's leftovers go
    assert report.incomplete_removed >= 1 and all(list(hub.store.backend(loc).list_incomplete()) == [] for loc in ("replica-1", "replica-2"))
    audit_verify_ok(hub.url)
    proc.terminate()
    proc.wait(20)
    log.close()
    hub.relaunched.remove(proc.pid)


def _answers(api) -> bool:
    try:
        return api("GET", "/me").status == 200
    except urllib3.exceptions.HTTPError:
        return False


# --- SIGKILL of writers in the middle of audit appends --------------------------------------
WRITER = r"""
import sys
from labvault.datastore import audit
from labvault.datastore.db import make_engine, session_factory
from labvault.policies import Decision
url, actor, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
factory = session_factory(make_engine(url))
for i in range(n):
    with factory.begin() as s:
        event = audit.append(s, actor=actor, action="file.open", target=f"file:E/{i}",
                             decision=Decision(True, "role.grant", "test"), ip="192.0.2.7")
        seq = event.seq
    print(seq, flush=True)  # printed only after the commit returned
"""


def start_writers(url: str, names: list[str], n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", WRITER, url, name, str(n)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for name in names]


def count_events(factory) -> int:
    with factory() as s:
        return s.scalar(select(func.count()).select_from(AuditEvent))


def acknowledged(procs: list[subprocess.Popen]) -> set[int]:
    seqs = set()
    for p in procs:
        out = p.stdout.read()
        seqs |= {int(x) for x in out.split()}
    return seqs


def test_writers_killed_during_audit_appends(db_url):
    """Three processes append audit events; each is SIGKILLed mid-stream. Every event whose
    append returned is there, the chain verifies, and the rerun appends where it stopped."""
    engine = make_engine(db_url)
    factory = session_factory(engine)
    procs = start_writers(db_url, ["w1", "w2", "w3"], 100_000)
    wait_for(lambda: count_events(factory) > 60, 60, "the writers to append")
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait(30)
        assert p.returncode == -signal.SIGKILL
    acked = acknowledged(procs)
    with factory() as s:
        present = set(s.scalars(select(AuditEvent.seq)))
    assert acked and acked <= present
    audit_verify_ok(db_url)
    procs = start_writers(db_url, ["w1", "w2"], 50)
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read()
    acked |= acknowledged(procs)
    with factory() as s:
        report = audit.verify(s)
        total = s.scalar(select(func.count()).select_from(AuditEvent))
    assert report.ok and report.events == total and acked <= set(range(1, total + 1))
    audit_verify_ok(db_url)
    engine.dispose()


# --- the PostgreSQL server stopped and crashed under the service -----------------------------
class Cluster:
    """A throwaway PostgreSQL cluster of this test's own (not the shared one), run like
    scripts/with-postgres runs its cluster: as an unprivileged user when we are root."""

    def __init__(self):
        self.bindir = self._bindir()
        self.user = None
        if os.geteuid() == 0:
            self.user = os.environ.get("LABVAULT_PG_USER") or "nobody"
        self.tmp = Path(tempfile.mkdtemp(prefix="labvault-faults-pg-", dir="/tmp"))
        if self.user:
            shutil.chown(self.tmp, self.user)
        self.datadir, self.sock = self.tmp / "data", self.tmp / "sock"
        self._run("mkdir", "-m", "700", str(self.sock))
        self._run(f"{self.bindir}/initdb", "-D", str(self.datadir), "-A", "trust", "-U", "postgres",
                  "--no-sync", "--encoding=UTF8", "--locale=C")
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @staticmethod
    def _bindir() -> str:
        if os.environ.get("LABVAULT_PG_BINDIR"):
            return os.environ["LABVAULT_PG_BINDIR"]
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
        if found:
            return str(found[-1].parent)
        initdb = shutil.which("initdb")
        if initdb:
            return str(Path(initdb).parent)
        msg = "no PostgreSQL server binaries (initdb, pg_ctl) for a throwaway cluster"
        if REQUIRE_PG:
            pytest.fail(msg + " and LABVAULT_REQUIRE_POSTGRES=1")
        pytest.skip(msg)

    def _run(self, *cmd: str) -> None:
        if self.user:
            cmd = ("runuser", "-u", self.user, "--", *cmd)
        r = subprocess.run(cmd, cwd=self.tmp, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])

    def start(self) -> None:
        self._run(f"{self.bindir}/pg_ctl", "start", "-w", "-t", "60", "-D", str(self.datadir),
                  "-l", str(self.tmp / "postgres.log"),
                  "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sock}")

    def stop(self, mode: str = "fast") -> None:
        self._run(f"{self.bindir}/pg_ctl", "stop", "-w", "-t", "60", "-D", str(self.datadir), "-m", mode)

    def remove(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except AssertionError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def cluster():
    c = Cluster()
    c.start()
    yield c
    c.remove()


@pytest.mark.postgres
def test_database_restarted_under_the_service(cluster, tmp_path):
    """PostgreSQL stops under the running service: every request gets a quick, clean 503 JSON
    answer (never a 500, never a hang); when the server is back, the same service process
    answers again, its data intact."""
    engine = make_engine(cluster.url)
    upgrade(engine)
    factory = session_factory(engine)
    demo.seed(factory, OP, now=NOW)
    engine.dispose()
    hub = start_hub(tmp_path / "hub", cluster.url, now=NOW)
    try:
        bob, alice = Api(hub, "bob"), Api(hub, "alice")
        assert bob("GET", "/experiments").status == 200
        pid = service_pid(hub)
        cluster.stop("fast")
        requests_ = [(bob, "GET", "/experiments"), (bob, "GET", "/me"),
                     (bob, "GET", "/experiments/NLS-2026-0001/files"),
                     (alice, "POST", "/experiments/NLS-2025-0042/archive")]
        for api, method, path in requests_:
            t0 = time.monotonic()
            r = api(method, path)
            assert r.status == 503, (method, path, r.status, r.data[:300])
            err = json_error(r)
            assert err["error"] == "database unavailable" and "try again" in err["reason"]
            assert "postgres" not in err["reason"].lower() and "127.0.0.1" not in err["reason"]
            assert time.monotonic() - t0 < 10
        cluster.start()  # same port, same data
        wait_for(lambda: bob("GET", "/experiments").status == 200, 30, "the service to recover")
        assert service_pid(hub) == pid  # the same process: no restart needed
        names = sorted(e["exid"] for e in json.loads(bob("GET", "/experiments").data)["experiments"])
        assert names == ["NLS-2026-0001", "NLS-2026-0002"]
        assert alice("POST", "/experiments/NLS-2025-0042/archive").status == 200
        assert "uncaught error" not in (hub.workdir / "hub.log").read_text(errors="replace")
    finally:
        hub.stop()
    audit_verify_ok(cluster.url)


@pytest.mark.postgres
def test_database_crash_during_audit_appends_keeps_every_acknowledged_event(cluster):
    """The PostgreSQL server is killed (``pg_ctl stop -m immediate``: no shutdown checkpoint,
    recovery from the WAL at the next start) while processes append audit events: every event
    whose append had returned survives, and the chain verifies."""
    engine = make_engine(cluster.url)
    upgrade(engine)
    factory = session_factory(engine)
    procs = start_writers(cluster.url, ["w1", "w2"], 100_000)
    wait_for(lambda: count_events(factory) > 60, 60, "the writers to append")
    engine.dispose()
    cluster.stop("immediate")
    for p in procs:
        assert p.wait(60) != 0  # they lost their server mid-stream
    acked = acknowledged(procs)
    cluster.start()
    engine = make_engine(cluster.url)
    with session_factory(engine)() as s:
        present = set(s.scalars(select(AuditEvent.seq)))
        assert s.execute(text("SELECT 1")).scalar() == 1
    engine.dispose()
    assert acked and acked <= present, f"{len(acked - present)} acknowledged events lost"
    audit_verify_ok(cluster.url)
