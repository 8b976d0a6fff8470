"""The contents REST API of a real jupyter_server with the labvault extension, used as JupyterLab
uses it, against the real datastore service behind a real JupyterHub.

Every listing and read under /experiments is a request the service decides at that moment;
notebooks save in the home directory; /experiments is read-only except uploads the role allows.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import timedelta
from urllib.parse import unquote

import nbformat
import pytest
from extsupport import NOTEBOOK, NOW, audit_count
from tornado.httpclient import HTTPClientError

pytestmark = pytest.mark.slow

A = "NLS-2026-0001"  # proprietary, ended 10 days before NOW: alice PI, bob writer, frank facility
OPEN = "NLS-2026-0002"  # public
OLD = "NLS-2025-0042"  # ended 60 days before NOW: frank's facility access is over


async def api(jp_fetch, *parts, method="GET", body=None, params=None):
    """(status, JSON body, headers) of a contents API call, errors included."""
    kwargs = {"method": method, "raise_error": False, "params": params}
    if body is not None:
        kwargs["body"] = json.dumps(body)
    elif method in ("POST", "PUT", "PATCH"):
        kwargs["body"] = ""
        kwargs["allow_nonstandard_methods"] = True
    r = await jp_fetch("api", "contents", *parts, **kwargs)
    try:
        payload = json.loads(r.body) if r.body else None
    except ValueError:
        payload = r.body.decode(errors="replace")
    return r.code, payload, r.headers


def names(model) -> list[str]:
    return sorted(m["name"] for m in model["content"])


# --- listing ------------------------------------------------------------------------------------
async def test_root_shows_the_home_and_the_experiments_folder(jp_fetch, jp_root_dir):
    (jp_root_dir / "mine.txt").write_text("my own file")
    (jp_root_dir / "experiments").mkdir()  # a home folder of that name is hidden by the overlay
    (jp_root_dir / "experiments" / "local.txt").write_text("shadowed")
    status, root, _ = await api(jp_fetch, "")
    assert status == 200
    assert names(root) == ["experiments", "mine.txt", "personal", "shared-with-me"]
    overlay = next(m for m in root["content"] if m["name"] == "experiments")
    assert overlay["type"] == "directory" and overlay["writable"] is False
    status, model, _ = await api(jp_fetch, "experiments")
    assert status == 200 and "local.txt" not in names(model)


@pytest.mark.parametrize(("user", "expected"), [
    ("alice", [OLD, A, OPEN]),
    ("bob", [A, OPEN]),
    ("carol", [OPEN]),
    ("frank", [A, OPEN]),
    ("vera", [OPEN]),
])
async def test_experiments_lists_exactly_what_the_policy_allows(jp_fetch, user, expected):
    status, model, _ = await api(jp_fetch, "experiments", params={"content": "1"})
    assert status == 200
    assert names(model) == sorted(expected)
    assert all(m["type"] == "directory" and m["path"] == f"experiments/{m['name']}" for m in model["content"])


async def test_an_experiment_lists_as_folders_and_files(jp_fetch, hub):
    status, model, _ = await api(jp_fetch, "experiments", A)
    assert status == 200
    assert {"README.txt", "notes", "scan"} <= set(names(model))  # (+ what test_a_writer_uploads adds)
    assert ".hidden" not in names(model)
    readme = next(m for m in model["content"] if m["name"] == "README.txt")
    assert readme["size"] == len(hub.contents[f"{A}/README.txt"]) and readme["type"] == "file"
    assert readme["writable"] is False and readme["path"] == f"experiments/{A}/README.txt"
    status, scan, _ = await api(jp_fetch, "experiments", A, "scan")
    assert status == 200 and names(scan) == ["frames.h5"]
    assert scan["content"][0]["size"] == len(hub.contents[f"{A}/scan/frames.h5"])
    status, notes, _ = await api(jp_fetch, "experiments", A, "notes")
    assert notes["content"][0]["type"] == "notebook"
    status, body, _ = await api(jp_fetch, "experiments", A, "nothing-here")
    assert status == 404
    status, body, _ = await api(jp_fetch, "experiments", A, ".hidden", "secret.txt")
    assert status == 404


# --- reading --------------------------------------------------------------------------------------
async def test_get_a_text_file_with_its_hash(jp_fetch, hub):
    status, model, headers = await api(jp_fetch, "experiments", A, "README.txt",
                                       params={"type": "file", "content": "1", "hash": "1"})
    assert status == 200
    data = hub.contents[f"{A}/README.txt"]
    assert model["format"] == "text" and model["content"] == data.decode()
    assert model["hash_algorithm"] == "sha256" and model["hash"] == hashlib.sha256(data).hexdigest()
    assert model["mimetype"] == "text/plain" and model["writable"] is False
    assert "Last-Modified" in headers


async def test_get_a_notebook_as_jupyterlab_opens_it(jp_fetch):
    status, model, _ = await api(jp_fetch, "experiments", A, "notes", "analysis.ipynb",
                                 params={"type": "notebook", "content": "1"})
    assert status == 200
    assert model["type"] == "notebook" and model["format"] == "json" and model["writable"] is False
    nb = nbformat.from_dict(model["content"])
    assert [c.source for c in nb.cells] == [c.source for c in NOTEBOOK.cells]
    status, checkpoints, _ = await api(jp_fetch, "experiments", A, "notes", "analysis.ipynb", "checkpoints")
    assert status == 200 and checkpoints == []


async def test_binary_files_come_as_base64(jp_fetch, hub):
    status, model, _ = await api(jp_fetch, "experiments", A, "scan", "frames.h5",
                                 params={"type": "file", "format": "base64"})
    assert status == 200 and model["format"] == "base64"
    assert base64.b64decode(model["content"]) == hub.contents[f"{A}/scan/frames.h5"]
    status, body, _ = await api(jp_fetch, "experiments", A, "scan", "frames.h5",
                                params={"type": "file", "format": "text"})
    assert status == 400 and "UTF-8" in body["message"]
    status, body, _ = await api(jp_fetch, "experiments", A, "scan", params={"type": "file"})
    assert status == 400 and "directory" in body["message"]


@pytest.mark.parametrize("extra_config", [{"LabvaultContentsManager": {"max_open_size": 1000}}])
async def test_too_large_to_open_says_how_to_read_it(jp_fetch, extra_config):
    status, body, _ = await api(jp_fetch, "experiments", A, "scan", "frames.h5", params={"type": "file"})
    assert status == 413 and "Client" in body["message"] and body["reason"] == "labvault.size"


async def test_download_through_files(jp_fetch, hub, jp_root_dir):
    """/files/ (JupyterLab's Download, images in Markdown): datastore files stream from the service."""
    r = await jp_fetch("files", "experiments", A, "scan", "frames.h5", params={"download": "1"})
    assert r.body == hub.contents[f"{A}/scan/frames.h5"]
    assert "attachment" in r.headers["Content-Disposition"]
    assert r.headers["Content-Type"] in ("application/x-hdf5", "application/octet-stream")
    r = await jp_fetch("files", "experiments", A, "README.txt")
    assert r.body == hub.contents[f"{A}/README.txt"] and r.headers["Content-Type"].startswith("text/plain")
    (jp_root_dir / "mine.txt").write_text("home file")
    r = await jp_fetch("files", "mine.txt")
    assert r.body == b"home file"  # the stock static handler
    for parts in (("experiments", A, "scan"), ("experiments", A, "nope.txt"), ("experiments", "NO-SUCH", "x")):
        r = await jp_fetch("files", *parts, raise_error=False)
        assert r.code == 404, parts


# --- home: notebooks save there -------------------------------------------------------------------
async def test_save_and_rename_in_home(jp_fetch, jp_root_dir):
    status, model, _ = await api(jp_fetch, "", method="POST", body={"type": "notebook"})
    assert status == 201
    name = model["name"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    status, saved, _ = await api(jp_fetch, name, method="PUT",
                                 body={"type": "notebook", "format": "json", "content": nb})
    assert status == 200 and saved["path"] == name
    on_disk = nbformat.read(jp_root_dir / name, as_version=4)
    assert on_disk.cells[0].source == "1 + 1"
    status, renamed, _ = await api(jp_fetch, name, method="PATCH", body={"path": "analysis/soak3.ipynb"})
    assert status == 400 or status == 404  # no such folder yet: the stock manager refuses
    (jp_root_dir / "analysis").mkdir()
    status, renamed, _ = await api(jp_fetch, name, method="PATCH", body={"path": "analysis/soak3.ipynb"})
    assert status == 200 and renamed["path"] == "analysis/soak3.ipynb"
    assert (jp_root_dir / "analysis" / "soak3.ipynb").exists() and not (jp_root_dir / name).exists()
    status, again, _ = await api(jp_fetch, "analysis", "soak3.ipynb")
    assert status == 200 and again["content"]["cells"][0]["source"] == "1 + 1"


async def test_copy_from_experiments_into_home(jp_fetch, jp_root_dir, hub):
    status, model, _ = await api(jp_fetch, "", method="POST",
                                 body={"copy_from": f"experiments/{A}/notes/analysis.ipynb"})
    assert status == 201 and model["path"] == "analysis.ipynb"
    assert nbformat.read(jp_root_dir / "analysis.ipynb", as_version=4).cells[0].source == "# Soak 3"


# --- /experiments is read-only except uploads where the role allows -----------------------------
async def test_refusals_under_experiments(jp_fetch, jp_root_dir, hub):
    nb = nbformat.v4.new_notebook()
    cases = [
        ("POST", ("experiments", A), {"type": "notebook"}),  # new untitled
        ("PUT", ("experiments", A, "newdir"), {"type": "directory"}),
        ("PUT", ("experiments", "NEW-EXPERIMENT"), {"type": "directory"}),
        ("DELETE", ("experiments", A, "README.txt"), None),
        ("DELETE", ("experiments", A), None),
        ("PATCH", ("experiments", A, "README.txt"), {"path": f"experiments/{A}/README2.txt"}),
        ("PATCH", ("experiments", A, "README.txt"), {"path": "README.txt"}),
        ("POST", ("experiments", A, "notes", "analysis.ipynb", "checkpoints"), None),
    ]
    for method, parts, body in cases:
        status, payload, _ = await api(jp_fetch, *parts, method=method, body=body)
        assert status == 403, (method, parts, status, payload)
        assert "read-only" in payload["message"] or "cannot be moved" in payload["message"], payload
        assert payload["reason"] == "labvault.read_only"
    (jp_root_dir / "mine.ipynb").write_text(nbformat.writes(nb))
    status, payload, _ = await api(jp_fetch, "mine.ipynb", method="PATCH",
                                   body={"path": f"experiments/{A}/mine.ipynb"})
    assert status == 403 and (jp_root_dir / "mine.ipynb").exists()
    status, _, _ = await api(jp_fetch, "experiments", A, "README.txt")
    assert status == 200  # still there


@pytest.mark.parametrize("user", ["carol"])
async def test_a_refusal_carries_the_policy_reason(jp_fetch, hub, cm):
    before = audit_count(hub)
    status, body, headers = await api(jp_fetch, "experiments", A)
    assert status == 404  # proprietary: its existence is not revealed (an unknown exID's answer)
    assert headers["X-Labvault-Rule"] == "default.deny"
    assert unquote(headers["X-Labvault-Reason"])
    status, body, headers = await api(jp_fetch, "experiments", OPEN, "powder", "upload.txt", method="PUT",
                                      body={"type": "file", "format": "text", "content": "mine"})
    assert status == 403, body
    assert body["reason"] and body["reason"] != "Forbidden" and body["message"]
    assert audit_count(hub) >= before + 2  # both refusals are in the audit log


@pytest.mark.parametrize("user", ["bob"])
async def test_a_writer_uploads_results(jp_fetch, hub):
    status, body, _ = await api(jp_fetch, "experiments", A, "results", "fit.txt", params={"content": "0"})
    assert status == 404  # JupyterLab checks first
    status, model, _ = await api(jp_fetch, "experiments", A, "results", "fit.txt", method="PUT",
                                 body={"type": "file", "format": "text", "content": "R = 0.21\n"})
    assert status == 201, model
    assert model["path"] == f"experiments/{A}/results/fit.txt" and model["size"] == 9
    status, listing, _ = await api(jp_fetch, "experiments", A, "results")
    assert names(listing) == ["fit.txt"]
    status, model, _ = await api(jp_fetch, "experiments", A, "results", "fit.txt")
    assert model["content"] == "R = 0.21\n"
    status, body, _ = await api(jp_fetch, "experiments", A, "results", "fit.txt", method="PUT",
                                body={"type": "file", "format": "text", "content": "again"})
    assert status == 409 and "already" in body["message"]
    # a big file arrives in chunks (JupyterLab's uploader); stored once the last one is in
    blob = bytes(range(256)) * 4096
    parts = [blob[:400_000], blob[400_000:800_000], blob[800_000:]]
    for i, piece in enumerate(parts, 1):
        chunk = -1 if i == len(parts) else i
        status, model, _ = await api(jp_fetch, "experiments", A, "results", "big.bin", method="PUT",
                                     body={"type": "file", "format": "base64", "chunk": chunk,
                                           "content": base64.b64encode(piece).decode()})
        assert status in (200, 201), model
    status, model, _ = await api(jp_fetch, "experiments", A, "results", "big.bin", params={"format": "base64"})
    assert base64.b64decode(model["content"]) == blob
    status, body, _ = await api(jp_fetch, "experiments", A, "results", "lost.bin", method="PUT",
                                body={"type": "file", "format": "base64", "chunk": 2, "content": "AAAA"})
    assert status == 400 and "first chunk" in body["message"]


# --- revocation mid-session ----------------------------------------------------------------------
@pytest.mark.parametrize("user", ["frank"])
async def test_facility_access_ends_mid_session(jp_fetch, hub):
    status, model, _ = await api(jp_fetch, "experiments")
    assert names(model) == [A, OPEN]
    status, model, _ = await api(jp_fetch, "experiments", A, "README.txt")
    assert status == 200
    hub.set_clock(NOW + timedelta(days=21))  # the experiment ended 10 days before NOW: day 31
    status, model, _ = await api(jp_fetch, "experiments")
    assert status == 200 and names(model) == [OPEN]
    status, body, headers = await api(jp_fetch, "experiments", A, "README.txt")
    assert status == 404 and headers["X-Labvault-Rule"] == "facility.access_window"
    assert "30" in unquote(headers["X-Labvault-Reason"]) or "ended" in unquote(headers["X-Labvault-Reason"])
    status, body, headers = await api(jp_fetch, "experiments", A)
    assert status == 404 and headers["X-Labvault-Rule"] == "facility.access_window"
    with pytest.raises(HTTPClientError):
        await jp_fetch("api", "contents", "experiments", A, "scan", "frames.h5")
    r = await jp_fetch("files", "experiments", A, "README.txt", raise_error=False)
    assert r.code == 404 and hub.contents[f"{A}/README.txt"] not in r.body


# --- the service unavailable or not configured: the home still works ------------------------------
@pytest.mark.parametrize("extra_config", [{"ServiceConnection": {"service_url": "http://127.0.0.1:9/x",
                                                                  "request_timeout": 3.0}}])
async def test_service_unreachable_is_a_clear_503(jp_fetch, jp_root_dir, extra_config):
    (jp_root_dir / "mine.txt").write_text("still here")
    status, root, _ = await api(jp_fetch, "")
    assert status == 200 and names(root) == ["experiments", "mine.txt", "personal", "shared-with-me"]
    status, body, _ = await api(jp_fetch, "experiments")
    assert status == 503 and "cannot be reached" in body["message"]


@pytest.mark.parametrize("extra_config", [{"ServiceConnection": {"api_token": "not-a-token"}}])
async def test_a_bad_token_is_refused_by_the_service(jp_fetch, extra_config):
    status, body, _ = await api(jp_fetch, "experiments")
    assert status == 403 and "token" in body["message"]
