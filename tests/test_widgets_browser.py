"""The widgets where PIs use them: in a notebook of a single-user server that JupyterHub spawned.

1. A kernel of a Hub-spawned server runs ``RoleManager`` with nothing but what the spawner gave
   it (``LABVAULT_SERVICE_URL`` and the server's token): the grant lands in the datastore.
2. JupyterLab in headless Chromium: the PI logs in through the Hub, opens a notebook, runs
   ``RoleManager``, grants a role by typing and clicking; the scientist then sees the experiment
   (in ``ExperimentBrowser``, and in the ``/experiments`` tree when the server extension is
   there). Screenshots of every widget are kept as test artifacts (the PI guide's pictures), in
   the directory the test prints. It needs Debian's /usr/bin/chromium (never ``playwright
   install``): without it the test skips with the reason shown, unless
   ``LABVAULT_REQUIRE_BROWSER=1``, which makes that a failure.

The spawner is the stock LocalProcessSpawner running every server as the test's own OS user
(the labvault spawner is tested elsewhere), passing what the labvault spawner passes.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import fresh_database_url
from hubtools import ROOT, same_user_spawner_config, start_hub
from sqlalchemy import select

from labvault.datastore import demo
from labvault.datastore import operations as ops
from labvault.datastore.client import Client
from labvault.datastore.db import make_engine, session_factory
from labvault.datastore.models import Experiment, RoleGrant, User
from labvault.datastore.store import ChunkStore

pytestmark = pytest.mark.slow

NOW = datetime.now(timezone.utc).replace(microsecond=0)
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("LABVAULT_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "widgets"
EXTENSION_CONFIG = ROOT / "extension" / "jupyter-config" / "jupyter_server_config.d" / "labvault.json"
A = "NLS-2026-0001"
SERVER_SCOPES = ["access:servers!user", "servers!user", "read:users!user"]


def spawner_config(workdir: Path) -> str:
    homes = workdir / "homes"
    homes.mkdir(exist_ok=True)
    # JupyterLab without its news and update questions (a toast over the notebook)
    settings = workdir / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {"LABVAULT_ALLOWED_KERNELS": "python3", "JUPYTERLAB_SETTINGS_DIR": str(workdir / "lab-settings")}
    installed = Path(sys.prefix) / "etc" / "jupyter" / "jupyter_server_config.d" / "labvault.json"
    if not installed.exists() and EXTENSION_CONFIG.exists():  # the /experiments tree, from the source
        env["JUPYTER_CONFIG_PATH"] = str(EXTENSION_CONFIG.parent.parent)
    return same_user_spawner_config(homes, env)


@pytest.fixture(scope="module")
def hub(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("widgets-hub")
    url = fresh_database_url(request, "sqlite", workdir)
    engine = make_engine(url)
    factory = session_factory(engine)
    demo.seed(factory, ops.Actor(operator="test"), now=NOW)
    data = workdir / "data"
    data.mkdir()
    store = ChunkStore(sessions=factory, data_dir=str(data))
    store.prepare_locations()
    src = workdir / "frames.h5"
    yy, xx = np.mgrid[0:128, 0:128]
    ring = np.exp(-((np.hypot(yy - 64, xx - 64) - 30) ** 2) / 20.0)
    with h5py.File(src, "w") as f:
        f.create_dataset("entry/data/data", chunks=(1, 128, 128),
                         data=np.stack([(np.random.default_rng(i).poisson(5, (128, 128)) + 800 * ring * (1 + i / 8))
                                        .astype(np.uint16) for i in range(8)]))
    with factory() as s:
        alice = ops.Actor(user_id=s.scalar(select(User.id).where(User.name == "alice")))
    store.ingest_file(alice, A, src, "scan-0001/frames.h5", now=NOW)
    h = start_hub(workdir, url, now=NOW, service_config=spawner_config(workdir))
    h.factory = factory
    yield h
    h.stop()
    engine.dispose()


# -- the Hub and the single-user server ---------------------------------------------------
def start_server(hub, name: str) -> str:
    """Start ``name``'s server through the Hub API; return a token that reaches it."""
    token = hub.token(name, scopes=[f"{s}={name}" for s in SERVER_SCOPES])
    r = hub.hub_request("POST", f"/users/{name}/server", token=token)
    assert r.status in (201, 202, 400), r.data[:500]  # 400: already running
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        model = json.loads(hub.hub_request("GET", f"/users/{name}", token=token).data)
        server = (model.get("servers") or {}).get("")
        if server and server.get("ready"):
            return token
        time.sleep(0.5)
    log = (hub.workdir / "hub.log").read_text(errors="replace")[-3000:]
    raise AssertionError(f"{name}'s server did not become ready:\n{log}")


