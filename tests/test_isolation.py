"""Isolation between users on one machine, as root: each user's server runs as that user's own
system account (``LabvaultLocalSpawner.run_as_hub_user = False``), and from user A's kernel
-- code run through A's server's kernel API, as a notebook would -- everything that grants
access is out of reach: the master key, the database, the chunk store, user B's home and
server, the datastore service's and the Hub's memory and environment. Each attempt must be
refused by the operating system (EACCES/EPERM), not merely fail.

Needs root (it creates two system users, removed afterwards); skipped otherwise with the
reason, and a failure with ``LABVAULT_REQUIRE_ROOT=1`` (CI runs it as root). The servers run on
the system's Python 3.11 with the project's virtualenv on its path, because the venv's own
interpreter may live where other users cannot reach (here: under /root).
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hubtools import start_hub
from sqlalchemy import select

from labvault.datastore import demo
from labvault.datastore import operations as ops
from labvault.datastore.db import make_engine, session_factory
from labvault.datastore.models import User
from labvault.datastore.store import ChunkStore

pytestmark = pytest.mark.slow
NOW = datetime.now(timezone.utc).replace(microsecond=0)
USERS = ("lvisoa", "lvisob")  # A and B: system accounts made for this test only
VENV_SITE = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def require_root() -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "isolation between users needs root (to create system users and switch to them)"
    elif not (shutil.which("useradd") and shutil.which("userdel")):
        reason = "useradd/userdel not found"
    if reason:
        if os.environ.get("LABVAULT_REQUIRE_ROOT") == "1":
            pytest.fail(reason + " and LABVAULT_REQUIRE_ROOT=1")
        pytest.skip(reason)


def users_python(base: Path) -> str:
    """A Python for the users' servers: the system's interpreter of our minor version, in a
    venv that adds the project's site-packages (readable by everyone) to its path."""
    system = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/usr/local/bin")
    if not system:
        pytest.skip(f"no system python{sys.version_info.major}.{sys.version_info.minor} that other users can run")
    venv = base / "users-venv"
    subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "labvault-project.pth").write_text(f"import site; site.addsitedir({str(VENV_SITE)!r})\n")
    return str(venv / "bin" / "python")


