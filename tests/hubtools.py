"""A real JupyterHub on 127.0.0.1 with the labvault service registered, for end-to-end tests.

The Hub runs as a subprocess with node's configurable-http-proxy (``make test`` installs it
into ./node_modules), starts the datastore service itself (a Hub-managed service), and hands
out real user tokens through its REST API.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import urllib3

ROOT = Path(__file__).resolve().parent.parent
CHP = ROOT / "node_modules" / ".bin" / "configurable-http-proxy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Hub:
    """A running Hub: URLs, an admin token, and helpers to make users and tokens."""

    url: str  # the proxy's public URL
    api: str  # the Hub API through the proxy
    service_url: str  # the service directly (what kernels use)
    admin_token: str
    other_service_token: str
    db_url: str
    workdir: Path
    clock_file: Path
    process: subprocess.Popen
    hub_secret: str = ""
    http: urllib3.PoolManager = field(default_factory=lambda: urllib3.PoolManager(retries=False, timeout=30))

    def hub_request(self, method: str, path: str, body=None, token: str | None = None):
        headers = {"Authorization": f"token {token or self.admin_token}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        r = self.http.request(method, self.api + path, headers=headers,
                              body=json.dumps(body) if body is not None else None)
        return r

    def ensure_user(self, name: str) -> None:
        r = self.hub_request("POST", f"/users/{name}")
        if r.status not in (201, 409):
            raise RuntimeError(f"creating Hub user {name}: {r.status} {r.data[:200]!r}")

    def token(self, name: str, scopes=("access:services!service=labvault",), expires_in: int | None = None) -> str:
        self.ensure_user(name)
        body = {"note": "labvault tests", "scopes": list(scopes)}
        if expires_in:
            body["expires_in"] = expires_in
        r = self.hub_request("POST", f"/users/{name}/tokens", body)
        if r.status != 201:
            raise RuntimeError(f"token for {name}: {r.status} {r.data[:300]!r}")
        return json.loads(r.data)["token"]

    def set_clock(self, when) -> None:
        self.clock_file.write_text(when.isoformat())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def require_proxy() -> str:
    if CHP.exists():
        return str(CHP)
    found = shutil.which("configurable-http-proxy")
    if found:
        return found
    raise RuntimeError("configurable-http-proxy not found: run `make test` (npm ci) or `npm ci`")


def start_hub(workdir: Path, db_url: str, *, now=None, service_config: str = "") -> Hub:
    """Start JupyterHub with the labvault service against ``db_url`` (already migrated)."""
    workdir.mkdir(parents=True, exist_ok=True)
    proxy = require_proxy()
    port, hub_port, api_port, service_port = (free_port() for _ in range(4))
    admin_token, other_token = secrets.token_hex(32), secrets.token_hex(32)
    hub_secret = secrets.token_hex(32)
    clock_file = workdir / "clock"
    if now is not None:
        clock_file.write_text(now.isoformat())
    # the database URL goes in the environment: JupyterHub logs service command lines
    service_cmd = [sys.executable, "-m", "labvault.datastore.cli", "service", f"--data-dir={workdir / 'data'}"]
    if now is not None:
        service_cmd.append(f"--DatastoreService.fake_clock_file={clock_file}")
    service_cmd.append("--DatastoreService.expose_decisions=True")  # tests see each request's rules
    # the lifecycle job would act on the moved test clock at any time: tests run it themselves
    service_cmd.append("--DatastoreService.lifecycle_interval=0")
    config = f"""
c = get_config()  # noqa
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{api_port}"
c.ConfigurableHTTPProxy.command = [{proxy!r}]
c.ConfigurableHTTPProxy.should_start = True
c.JupyterHub.db_url = "sqlite:///{workdir / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = "{workdir / 'cookie_secret'}"
c.JupyterHub.pid_file = "{workdir / 'jupyterhub.pid'}"
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.cleanup_servers = True
c.JupyterHub.services = [
    {{"name": "labvault", "url": "http://127.0.0.1:{service_port}",
      "command": {service_cmd!r}, "environment": {{"LABVAULT_DB_URL": {db_url!r}, "LABVAULT_HUB_SECRET": {hub_secret!r}}},
      "display": False, "oauth_no_confirm": True}},
    {{"name": "test-admin", "api_token": "{admin_token}"}},
    {{"name": "other-service", "api_token": "{other_token}"}},
]
c.JupyterHub.load_roles = [
    {{"name": "user", "scopes": ["self", "access:services!service=labvault"]}},
    {{"name": "test-admin", "services": ["test-admin"],
      "scopes": ["admin:users", "tokens", "list:users", "read:users"]}},
]
{service_config}
"""
    (workdir / "jupyterhub_config.py").write_text(config)
    # the Hub's own side of the Hub-internal API (authenticator, spawner)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LABVAULT_HUB_SECRET": hub_secret,
           "LABVAULT_SERVICE_URL": f"http://127.0.0.1:{service_port}/services/labvault"}
    log = open(workdir / "hub.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(workdir / "jupyterhub_config.py")],
                               cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
    hub = Hub(url=f"http://127.0.0.1:{port}", api=f"http://127.0.0.1:{port}/hub/api",
              service_url=f"http://127.0.0.1:{service_port}/services/labvault",
              admin_token=admin_token, other_service_token=other_token, db_url=db_url, workdir=workdir,
              clock_file=clock_file, process=process, hub_secret=hub_secret)
    deadline = time.monotonic() + 60
    ready = False
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            r = hub.http.request("GET", f"{hub.url}/services/labvault/api/v1/me", timeout=2)
            ready = r.status == 401  # the service answers (through the proxy) and wants a token
        except urllib3.exceptions.HTTPError:
            ready = False
        if ready:
            break
        time.sleep(0.2)
    if not ready:
        hub.stop()
        tail = (workdir / "hub.log").read_text(errors="replace")[-4000:]
        raise RuntimeError(f"JupyterHub did not come up:\n{tail}")
    return hub


def same_user_spawner_config(homes: Path, env: dict) -> str:
    """Hub config lines: servers are real ``jupyterhub-singleuser`` processes, run as this test's
    OS user with a home folder per Hub user under ``homes``, their token scoped to the labvault
    service (what the labvault spawner grants), ``env`` added to their environment."""
    args = ["--allow-root"] if os.geteuid() == 0 else []
    return f"""
import os
from pathlib import Path
from jupyterhub.spawner import LocalProcessSpawner

class SameUserSpawner(LocalProcessSpawner):
    '''LocalProcessSpawner without switching OS users: each Hub user gets a home folder.'''

    def make_preexec_fn(self, name):
        return None

    def user_env(self, env):
        home = Path({str(homes)!r}) / self.user.name
        home.mkdir(parents=True, exist_ok=True)
        env.update(USER=self.user.name, HOME=str(home))
        return env

c.JupyterHub.spawner_class = SameUserSpawner
c.Spawner.cmd = [{str(Path(sys.executable).with_name("jupyterhub-singleuser"))!r}]
c.Spawner.args = {args!r}
c.Spawner.notebook_dir = {str(homes)!r} + "/{{username}}"
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 90
c.Spawner.http_timeout = 90
c.Spawner.environment = {{"LABVAULT_SERVICE_URL": os.environ["LABVAULT_SERVICE_URL"], **{env!r}}}
# the server's own token (the kernels' JUPYTERHUB_API_TOKEN) may call the labvault service
c.Spawner.server_token_scopes = ["users:activity!user", "access:servers!server",
                                 "access:services!service=labvault"]
"""