def server_api(hub, name: str, token: str, method: str, path: str, body=None):
    r = hub.http.request(method, f"{hub.url}/user/{name}/api/{path}",
                         headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
                         body=json.dumps(body) if body is not None else None)
    try:
        return r.status, json.loads(r.data) if r.data else None
    except ValueError:
        return r.status, r.data


def run_in_kernel(hub, name: str, token: str, code: str, timeout: float = 90) -> str:
    """Run ``code`` in a new kernel of ``name``'s server (over the kernel websocket); return its
    stdout. Errors in the kernel fail the test with the kernel's traceback."""
    import websocket

    status, kernel = server_api(hub, name, token, "POST", "kernels", {"name": "python3"})
    assert status == 201, kernel
    ws = websocket.create_connection(
        f"{hub.url.replace('http', 'ws', 1)}/user/{name}/api/kernels/{kernel['id']}/channels",
        header=[f"Authorization: token {token}"], timeout=timeout)
    try:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "username": name, "session": uuid.uuid4().hex,
                       "msg_type": "execute_request", "version": "5.3", "date": datetime.now(timezone.utc).isoformat()},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True},
        }))
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "error":
                pytest.fail("the kernel raised:\n" + "\n".join(msg["content"]["traceback"]))
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                return "".join(out)
        pytest.fail(f"the kernel did not finish in {timeout} s; output so far: {''.join(out)!r}")
    finally:
        ws.close()
        server_api(hub, name, token, "DELETE", f"kernels/{kernel['id']}")


def active_roles(hub, exid: str, user: str) -> list[str]:
    with hub.factory() as s:
        return sorted(g.role.value for g in s.scalars(
            select(RoleGrant).join(Experiment, Experiment.id == RoleGrant.experiment_id)
            .join(User, User.id == RoleGrant.user_id)
            .where(Experiment.exid == exid, User.name == user, RoleGrant.revoked_at.is_(None))))


# -- 1. a kernel of a spawned server ---------------------------------------------------------
def test_role_manager_in_a_kernel_of_a_hub_spawned_server(hub):
    token = start_server(hub, "alice")
    assert active_roles(hub, A, "carol") == []
    out = run_in_kernel(hub, "alice", token, f"""
import os
from labvault.widgets import RoleManager
rm = RoleManager({A!r})          # Client() from the environment the spawner gave the kernel
rm.people.query.value = "carol"
rm.role.value = "viewer"
rm.grant_button.click()
print("ERROR", rm.last_error)
print("STATUS", rm.status.value)
print("ENV", sorted(k for k in os.environ if k.startswith("LABVAULT_")))
""")
    assert "ERROR None" in out, out
    assert "carol is now viewer" in out
    # the kernel holds the service's address and the user's token, no database URL or secret
    assert "ENV ['LABVAULT_ALLOWED_KERNELS', 'LABVAULT_SERVICE_URL']" in out, out
    assert active_roles(hub, A, "carol") == ["viewer"]
    # and revoked again, for the browser test that follows
    out = run_in_kernel(hub, "alice", token, f"""
from labvault.widgets import RoleManager
rm = RoleManager({A!r})
rm.revoke_buttons[("carol", "viewer")].click()
print("ERROR", rm.last_error)
""")
    assert "ERROR None" in out and active_roles(hub, A, "carol") == []


