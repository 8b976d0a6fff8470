"""/personal (the user's own repository in the datastore) and /shared-with-me (what others shared
with the user), through the contents API, decided by the service on every request."""

from __future__ import annotations

import json
import uuid

import pytest
from extsupport import user_token
from tornado.httpclient import HTTPClientError

from labvault.datastore.client import Client

pytestmark = pytest.mark.slow


async def api(jp_fetch, *parts, method="GET", body=None, params=None):
    kwargs = {"method": method, "raise_error": False, "params": params}
    if body is not None:
        kwargs["body"] = json.dumps(body)
    r = await jp_fetch("api", "contents", *parts, **kwargs)
    try:
        return r.code, json.loads(r.body) if r.body else None, r.headers
    except ValueError:
        return r.code, r.body.decode(errors="replace"), r.headers


def names(model) -> list[str]:
    return sorted(m["name"] for m in model["content"])


@pytest.fixture
def folder() -> str:
    """A folder name of this test's own (the Hub and its data outlive one test)."""
    return f"t-{uuid.uuid4().hex[:8]}"


async def test_my_personal_repository(jp_fetch, jp_root_dir, folder):
    path = ("personal", folder, "plan.txt")
    status, model, _ = await api(jp_fetch, *path, method="PUT",
                                 body={"type": "file", "format": "text", "content": "beamtime plan\n"})
    assert status == 201, model
    assert model["path"] == f"personal/{folder}/plan.txt" and model["writable"] is False
    status, listing, _ = await api(jp_fetch, "personal")
    assert status == 200 and folder in names(listing) and listing["writable"] is True
    status, sub, _ = await api(jp_fetch, "personal", folder)
    assert names(sub) == ["plan.txt"]
    status, model, _ = await api(jp_fetch, *path)
    assert model["content"] == "beamtime plan\n" and model["format"] == "text"
    # a stored file is never overwritten (edit in the home folder, upload a new file)
    status, body, _ = await api(jp_fetch, *path, method="PUT",
                                body={"type": "file", "format": "text", "content": "changed"})
    assert status == 409 and "already" in body["message"]
    # a notebook saved into /personal, then copied home to work on
    nb = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    status, model, _ = await api(jp_fetch, "personal", folder, "a.ipynb", method="PUT",
                                 body={"type": "notebook", "format": "json", "content": nb})
    assert status == 201 and model["type"] == "notebook"
    status, model, _ = await api(jp_fetch, "", method="POST", body={"copy_from": f"personal/{folder}/a.ipynb"})
    assert status == 201 and (jp_root_dir / model["path"]).exists()
    # the owner deletes (the service crypto-shreds); folders go with their last file
    status, body, _ = await api(jp_fetch, "personal", folder, method="DELETE")
    assert status == 400 and "folder" in body["message"]
    for name in ("plan.txt", "a.ipynb"):
        status, _, _ = await api(jp_fetch, "personal", folder, name, method="DELETE")
        assert status == 204
    status, listing, _ = await api(jp_fetch, "personal")
    assert folder not in names(listing)
    status, _, _ = await api(jp_fetch, *path)
    assert status == 404


@pytest.mark.parametrize("user", ["bob"])
async def test_shared_with_me_follows_the_owner_decisions(jp_fetch, hub, folder):
    alice = Client(hub.service_url, user_token(hub, "alice"), direct=False)
    alice.put_personal(f"{folder}/model.txt", b"shared model\n")
    alice.put_personal(f"{folder}/deep/params.txt", b"k = 3\n")
    alice.put_personal(f"{folder}-private/secret.txt", b"mine only\n")
    share = alice.share_personal(folder, "bob")
    try:
        status, owners, _ = await api(jp_fetch, "shared-with-me")
        assert status == 200 and "alice" in names(owners)
        status, files, _ = await api(jp_fetch, "shared-with-me", "alice")
        assert folder in names(files) and f"{folder}-private" not in names(files)
        status, deep, _ = await api(jp_fetch, "shared-with-me", "alice", folder, "deep")
        assert names(deep) == ["params.txt"]
        status, model, _ = await api(jp_fetch, "shared-with-me", "alice", folder, "model.txt")
        assert status == 200 and model["content"] == "shared model\n" and model["writable"] is False
        status, _, _ = await api(jp_fetch, "shared-with-me", "alice", f"{folder}-private", "secret.txt")
        assert status == 404
        status, body, _ = await api(jp_fetch, "shared-with-me", "alice", folder, "new.txt", method="PUT",
                                    body={"type": "file", "format": "text", "content": "x"})
        assert status == 403 and "read-only" in body["message"]
        status, _, _ = await api(jp_fetch, "shared-with-me", "alice", folder, "model.txt", method="DELETE")
        assert status == 403
        # bob's own /personal does not show alice's files
        status, mine, _ = await api(jp_fetch, "personal")
        assert folder not in names(mine)
    finally:
        alice.unshare_personal(share["id"])
    # withdrawn: gone at bob's next request, in the same session
    status, files, _ = await api(jp_fetch, "shared-with-me", "alice")
    assert status == 404 or folder not in names(files)
    with pytest.raises(HTTPClientError) as e:
        await jp_fetch("api", "contents", "shared-with-me", "alice", folder, "model.txt")
    assert e.value.code == 404


@pytest.mark.parametrize("user", ["carol"])
async def test_nothing_shared_is_an_empty_folder(jp_fetch):
    status, owners, _ = await api(jp_fetch, "shared-with-me")
    assert status == 200 and "alice" not in names(owners)
    status, _, headers = await api(jp_fetch, "shared-with-me", "alice", "anything.txt")
    assert status == 404
