"""Hidden and traversal paths are refused before anything is read or asked: ``..``, ``%2e%2e``,
absolute, NUL, backslashes, and symlinks out of the home directory.

"Nothing read" is shown three ways: the server made no call to the service, the service's
audit log did not grow, and a symlink to a FIFO outside the home (which would block any reader
until a writer comes) answers at once.
"""

from __future__ import annotations

import json
import os

import pytest
from extsupport import audit_count

pytestmark = pytest.mark.slow

A, OLD = "NLS-2026-0001", "NLS-2025-0042"
CANARY = "canary-3f9a-must-never-be-served"


@pytest.fixture
def raw(http_server_client, jp_base_url, jp_auth_header):
    """GET a URL exactly as written (jp_fetch would escape the % of %2e)."""

    async def get(path: str):
        r = await http_server_client.fetch(jp_base_url.rstrip("/") + "/" + path, headers=jp_auth_header,
                                           raise_error=False, request_timeout=10)
        return r.code, r.body.decode(errors="replace")

    return get


@pytest.fixture
def outside(tmp_path, jp_root_dir):
    """A secret next to the home directory, a FIFO, and symlinks into both from the home."""
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "secret.txt").write_text(CANARY)
    fifo = tmp_path / "blocking-fifo"
    os.mkfifo(fifo)
    (jp_root_dir / "escape").symlink_to(secret)
    (jp_root_dir / "escape-file.txt").symlink_to(secret / "secret.txt")
    (jp_root_dir / "fifo-link").symlink_to(fifo)
    (jp_root_dir / "inside").mkdir()
    (jp_root_dir / "inside" / "ok.txt").write_text("fine")
    (jp_root_dir / "link-inside").symlink_to(jp_root_dir / "inside")  # stays in the home: allowed
    return secret


TRAVERSALS = [
    f"api/contents/experiments/{A}/../{OLD}/old/calib.txt",
    f"api/contents/experiments/{A}/%2e%2e/{OLD}/old/calib.txt",
    f"api/contents/experiments/{A}/%2E%2E%2F%2E%2E%2Fescape%2Fsecret.txt",
    f"api/contents/experiments/{A}/scan/%2e/frames.h5",
    "api/contents/experiments/%2Fetc%2Fpasswd",
    "api/contents/experiments/..%2F..%2Fescape%2Fsecret.txt",
    f"api/contents/experiments/{A}/README.txt%00.ipynb",
    f"api/contents/experiments/{A}/scan%5C..%5C..%5Cx",
    f"api/contents/experiments/{A}/scan%2F%2Fframes.h5",
    "api/contents/%2e%2e/outside/secret.txt",
    "api/contents/..%2Foutside%2Fsecret.txt",
    "api/contents/inside/%2e%2e/%2e%2e/outside/secret.txt",
    "api/contents/%2Fetc%2Fpasswd",
    "api/contents/escape/secret.txt",
    "api/contents/escape",
    "api/contents/escape-file.txt",
    "api/contents/fifo-link",
    "api/contents/mine%00.txt",
    "files/escape/secret.txt",
    "files/escape-file.txt",
    "files/fifo-link",
    "files/..%2Foutside%2Fsecret.txt",
    f"files/experiments/{A}/%2e%2e/{OLD}/old/calib.txt",
    f"files/experiments/{A}/README.txt%00",
    f"labvault/h5grove/meta/?file=experiments/{A}/../{OLD}/old/calib.txt",
    f"labvault/h5grove/meta/?file=experiments/{A}/%2e%2e/{OLD}/x.h5",
    "labvault/h5grove/meta/?file=escape/secret.txt",
    "labvault/h5grove/meta/?file=fifo-link",
    "labvault/h5grove/meta/?file=%2Fetc%2Fpasswd",
    "labvault/h5grove/data/?file=..%2Foutside%2Fsecret.txt",
    # (query arguments reach no one with a NUL: tornado turns control characters into spaces)
]


@pytest.mark.parametrize("user", ["frank"])
async def test_traversal_is_refused_with_nothing_read(raw, outside, cm, hub, jp_fetch):
    calls, events = cm.connection.calls, audit_count(hub)
    for url in TRAVERSALS:
        status, body = await raw(url)
        assert status in (400, 404), (url, status, body)
        assert CANARY not in body and "root:" not in body, url
        if body.startswith("{"):
            payload = json.loads(body)
            assert "message" in payload or "reason" in payload, url
    assert cm.connection.calls == calls  # not one request reached the service
    assert audit_count(hub) == events
    # the home's own links that stay inside work; links that leave it are not even listed
    status, body = await raw("api/contents/link-inside/ok.txt")
    assert status == 200 and json.loads(body)["content"] == "fine"
    listing = json.loads((await jp_fetch("api", "contents")).body)
    listed = {m["name"] for m in listing["content"]}
    assert {"inside", "link-inside", "experiments"} <= listed
    assert not listed & {"escape", "escape-file.txt", "fifo-link"}


async def test_hidden_datastore_paths_are_not_served(raw, cm):
    status, _ = await raw(f"api/contents/experiments/{A}/.hidden/secret.txt")
    assert status == 404
    status, body = await raw(f"labvault/h5grove/meta/?file=experiments/{A}/.hidden/secret.txt")
    assert status == 404 and json.loads(body)["rule"] == "labvault.path"


async def test_writes_with_bad_paths_are_refused(jp_fetch, jp_root_dir, http_server_client, jp_base_url,
                                                 jp_auth_header):
    body = json.dumps({"type": "file", "format": "text", "content": CANARY})
    for url in (f"api/contents/experiments/{A}/%2e%2e/{OLD}/x.txt", "api/contents/%2e%2e/planted.txt",
                "api/contents/escape-dir%2F..%2F..%2Fplanted.txt"):
        r = await http_server_client.fetch(jp_base_url.rstrip("/") + "/" + url, method="PUT", body=body,
                                           headers=jp_auth_header, raise_error=False)
        assert r.code in (400, 404), (url, r.code)
    assert not (jp_root_dir.parent / "planted.txt").exists()