# -- 2. JupyterLab in Chromium -----------------------------------------------------------------
@pytest.fixture(scope="module")  # module scope: asked before the module's Hub starts
def chromium():
    reason = None
    if not CHROMIUM.exists():
        reason = f"the browser test needs Debian's chromium at {CHROMIUM} (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the browser test needs the playwright package (the test extra)"
    if reason:
        if os.environ.get("LABVAULT_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " and LABVAULT_REQUIRE_BROWSER=1")
        pytest.skip(reason)
    return CHROMIUM


PI_NOTEBOOK = [
    f'from labvault.widgets import RoleManager\nRoleManager("{A}")',
    f'from labvault.widgets import SharingPanel\nSharingPanel("{A}")',
    f'from labvault.widgets import RetentionPanel\nRetentionPanel("{A}")',
    f'from labvault.widgets import AuditTrail\nAuditTrail("{A}")',
    f'from labvault.widgets import ExperimentBrowser\nExperimentBrowser().show("{A}", "scan-0001/frames.h5", "/entry/data/data")',
    "from labvault.widgets import MyAccount\nMyAccount()",
]
SHOTS = ["role-manager", "sharing-panel", "retention-panel", "audit-trail", "experiment-browser", "my-account"]


def notebook(cells: list[str]) -> dict:
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return json.loads(nbformat.writes(nb))


def wait_for_idle_kernel(hub, name: str, token: str, timeout: float = 90) -> None:
    """Poll the server until the notebook's kernel is idle and the page is connected to it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, kernels = server_api(hub, name, token, "GET", "kernels")
        if status == 200 and any(k["execution_state"] == "idle" and k.get("connections", 0) > 0 for k in kernels):
            return
        time.sleep(0.5)
    pytest.fail(f"{name}'s notebook kernel did not become idle and connected")


def open_notebook(page, hub, name: str, token: str, path: str, cells: list[str]) -> None:
    status, _ = server_api(hub, name, token, "PUT", f"contents/{path}",
                           {"type": "notebook", "format": "json", "content": notebook(cells)})
    assert status in (200, 201)
    page.goto(f"{hub.url}/user/{name}/lab/tree/{path}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
    wait_for_idle_kernel(hub, name, token)


def log_in(browser, hub, name: str):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(f"{hub.url}/hub/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", "any password: the test Hub's dummy authenticator")
    page.click("#login_submit")
    page.wait_for_url(f"**/user/{name}/lab**", timeout=120_000)
    return page


def run_cell(page, index: int):
    """Run cell ``index`` with Shift+Enter; return the locator of its output area."""
    cell = page.locator(".jp-NotebookPanel:visible .jp-Cell").nth(index)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")
    output = cell.locator(".jp-OutputArea-output")
    output.first.wait_for(timeout=60_000)
    return cell


def test_pi_grants_a_role_by_clicking_in_jupyterlab(chromium, hub):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots of the widgets: {ARTIFACTS}")
    alice_token = start_server(hub, "alice")
    carol_token = start_server(hub, "carol")
    assert A not in {e["exid"] for e in Client(hub.service_url, hub.token("carol")).experiments()}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), headless=True,
                                     args=["--no-sandbox"] if os.geteuid() == 0 else [])
        try:
            page = log_in(browser, hub, "alice")
            open_notebook(page, hub, "alice", alice_token, "labvault-widgets.ipynb", PI_NOTEBOOK)
            cell = run_cell(page, 0)
            expect(cell.get_by_text(f"Roles of {A}")).to_be_visible(timeout=60_000)
            cell.screenshot(path=str(ARTIFACTS / "role-manager-before.png"))
            # search by typing (committed with Enter), choose, grant by clicking
            search = cell.locator("input[placeholder='search a name (2+ letters)']")
            search.fill("carol")
            search.press("Enter")
            expect(cell.locator(".widget-dropdown select").first).to_contain_text("Carol Chen", timeout=30_000)
            cell.get_by_role("button", name="Grant role").click()
            expect(cell.get_by_text(f"carol is now viewer of {A}")).to_be_visible(timeout=30_000)
            cell.screenshot(path=str(ARTIFACTS / "role-manager.png"))
            assert active_roles(hub, A, "carol") == ["viewer"]
            # the other widgets, for the PI guide
            for i, shot in enumerate(SHOTS[1:], start=1):
                cell = run_cell(page, i)
                cell.locator(".widget-box").first.wait_for(timeout=60_000)
                page.wait_for_timeout(1500)  # images and tables settle
                cell.screenshot(path=str(ARTIFACTS / f"{shot}.png"))

            # the scientist now sees the experiment
            assert A in {e["exid"] for e in Client(hub.service_url, hub.token("carol")).experiments()}
            page = log_in(browser, hub, "carol")
            open_notebook(page, hub, "carol", carol_token, "browse.ipynb",
                          ["from labvault.widgets import ExperimentBrowser\nExperimentBrowser()"])
            cell = run_cell(page, 0)
            expect(cell.locator(".widget-select select").first).to_contain_text(A, timeout=60_000)
            cell.screenshot(path=str(ARTIFACTS / "scientist-experiment-browser.png"))
            status, listing = server_api(hub, "carol", carol_token, "GET", "contents/experiments")
            if status == 200:  # the /experiments tree of the server extension
                assert A in [m["name"] for m in listing["content"]]
                page.goto(f"{hub.url}/user/carol/lab/tree/experiments")
                expect(page.locator(".jp-DirListing-content").get_by_text(A)).to_be_visible(timeout=60_000)
                page.screenshot(path=str(ARTIFACTS / "scientist-experiments-tree.png"))
        except Exception:  # what the browser showed when it failed
            for i, shown in enumerate(pg for ctx in browser.contexts for pg in ctx.pages):
                shown.screenshot(path=str(ARTIFACTS / f"failure-{i}.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert {f"{s}.png" for s in SHOTS} <= {p.name for p in ARTIFACTS.glob("*.png")}
