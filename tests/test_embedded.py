"""The embedded default (what `make run` starts): its configuration as a pure function, and
the whole deployment end to end — the same commands as `make run`, a real JupyterHub from
jupyterhub_config/jupyterhub_config.py, a demo user signing in with the demo password and
seeing exactly their experiments under /experiments in their own single-user server."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from hubtools import ROOT, free_port, require_proxy
from traitlets.config import Config

from labvault.datastore.demo import DEMO_PASSWORD
from labvault.hub.embedded import configure


def test_configure_is_a_pure_config_with_secrets_in_files(tmp_path, monkeypatch):
    monkeypatch.delenv("JUPYTERHUB_CRYPT_KEY", raising=False)
    c = Config()
    configure(c, tmp_path / "data", port=8123, service_port=8999, smtp_port=8998, python="/py")
    data = tmp_path / "data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("hub_secret", "crypt_key"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600
        assert re.fullmatch(r"[0-9a-f]{64}", (data / name).read_text().strip())
    assert os.environ["JUPYTERHUB_CRYPT_KEY"] == (data / "crypt_key").read_text().strip()
    assert c.JupyterHub.authenticator_class == "labvault"
    assert c.JupyterHub.spawner_class == "labvault-local"
    assert c.Authenticator.enable_auth_state is True
    service, mailbox = c.JupyterHub.services
    assert service["name"] == "labvault" and service["url"] == "http://127.0.0.1:8999"
    assert service["environment"] == {"LABVAULT_HUB_SECRET": (data / "hub_secret").read_text().strip()}
    # the Hub logs service command lines: no database URL, no secret there
    assert not any("sqlite" in a or "postgres" in a or service["environment"]["LABVAULT_HUB_SECRET"] in a
                   for a in service["command"] + mailbox["command"])
    assert "--port=8998" in mailbox["command"]
    assert "c.Mailer.smtp_port = 8998" in (data / "labvault_config.py").read_text()
    # secrets are made once: a second start keeps them (sessions and auth_state survive)
    before = (data / "hub_secret").read_text()
    configure(Config(), data)
    assert (data / "hub_secret").read_text() == before


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """`make run`, with free ports, in a temporary data directory."""
    require_proxy()
    data = tmp_path_factory.mktemp("embedded") / "var"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("LABVAULT_DB_URL", None)
    cli = [sys.executable, "-m", "labvault.datastore.cli"]
    for args in (["init"], ["demo"], ["environment", "sync"]):
        subprocess.run(cli + args + ["--data-dir", str(data)], check=True, env=env, capture_output=True, timeout=300)
    ports = {"LABVAULT_PORT": free_port(), "LABVAULT_HUB_PORT": free_port(), "LABVAULT_PROXY_API_PORT": free_port(),
             "LABVAULT_SERVICE_PORT": free_port(), "LABVAULT_SMTP_PORT": free_port()}
    env.update({k: str(v) for k, v in ports.items()}, LABVAULT_DATA_DIR=str(data))
    log = open(data.parent / "hub.log", "wb")  # noqa: SIM115 - closed below
    hub = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(ROOT / "jupyterhub_config" / "jupyterhub_config.py")],
                           cwd=data.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{ports['LABVAULT_PORT']}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and hub.poll() is None:
        try:
            if requests.get(base + "/hub/login", timeout=2).status_code == 200 and requests.get(
                    base + "/services/labvault/api/v1/me", timeout=2).status_code == 401:
                break
        except requests.RequestException:
            pass
        time.sleep(0.3)
    else:
        hub.terminate()
        raise RuntimeError("the embedded default did not come up:\n" + (data.parent / "hub.log").read_text()[-3000:])
    yield base, data
    hub.terminate()
    try:
        hub.wait(30)
    except subprocess.TimeoutExpired:
        hub.kill()
    log.close()


def sign_in(base: str, user: str, password: str = DEMO_PASSWORD) -> requests.Session:
    s = requests.Session()
    s.get(base + "/hub/login")
    r = s.post(base + "/hub/login?next=", data={"username": user, "password": password,
                                               "_xsrf": s.cookies.get("_xsrf", path="/hub/")})
    s.last = r
    return s


def server_contents(base: str, s: requests.Session, user: str, environment: str = "python-scientific"):
    """Start the user's server with ``environment`` and return a function listing a path."""
    hub_xsrf = s.cookies.get("_xsrf", path="/hub/")
    r = s.post(base + "/hub/spawn", data={"environment": environment, "_xsrf": hub_xsrf})
    assert r.status_code == 200, r.text[:500]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        r = s.get(base + f"/user/{user}/lab")
        if r.status_code == 200 and r.url.endswith(f"/user/{user}/lab"):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"{user}'s server did not start: {r.status_code} {r.url}")
    xsrf = [c.value for c in s.cookies if c.name == "_xsrf" and c.path.startswith(f"/user/{user}")][0]

    def h5(endpoint: str, **params):
        r = s.get(base + f"/user/{user}/labvault/h5grove/{endpoint}/", params=params, headers={"X-XSRFToken": xsrf})
        return r.status_code, (r.json() if r.headers.get("Content-Type", "").startswith("application/json") else r.text)

    def ls(path: str):
        r = s.get(base + f"/user/{user}/api/contents/{path}", headers={"X-XSRFToken": xsrf})
        if r.status_code != 200:
            return r.status_code, r.text[:300]
        return r.status_code, sorted(c["name"] for c in r.json().get("content") or [])

    ls.h5 = h5
    return ls