def processes_of(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except FileNotFoundError:
                pass
    return pids


@pytest.fixture(scope="module")
def system_users():
    require_root()
    for name in USERS:  # a leftover of an interrupted run
        if _exists(name):
            subprocess.run(["userdel", "-r", "-f", name], capture_output=True)
    for name in USERS:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True, capture_output=True)
    yield {name: pwd.getpwnam(name) for name in USERS}
    for name in USERS:
        uid = pwd.getpwnam(name).pw_uid
        for pid in processes_of(uid):  # servers and kernels this test started through the Hub
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["userdel", "-r", "-f", name], capture_output=True)
        assert not _exists(name)


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="module")
def hub(system_users):
    # Everything lives under a directory others may traverse (0755): what protects the
    # labvault data directory is its own mode (0700, from `labvault init`), nothing above it.
    base = Path(tempfile.mkdtemp(prefix="labvault-isolation-", dir="/tmp"))
    os.chmod(base, 0o755)
    data = base / "data"
    db_url = f"sqlite:///{data / 'labvault.sqlite'}"
    r = subprocess.run([sys.executable, "-m", "labvault.datastore.cli", "init", f"--data-dir={data}"],
                       env={**os.environ, "LABVAULT_DB_URL": db_url}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    engine = make_engine(db_url)
    factory = session_factory(engine)
    demo.seed(factory, ops.Actor(operator="test"), now=NOW)
    for name in USERS:
        ops.add_user(factory, ops.Actor(operator="test"), name, institution=demo.UNI)
    store = ChunkStore(sessions=factory, data_dir=str(data))
    src = base / "frames.bin"
    src.write_bytes(os.urandom(100_000))
    with factory() as s:
        alice = ops.Actor(user_id=s.scalar(select(User.id).where(User.name == "alice")))
    info = store.ingest_file(alice, "NLS-2026-0001", src, "scan/frames.bin", now=NOW).file
    src.unlink()
    workdir = base / "hub"  # the Hub's own files (its database, config, log): root only
    workdir.mkdir(mode=0o700)
    (workdir / "data").symlink_to(data)  # hubtools starts the service with --data-dir=<workdir>/data
    config = f"""
c.JupyterHub.spawner_class = "labvault-local"
c.LabvaultLocalSpawner.run_as_hub_user = False
c.Spawner.cmd = [{users_python(base)!r}, "-m", "jupyterhub.singleuser"]
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
c.JupyterHub.load_roles.append({{"name": "test-admin-servers", "services": ["test-admin"],
                                  "scopes": ["admin:servers", "admin:server_state"]}})
"""
    h = start_hub(workdir, db_url, now=NOW, service_config=config)
    h.base, h.data, h.object = base, data, store.backend("replica-1").root / _object_key(info.uuid)
    h.key_dir = Path(store.key_provider.key_dir)
    yield h
    h.stop()
    engine.dispose()
    shutil.rmtree(base, ignore_errors=True)


def _object_key(file_uuid: str) -> str:
    from labvault.datastore.store.format import object_key

    return object_key(file_uuid)


def start_server(hub, name: str) -> dict:
    r = hub.hub_request("POST", f"/users/{name}/server", {"environment": "python-scientific"})
    assert r.status in (201, 202), r.data
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        model = json.loads(hub.hub_request("GET", f"/users/{name}").data)["servers"].get("")
        if model and model.get("ready"):
            return model
        if model is None:
            break
        time.sleep(0.3)
    raise AssertionError(f"{name}'s server did not start:\n{(hub.workdir / 'hub.log').read_text()[-4000:]}")


async def run_in_kernel(hub, name: str, token: str, code: str, timeout: float = 90) -> str:
    """Start a kernel in ``name``'s server and run ``code`` over the kernel's websocket, as the
    notebook does; the text it printed."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    headers = {"Authorization": f"token {token}"}
    r = hub.http.request("POST", f"{hub.url}/user/{name}/api/kernels", body=json.dumps({"name": "python3"}),
                         headers={**headers, "Content-Type": "application/json"})
    assert r.status == 201, r.data
    kernel = json.loads(r.data)["id"]
    ws_url = f"{hub.url.replace('http', 'ws', 1)}/user/{name}/api/kernels/{kernel}/channels"
    ws = await websocket_connect(HTTPRequest(ws_url, headers=headers))
    session = uuid.uuid4().hex

    def message(msg_type: str, content: dict) -> tuple[str, str]:
        msg_id = uuid.uuid4().hex
        return msg_id, json.dumps({
            "header": {"msg_id": msg_id, "username": name, "session": session, "msg_type": msg_type,
                       "version": "5.3", "date": datetime.now(timezone.utc).isoformat()},
            "parent_header": {}, "metadata": {}, "content": content, "channel": "shell", "buffers": []})

    async def until_idle(msg_id: str) -> list[str]:
        out = []
        while True:
            raw = await asyncio.wait_for(ws.read_message(), timeout)
            assert raw is not None, "the kernel's websocket closed"
            m = json.loads(raw)
            if m.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if m["msg_type"] == "stream":
                out.append(m["content"]["text"])
            elif m["msg_type"] == "error":
                raise AssertionError("\n".join(m["content"]["traceback"]))
            elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                return out

    msg_id, raw = message("kernel_info_request", {})  # the kernel is up and connected
    await ws.write_message(raw)
    await until_idle(msg_id)
    msg_id, raw = message("execute_request", {"code": code, "silent": False, "store_history": False,
                                              "user_expressions": {}, "allow_stdin": False, "stop_on_error": True})
    await ws.write_message(raw)
    out = await until_idle(msg_id)
    ws.close()
    return "".join(out)


ATTEMPTS = r"""
import errno, json, os, socket, urllib.request
results = {}
def attempt(name, fn):
    try:
        got = fn()
        results[name] = f"READ {got!r}"[:200]
    except PermissionError as e:
        results[name] = "refused " + errno.errorcode.get(e.errno, str(e.errno))
    except OSError as e:
        results[name] = f"failed {errno.errorcode.get(e.errno, e.errno)}: {e}"[:200]
    except Exception as e:
        results[name] = f"failed {type(e).__name__}: {e}"[:200]
def read(path, n=64):
    with open(path, "rb") as f:
        return len(f.read(n))
def mem(pid):
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(0x400000)
        return len(f.read(16))
T = json.loads(TARGETS)
results["whoami"] = f"uid={os.getuid()} euid={os.geteuid()}"
attempt("list the data directory", lambda: os.listdir(T["data"]))
attempt("the master key", lambda: read(T["key"]))
attempt("the key directory", lambda: os.listdir(T["key_dir"]))
attempt("the database", lambda: read(T["db"]))
attempt("a chunk-store object", lambda: read(T["object"]))
attempt("list B's home", lambda: os.listdir(T["home_b"]))
attempt("B's notebook", lambda: read(T["home_b"] + "/secret-notes.txt"))
for who in ("service", "hub", "proxy", "server_b"):
    pid = T["pids"][who]
    attempt(f"{who} environment", lambda pid=pid: read(f"/proc/{pid}/environ"))
    attempt(f"{who} memory", lambda pid=pid: mem(pid))
    attempt(f"{who} open files", lambda pid=pid: os.listdir(f"/proc/{pid}/fd"))
def b_server():
    req = urllib.request.Request(T["server_b_url"] + "api/contents/secret-notes.txt",
                                 headers={"Authorization": "token " + T["token_a"]})
    return urllib.request.urlopen(req, timeout=10).read()[:40]
attempt("B's server with A's token", b_server)
print(json.dumps(results))
"""


def test_a_kernel_cannot_reach_what_grants_access(hub, system_users):
    a, b = USERS
    for name in USERS:
        hub.ensure_user(name)
    model_a, model_b = start_server(hub, a), start_server(hub, b)
    token_a = hub.token(a, scopes=[f"access:servers!user={a}", "access:services!service=labvault"])
    token_b = hub.token(b, scopes=[f"access:servers!user={b}"])
    # B keeps notes in the home folder, through B's own server (as JupyterLab saves files)
    r = hub.http.request("PUT", f"{hub.url}/user/{b}/api/contents/secret-notes.txt",
                         body=json.dumps({"type": "file", "format": "text", "content": "B's unpublished result\n"}),
                         headers={"Authorization": f"token {token_b}", "Content-Type": "application/json"})
    assert r.status in (200, 201), r.data
    home_b = Path(system_users[b].pw_dir)
    assert (home_b / "secret-notes.txt").stat().st_uid == system_users[b].pw_uid
    # regression: useradd -m makes 0755 homes and the servers ran with umask 022, so A's kernel
    # read B's notebooks (found by this test); the spawner now makes homes 0700, files 0600
    assert home_b.stat().st_mode & 0o777 == 0o700
    assert (home_b / "secret-notes.txt").stat().st_mode & 0o077 == 0
    from test_faults import children, service_pid  # the Hub's children

    hub_pid = hub.process.pid
    proxy = [p for p in children(hub_pid) if b"configurable-http-proxy" in Path(f"/proc/{p}/cmdline").read_bytes()
             or b"node" in Path(f"/proc/{p}/cmdline").read_bytes()]
    pid_b = model_b["state"]["pid"]
    env_b = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid_b}/environ").read_text().split("\0") if "=" in kv)
    server_b_url = env_b["JUPYTERHUB_SERVICE_URL"].rstrip("/") + "/"  # B's server, directly
    targets = {
        "data": str(hub.data), "key_dir": str(hub.key_dir), "key": str(next(hub.key_dir.glob("*.key"))),
        "db": str(hub.data / "labvault.sqlite"), "object": str(hub.object), "home_b": str(home_b),
        "pids": {"service": service_pid(hub), "hub": hub_pid, "proxy": proxy[0] if proxy else hub_pid,
                 "server_b": pid_b},
        "server_b_url": server_b_url, "token_a": token_a,
    }
    for path in ("key", "db", "object"):  # the targets exist: a refusal is not a typo
        assert Path(targets[path]).is_file(), targets[path]
    code = f"TARGETS = {json.dumps(json.dumps(targets))}\n" + ATTEMPTS
    out = asyncio.run(run_in_kernel(hub, a, token_a, code))
    results = json.loads(out.strip().splitlines()[-1])
    assert results.pop("whoami") == f"uid={system_users[a].pw_uid} euid={system_users[a].pw_uid}"
    http_b = results.pop("B's server with A's token")
    assert "403" in http_b or "401" in http_b, http_b  # B's server refuses A's token
    not_refused = {k: v for k, v in results.items() if not v.startswith("refused E")}
    assert not not_refused, f"reachable from {a}'s kernel: {json.dumps(not_refused, indent=1)}"
    # ... and A's own server still works (the refusals are not a broken kernel)
    assert model_a["ready"]
    out = asyncio.run(run_in_kernel(hub, a, token_a, "import os; print(os.path.expanduser('~'))"))
    assert out.strip() == system_users[a].pw_dir
