"""End to end through the Hub: a real single-user server spawned by JupyterHub with the shipped
labvault config, reached through the proxy with the user's token, and JupyterLab in headless
Chromium logged in through the Hub.

The spawner here is the stock LocalProcessSpawner running the server as the test's own OS user
(the labvault spawner is tested elsewhere); it passes what the labvault spawner passes:
``LABVAULT_SERVICE_URL``, ``LABVAULT_ALLOWED_KERNELS`` and a server token that may call the
service. The browser test needs Debian's /usr/bin/chromium: without it, it skips with the reason
shown, unless ``LABVAULT_REQUIRE_BROWSER=1`` (CI), which makes that a failure.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from extsupport import NOW, ROOT, SHIPPED_CONFIG, main_conftest, seed_files

from labvault.datastore import demo
from labvault.datastore import operations as ops
from labvault.datastore.db import make_engine, session_factory

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
A, OPEN, OLD = "NLS-2026-0001", "NLS-2026-0002", "NLS-2025-0042"
SERVER_SCOPES = ["access:servers!user", "servers!user", "read:users!user"]


def installed_config_dir() -> str | None:
    """The Jupyter config dir the server should read labvault.json from: the installed one
    (``<prefix>/etc/jupyter``) when labvault is installed with its data files, else the source."""
    installed = Path(sys.prefix) / "etc" / "jupyter" / "jupyter_server_config.d" / "labvault.json"
    return None if installed.exists() else str(SHIPPED_CONFIG.parent.parent)


def spawner_config(homes: Path) -> str:
    from hubtools import same_user_spawner_config

    config_dir = installed_config_dir()
    env = {"LABVAULT_ALLOWED_KERNELS": "python3"}
    if config_dir:
        env["JUPYTER_CONFIG_PATH"] = config_dir
    return same_user_spawner_config(homes, env)


@pytest.fixture(scope="module")
def spawning_hub(request, tmp_path_factory):
    from hubtools import start_hub  # tests/ is on sys.path (conftest.py puts it there)

    workdir = tmp_path_factory.mktemp("spawnhub")
    url = main_conftest().fresh_database_url(request, "sqlite", workdir)
    engine = make_engine(url)
    factory = session_factory(engine)
    demo.seed(factory, ops.Actor(operator="test"), now=NOW)
    data = workdir / "data"
    data.mkdir()
    contents = seed_files(factory, data, workdir)
    homes = workdir / "homes"
    homes.mkdir()
    hub = start_hub(workdir, url, now=NOW, service_config=spawner_config(homes))
    hub.contents, hub.homes = contents, homes
    yield hub
    hub.stop()
    engine.dispose()


def start_server(hub, name: str) -> str:
    """Start ``name``'s server through the Hub API; return a token that reaches it."""
    token = hub.token(name, scopes=[f"{s}={name}" for s in SERVER_SCOPES])
    r = hub.hub_request("POST", f"/users/{name}/server", token=token)
    assert r.status in (201, 202), r.data[:500]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        model = json.loads(hub.hub_request("GET", f"/users/{name}", token=token).data)
        server = (model.get("servers") or {}).get("")
        if server and server.get("ready"):
            return token
        time.sleep(0.5)
    log = (hub.workdir / "hub.log").read_text(errors="replace")[-3000:]
    raise AssertionError(f"{name}'s server did not become ready:\n{log}")


def through_proxy(hub, name: str, token: str, path: str):
    r = hub.http.request("GET", f"{hub.url}/user/{name}/{path}", headers={"Authorization": f"token {token}"},
                         redirect=False)
    try:
        return r.status, json.loads(r.data)
    except ValueError:  # e.g. jupyter_server's plain-text body of a contents 404
        return r.status, r.data


def test_a_spawned_server_shows_only_what_frank_may_access_until_it_ends(spawning_hub):
    hub = spawning_hub
    hub.set_clock(NOW)
    token = start_server(hub, "frank")
    status, listing = through_proxy(hub, "frank", token, "api/contents/experiments")
    assert status == 200, listing
    assert sorted(m["name"] for m in listing["content"]) == [A, OPEN]
    status, meta = through_proxy(hub, "frank", token,
                                 f"labvault/h5grove/meta/?file=experiments/{A}/scan/frames.h5&path=/entry/data")
    assert status == 200 and meta["shape"] == [12, 64, 64]
    status, specs = through_proxy(hub, "frank", token, "api/kernelspecs")
    assert set(specs["kernelspecs"]) == {"python3"}
    # the same open server, 31 days after the experiment ended: gone at the next request
    hub.set_clock(NOW + timedelta(days=21))
    try:
        status, listing = through_proxy(hub, "frank", token, "api/contents/experiments")
        assert status == 200 and [m["name"] for m in listing["content"]] == [OPEN]
        r = hub.http.request("GET", f"{hub.url}/user/frank/api/contents/experiments/{A}/README.txt",
                             headers={"Authorization": f"token {token}"})
        assert r.status == 404 and r.headers["X-Labvault-Rule"] == "facility.access_window"
    finally:
        hub.set_clock(NOW)


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's chromium, or a visible skip (a failure with LABVAULT_REQUIRE_BROWSER=1)."""
    if not CHROMIUM.exists():
        message = f"browser test needs Debian's chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("LABVAULT_REQUIRE_BROWSER") == "1":
            pytest.fail(message + " and LABVAULT_REQUIRE_BROWSER=1")
        pytest.skip(message)
    return CHROMIUM


def test_jupyterlab_in_chromium_shows_exactly_the_permitted_experiments(chromium, spawning_hub):
    from playwright.sync_api import sync_playwright

    hub = spawning_hub
    hub.set_clock(NOW)
    ARTIFACTS.mkdir(exist_ok=True)
    expected = sorted([A, OLD, OPEN])  # alice, the PI
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), headless=True,
                                     args=["--no-sandbox"] if os.geteuid() == 0 else [])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{hub.url}/hub/login")
            page.fill("input[name=username]", "alice")
            page.fill("input[name=password]", "any password: the test Hub's dummy authenticator")
            page.click("#login_submit")
            page.wait_for_url("**/user/alice/lab**", timeout=120_000)
            page.goto(f"{hub.url}/user/alice/lab/tree/experiments")
            items = page.locator(".jp-DirListing-content .jp-DirListing-itemText")
            deadline = time.monotonic() + 60
            shown: list[str] = []
            while time.monotonic() < deadline:
                shown = sorted(t.strip() for t in items.all_inner_texts())
                if shown == expected:
                    break
                time.sleep(0.5)
            page.screenshot(path=str(ARTIFACTS / "extension-file-browser.png"), full_page=True)
            assert shown == expected
        finally:
            browser.close()
