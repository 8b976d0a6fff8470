"""Data-subject rights: export everything about me, correct my data, request deletion, close.

Through the datastore service behind a real JupyterHub (one per database kind, real user
tokens, every answer checked against the OpenAPI document), and through the admin CLI.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from conftest import fresh_database_url
from hubtools import start_hub
from openapi_check import template_for, validate
from sqlalchemy import func, select
from test_lifecycle import T0

from labvault.datastore import demo, rights
from labvault.datastore import operations as ops
from labvault.datastore.cli import main
from labvault.datastore.db import make_engine, session_factory
from labvault.datastore.lifecycle import FORMER_USER
from labvault.datastore.models import (
    AuditEvent,
    DataKey,
    LocalCredential,
    RoleGrant,
    StoredFile,
    User,
    UserState,
)
from labvault.datastore.store import ChunkStore

pytestmark = pytest.mark.slow
NOW = datetime.now(timezone.utc).replace(microsecond=0)
OP = ops.Actor(operator="test")


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def hub(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"hub-{request.param}")
    url = fresh_database_url(request, request.param, workdir)
    engine = make_engine(url)
    factory = session_factory(engine)
    demo.seed(factory, OP, now=NOW)
    # people of these tests: dora (member, personal files), paula (a PI), gus (corrections)
    for name, extra in (("dora", {"orcid": "0000-0002-1825-0097"}),
                        ("paula", {"institutional_email": "paula@alpine-uni.example",
                                   "verified_institutional_email": True}),
                        ("gus", {})):
        ops.add_user(factory, OP, name, institution=demo.UNI, display_name=name.title() + " Example",
                     email=f"{name}@alpine-uni.example", now=NOW, **extra)
    ops.add_experiment(factory, OP, "NLS-2026-0777", pi="paula", title="Paula's beamtime", now=NOW)
    alice = ops.Actor(user_id=_uid(factory, "alice"))
    ops.grant_role(factory, alice, "NLS-2026-0001", "dora", "viewer", now=NOW)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    ChunkStore(sessions=factory, data_dir=str(data)).prepare_locations()
    h = start_hub(workdir, url, now=NOW)
    h.factory, h.data = factory, data
    h.tokens = {}
    yield h
    h.stop()
    engine.dispose()


def _uid(factory, name: str) -> int:
    with factory() as s:
        return s.scalar(select(User.id).where(User.name == name))


class Client:
    """Calls the service as one user; every answer is checked against the OpenAPI document."""

    def __init__(self, hub, token):
        self.hub, self.token = hub, token

    def __call__(self, method, path, body=None, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        r = self.hub.http.request(method, self.hub.service_url + "/api/v1" + path, body=data,
                                  headers={"Authorization": f"token {self.token}"})
        payload = json.loads(r.data) if "json" in r.headers.get("Content-Type", "") else r.data
        if template_for(path) and isinstance(payload, (dict, list)):
            validate(method, path, r.status, payload)
        return r.status, payload


@pytest.fixture(scope="module")
def as_(hub):
    def client(name):
        if name not in hub.tokens:
            hub.tokens[name] = hub.token(name)
        return Client(hub, hub.tokens[name])

    return client


def user(hub, name: str) -> User:
    with hub.factory() as s:
        return s.scalar(select(User).where(User.name == name))


def last_event(hub, action: str) -> AuditEvent:
    with hub.factory() as s:
        return s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq.desc())).first()


# ------------------------------------------------------------------------------------------
# correct my data
# ------------------------------------------------------------------------------------------
def test_i_correct_my_data(as_, hub):
    gus = as_("gus")
    status, me = gus("PATCH", "/me", {"display_name": "  Gustav   Example ", "email": "Gus@Example.ORG",
                                       "orcid": "0000-0001-5109-3700", "phone": "+41 44 123 45 67",
                                       "email_visible": True})
    assert status == 200, me
    assert (me["display_name"], me["email"], me["orcid"], me["email_visible"]) == (
        "Gustav Example", "Gus@example.org", "0000-0001-5109-3700", True)
    assert user(hub, "gus").phone == "+41441234567"
    event = last_event(hub, "account.correct")
    assert (event.actor, event.rule, event.details) == (
        "gus", "privacy.data_subject_rights", {"fields": ["display_name", "email", "email_visible", "orcid", "phone"]})
    assert "example.org" not in json.dumps(event.details) + event.reason  # values never reach the audit log
    # removing what is optional
    status, me = gus("PATCH", "/me", {"orcid": None, "phone": ""})
    assert status == 200 and me["orcid"] is None and user(hub, "gus").phone is None


@pytest.mark.parametrize(("body", "says"), [
    ({"orcid": "0000-0001-5109-3701"}, "check digit"),
    ({"email": "not-an-address"}, "not an e-mail address"),
    ({"phone": "0441234567"}, "international"),
    ({"display_name": ""}, "1 to 200"),
    ({"display_name": "x" * 201}, "1 to 200"),
    ({"display_name": "Eve\x00"}, "1 to 200"),
    ({"email_visible": "yes"}, "true or false"),
    ({"institutional_email": "gus@alpine-uni.example"}, "institutional e-mail proves membership"),
    ({"under_18": False}, "not correctable"),
    ({"state": "active"}, "not correctable"),
    ({}, "nothing to correct"),
])
def test_bad_corrections_are_refused_clearly(as_, hub, body, says):
    before = user(hub, "gus")
    status, err = as_("gus")("PATCH", "/me", body)
    assert status == 400 and says in err["reason"], err
    assert set(err) == {"error", "rule", "reason"}
    after = user(hub, "gus")
    assert (after.display_name, after.email, after.orcid) == (before.display_name, before.email, before.orcid)


def test_malformed_json_is_a_400(as_):
    status, err = as_("gus")("PATCH", "/me", raw=b"{not json")
    assert status == 400 and "malformed JSON" in err["reason"]


# ------------------------------------------------------------------------------------------
# export everything about me
# ------------------------------------------------------------------------------------------
def test_i_export_everything_labvault_holds_about_me(as_, hub):
    dora = as_("dora")
    status, _ = dora("PUT", "/personal/files/notes/plan.txt", raw=b"my plan")
    assert status == 201
    status, data = dora("GET", "/me/export")
    assert status == 200
    assert data["profile"]["name"] == "dora" and data["profile"]["orcid"] == "0000-0002-1825-0097"
    assert data["profile"]["email"] == "dora@alpine-uni.example" and "last_login_ip" in data["profile"]
    assert [(r["experiment"], r["role"], r["granted_by"]) for r in data["roles"]] == [("NLS-2026-0001", "viewer", "alice")]
    assert [f["path"] for f in data["personal_files"]] == ["notes/plan.txt"]
    assert any(e["action"] == "file.upload" for e in data["activity"])
    assert data["sign_in"]["local_account"] is False and "password_hash" not in json.dumps(data)
    assert last_event(hub, "export").rule == "privacy.data_subject_rights"


# ------------------------------------------------------------------------------------------
# request deletion (with the documented exemptions), close
# ------------------------------------------------------------------------------------------
def test_i_request_deletion_of_my_personal_data(as_, hub):
    dora = as_("dora")
    status, err = dora("POST", "/me/deletion-request", {"confirm": "not-dora"})
    assert status == 400 and "cannot be undone" in err["reason"]
    assert user(hub, "dora").email is not None
    with hub.factory.begin() as s:  # dora has a local account: its secrets go too
        s.add(LocalCredential(user_id=user(hub, "dora").id, password_hash="$argon2id$...", created_at=NOW))

    status, result = dora("POST", "/me/deletion-request", {"confirm": "dora"})
    assert status == 200, result
    assert result["state"] == "closed" and result["roles_ended"] == 1 and result["personal_files_deleted"] == 1
    assert {"email", "orcid", "display_name", "password and TOTP secret"} <= set(result["erased"])
    assert {k["rule"] for k in result["kept"]} == {"privacy.role_history_kept"}  # dora is no PI
    d = user(hub, "dora")
    assert (d.state, d.email, d.orcid, d.display_name, d.name) == (UserState.closed, None, None, FORMER_USER, "dora")
    with hub.factory() as s:
        assert s.get(LocalCredential, d.id) is None
        grant = s.scalars(select(RoleGrant).where(RoleGrant.user_id == d.id)).one()  # the history stays
        assert grant.revoked_at is not None
        f = s.scalars(select(StoredFile).where(StoredFile.owner_id == d.id)).one()
        assert f.deleted_at is not None and f.purged_at is not None  # crypto-shredded, chunks gone
        assert s.get(DataKey, f.data_key_id).wrapped_key is None
        assert s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.actor == "dora")) > 0
    assert not list(hub.data.rglob(f"{f.uuid}.lvc"))
    event = last_event(hub, "account.erase")
    assert (event.actor, event.rule) == ("dora", "privacy.data_subject_rights")
    # once: a second request is a conflict; the closed account sees no experiments
    status, err = dora("POST", "/me/deletion-request", {"confirm": "dora"})
    assert status == 409 and "already removed" in err["reason"]
    status, listing = dora("GET", "/experiments")
    assert status == 200 and listing["experiments"] == []


def test_a_pi_keeps_the_name_in_experiment_metadata(as_, hub):
    status, result = as_("paula")("POST", "/me/deletion-request", {"confirm": "paula"})
    assert status == 200
    kept = {k["rule"]: k for k in result["kept"]}
    assert "NLS-2026-0777" in kept["privacy.metadata_exempt"]["what"]
    assert "publication" in kept["privacy.metadata_exempt"]["reason"]
    p = user(hub, "paula")
    assert (p.display_name, p.email, p.institutional_email) == ("Paula Example", None, None)
    assert "display_name" not in result["erased"]


def test_i_close_my_account(as_, hub):
    status, err = as_("gus")("POST", "/me/close", {"confirm": "someone"})
    assert status == 400
    status, result = as_("gus")("POST", "/me/close", {"confirm": "gus"})
    assert status == 200 and result["state"] == "closed"
    g = user(hub, "gus")
    assert g.state == UserState.closed and g.email is not None  # anonymised a year later, not now


# ------------------------------------------------------------------------------------------
# the same rights from the admin CLI, and nobody else's
# ------------------------------------------------------------------------------------------
@pytest.fixture
def cli(db_url, tmp_path, capsys):
    def run(*args):
        capsys.readouterr()
        code = 0
        try:
            main([*args, f"--db-url={db_url}", f"--data-dir={tmp_path / 'data'}"])
        except SystemExit as e:
            code = e.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def world(sessions):
    demo.seed(sessions, OP, now=T0)
    return sessions


def test_the_cli_exports_corrects_deletes_and_closes(cli, world):
    code, out, err = cli("user", "export", "bob")
    assert code == 0, err
    data = json.loads(out)
    assert data["profile"]["display_name"] == "Bob Brunner" and data["roles"][0]["experiment"] == "NLS-2026-0001"

    code, out, err = cli("user", "correct", "bob", "--orcid", "0000-0002-1825-0097", "--email-visible")
    assert code == 0, err
    with world() as s:
        bob = s.scalar(select(User).where(User.name == "bob"))
        assert (bob.orcid, bob.email_visible) == ("0000-0002-1825-0097", True)
    code, _, err = cli("user", "correct", "bob", "--orcid", "1234")
    assert code == 2 and "orcid" in err
    code, _, err = cli("user", "correct", "bob")
    assert code == 2 and "nothing to correct" in err
    code, out, err = cli("user", "correct", "carol", "--under-18")
    assert code == 0 and "under_18" in out

    code, _, err = cli("user", "request-deletion", "bob")
    assert code == 2 and "--yes" in err
    code, out, err = cli("user", "request-deletion", "bob", "--yes")
    assert code == 0, err
    assert "account closed" in out and "kept: role history" in out and "privacy.role_history_kept" in out
    code, _, err = cli("user", "request-deletion", "bob", "--yes")
    assert code == 2 and "already removed" in err

    code, out, err = cli("user", "close", "frank")
    assert code == 0 and "closed" in out
    code, _, err = cli("user", "close", "frank")
    assert code == 2 and "closed already" in err
    code, _, err = cli("user", "export", "nobody")
    assert code == 2 and "unknown user" in err


def test_nobody_exercises_someone_elses_rights(world):
    with world() as s:
        ids = dict(s.execute(select(User.name, User.id)).all())
    bob, admin = ops.Actor(user_id=ids["bob"]), ops.Actor(user_id=ids["admin"])
    for fn, args in ((rights.export, ()), (rights.request_deletion, ()), (rights.close_account, ()),
                     (rights.correct_account, ({"display_name": "Mallory"},))):
        with pytest.raises(ops.Denied, match="user.own_data"):
            fn(world, bob, "alice", *args, now=T0)
    # refusals are audited
    with world() as s:
        refused = s.scalars(select(AuditEvent).where(AuditEvent.allowed.is_(False))).all()
    assert {(e.actor, e.target) for e in refused} == {("bob", "user:alice")}
    # the user themself (here through the function the service calls) and admins may
    assert rights.export(world, ops.Actor(user_id=ids["alice"]), "alice", now=T0)["profile"]["name"] == "alice"
    rights.correct_account(world, admin, "carol", {"under_18": True}, now=T0)
    with pytest.raises(ops.OperationError, match="set by an administrator"):
        rights.correct_account(world, bob, "bob", {"under_18": False}, now=T0)
    assert rights.orcid_ok("0000-0002-1694-233X") and not rights.orcid_ok("0000-0002-1694-2330")