@pytest.mark.slow
def test_make_run_signs_in_a_demo_user_who_sees_exactly_their_experiments(embedded):
    base, data = embedded
    refused = sign_in(base, "bob", "wrong password").last
    assert refused.status_code == 403 and "password" in refused.text.lower()
    s = sign_in(base, "bob")
    assert s.last.status_code == 200
    form = s.get(base + "/hub/spawn").text
    assert "python-scientific" in form
    ls = server_contents(base, s, "bob")
    assert ls("") == (200, ["experiments", "personal", "shared-with-me"])
    assert ls("experiments") == (200, ["NLS-2026-0001", "NLS-2026-0002"])  # writer + public
    assert ls("experiments/NLS-2026-0001/scan-0001") == (200, ["frames.h5"])
    assert ls("experiments/NLS-2025-0042")[0] == 404  # not his: not even its existence
    # the HDF5 file's structure and a frame, through the server extension and the service
    f = "experiments/NLS-2026-0001/scan-0001/frames.h5"
    status, meta = ls.h5("meta", file=f, path="/entry/data/data")
    assert status == 200 and meta["kind"] == "dataset" and meta["shape"] == [24, 256, 256], meta
    status, row = ls.h5("data", file=f, path="/entry/data/data", selection="3,128,0:4", format="json")
    assert status == 200 and len(row) == 4
    # vera (vendor staff): never proprietary data, not even as an environment to start
    v = sign_in(base, "vera")
    assert "alpine-pipeline" not in v.get(base + "/hub/spawn").text
    assert server_contents(base, v, "vera")("experiments") == (200, ["NLS-2026-0002"])


@pytest.mark.slow
def test_the_local_mailbox_keeps_and_prints_mail(embedded):
    base, data = embedded
    s = requests.Session()
    page = s.get(base + "/hub/labvault/signup")
    assert page.status_code == 200
    r = s.post(base + "/hub/labvault/signup", data={
        "username": "dora", "display_name": "Dora Demo", "institution": "Alpine University",
        "email": "dora@alpine-uni.example", "password": "a long enough password",
        "password2": "a long enough password", "adult": "yes", "_xsrf": s.cookies.get("_xsrf", path="/hub/")})
    assert r.status_code == 200, r.text[:500]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not list((data / "mail").glob("*.eml")):
        time.sleep(0.2)
    mails = list((data / "mail").glob("*.eml"))
    assert mails and "dora@alpine-uni.example" in mails[0].read_text()
    assert "/hub/labvault/confirm" in mails[0].read_text()
    assert "labvault mailbox:   http" in (data.parent / "hub.log").read_text()  # the link, on the console
