"""The notebook widgets against a real datastore service behind a real JupyterHub.

Each widget is built with a client holding the acting user's real Hub token; the test sets
values, clicks, and then checks what the datastore now holds (through the database, or the
API as another user), and that a refused action changed nothing and shows the policy's reason.
Every answer the widgets get is validated against the service's OpenAPI document.
"""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
from datetime import date, datetime, timedelta, timezone

import h5py
import numpy as np
import pytest
from conftest import fresh_database_url
from hubtools import start_hub
from openapi_check import template_for, validate
from sqlalchemy import func, select, text

from labvault.datastore import demo
from labvault.datastore import operations as ops
from labvault.datastore.client import Client, LabvaultError
from labvault.datastore.db import make_engine, session_factory
from labvault.datastore.models import (
    AuditEvent,
    DataKey,
    Experiment,
    RoleGrant,
    Share,
    ShareState,
    StoredFile,
    User,
    UserState,
)
from labvault.datastore.store import ChunkStore
from labvault.widgets import (
    AuditTrail,
    ExperimentBrowser,
    MyAccount,
    RetentionPanel,
    RoleManager,
    SharingPanel,
)

pytestmark = pytest.mark.slow
NOW = datetime.now(timezone.utc).replace(microsecond=0)
DOOMED = "NLS-2026-0077"  # the experiment the deletion test destroys
EVIL_TITLE = '<img src=x onerror="alert(1)"> beam time'


class CheckedClient(Client):
    """The real client; every JSON answer is also checked against the OpenAPI document."""

    def request(self, method, path, body=None, **kwargs):
        r = self.send(method, path, body, **kwargs)
        if template_for(path) and r.headers.get("Content-Type", "").startswith("application/json"):
            validate(method, path, r.status, json.loads(r.data) if r.data else None)
        return self._json(r)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def hub(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"widgets-{request.param}")
    url = fresh_database_url(request, request.param, workdir)
    engine = make_engine(url)
    factory = session_factory(engine)
    operator = ops.Actor(operator="test")
    demo.seed(factory, operator, now=NOW)
    ops.add_user(factory, operator, "dora", institution=demo.UNI, display_name="Dora Dorn",
                 email="dora@alpine-uni.example")  # closes her account
    ops.add_experiment(factory, operator, DOOMED, pi="alice", title=EVIL_TITLE, facility="NLS X06SA",
                       start_at=NOW - timedelta(days=3), end_at=NOW - timedelta(days=1))
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    store = ChunkStore(sessions=factory, data_dir=str(data))
    store.prepare_locations()
    frames = (np.arange(12 * 64 * 64, dtype=np.uint16).reshape(12, 64, 64) * 7) % 5000
    tall = np.random.default_rng(7).poisson(50, (2, 256, 64)).astype(np.uint16)
    src = workdir / "frames.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("entry/data/data", data=frames, chunks=(1, 64, 64))
        f.create_dataset("entry/tall", data=tall, chunks=(1, 32, 64))  # row blocks: a long read
        f.create_dataset("entry/trace", data=np.linspace(0, 1, 50))
        # large enough that a far frame is not in the client's read-ahead: it is read anew
        f.create_dataset("entry/big", data=np.arange(24 * 256 * 256, dtype=np.uint32).reshape(24, 256, 256),
                         chunks=(1, 256, 256))
        f["entry/instrument/detector"] = h5py.Empty("f")
        f["entry"].attrs["title"] = "scan 1"
    with factory() as s:
        alice = ops.Actor(user_id=s.scalar(select(User.id).where(User.name == "alice")))
    store.ingest_file(alice, "NLS-2026-0001", src, "scan/frames.h5", now=NOW)
    store.ingest_file(alice, DOOMED, src, "raw/frames.h5", now=NOW)
    ops.grant_role(factory, alice, DOOMED, "bob", "writer", now=NOW)
    h = start_hub(workdir, url, now=NOW)
    h.factory, h.engine, h.kind = factory, engine, request.param
    h.frames, h.tall = frames, tall
    h.tokens = {}
    yield h
    h.stop()
    engine.dispose()


@pytest.fixture(scope="module")
def client_of(hub):
    def client(name: str) -> CheckedClient:
        if name not in hub.tokens:
            hub.tokens[name] = hub.token(name)
        return CheckedClient(hub.service_url, hub.tokens[name])

    return client


@pytest.fixture(autouse=True)
def reset_clock(request):
    if "hub" not in request.fixturenames:  # a test without the Hub
        yield
        return
    hub = request.getfixturevalue("hub")
    hub.set_clock(NOW)
    yield
    hub.set_clock(NOW)


# -- helpers ---------------------------------------------------------------------------------
def active_roles(hub, exid: str, user: str) -> list[str]:
    with hub.factory() as s:
        return sorted(g.role.value for g in s.scalars(
            select(RoleGrant).join(Experiment, Experiment.id == RoleGrant.experiment_id)
            .join(User, User.id == RoleGrant.user_id)
            .where(Experiment.exid == exid, User.name == user, RoleGrant.revoked_at.is_(None))))


def count(hub, model, *where) -> int:
    with hub.factory() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def experiment_row(hub, exid: str) -> Experiment:
    with hub.factory() as s:
        return s.scalar(select(Experiment).where(Experiment.exid == exid))


def exids(client: Client) -> set[str]:
    return {e["exid"] for e in client.experiments()}


def refusal_events(hub, actor: str, action: str) -> int:
    return count(hub, AuditEvent, AuditEvent.actor == actor, AuditEvent.action == action,
                 AuditEvent.allowed.is_(False))


def text_of(widget) -> str:
    """Everything a widget shows as HTML, its children's included."""
    import ipywidgets as W

    out = []

    def walk(w):
        if isinstance(w, W.HTML):
            out.append(w.value)
        for c in getattr(w, "children", ()):
            walk(c)

    walk(widget)
    return "\n".join(out)


# -- RoleManager -----------------------------------------------------------------------------
def test_role_manager_lists_members_with_name_institution_and_facility_end(hub, client_of):
    rm = RoleManager("NLS-2026-0001", client=client_of("alice"))
    roles = {(m["name"], m["role"]) for m in rm.members}
    assert {("alice", "pi"), ("bob", "writer"), ("frank", "facility_staff")} <= roles
    shown = text_of(rm)
    assert "Bob Brunner" in shown and "Alpine University" in shown and "Nordic Light Source" in shown
    # facility staff: the day their access ends (30 days after the experiment's end)
    end = experiment_row(hub, "NLS-2026-0001").end_at
    assert f"access ends {(end + timedelta(days=30)):%Y-%m-%d}" in shown
    # nobody here allowed their e-mail to be shown
    assert "@" not in shown and "alpine-uni.example" not in shown
    assert rm.last_error is None
    # the PI is the owner: no revoke button for her
    assert ("alice", "pi") not in rm.revoke_buttons and ("bob", "writer") in rm.revoke_buttons


def test_role_manager_grants_by_search_and_revokes(hub, client_of):
    carol = client_of("carol")
    assert "NLS-2026-0001" not in exids(carol)
    rm = RoleManager("NLS-2026-0001", client=client_of("alice"))
    rm.people.query.value = "caro"  # observed: searches
    assert rm.people.results.options and rm.people.user == "carol"
    assert "Carol Chen (Alpine University)" in [label for label, _ in rm.people.results.options]
    rm.role.value = "viewer"
    rm.expires.value = date.today() + timedelta(days=90)
    rm.grant_button.click()
    assert rm.last_error is None, rm.status.value
    assert active_roles(hub, "NLS-2026-0001", "carol") == ["viewer"]
    with hub.factory() as s:
        g = s.scalar(select(RoleGrant).join(User, User.id == RoleGrant.user_id)
                     .where(User.name == "carol", RoleGrant.revoked_at.is_(None)))
        assert g.expires_at is not None and g.expires_at.date() == date.today() + timedelta(days=90)
    assert ("carol", "viewer") in rm.revoke_buttons and "carol is now viewer" in rm.status.value
    assert "NLS-2026-0001" in exids(carol)  # the scientist sees it now

    rm.revoke_buttons[("carol", "viewer")].click()
    assert rm.last_error is None, rm.status.value
    assert active_roles(hub, "NLS-2026-0001", "carol") == []
    assert ("carol", "viewer") not in rm.revoke_buttons
    assert "NLS-2026-0001" not in exids(carol)
    with hub.factory() as s:  # history is kept
        assert s.scalar(select(func.count()).select_from(RoleGrant).join(User, User.id == RoleGrant.user_id)
                        .where(User.name == "carol", RoleGrant.revoked_at.is_not(None))) >= 1


def test_role_manager_refusals_show_the_reason_and_change_nothing(hub, client_of):
    grants_before = count(hub, RoleGrant)
    # a writer is no manager
    rm = RoleManager("NLS-2026-0001", client=client_of("bob"))
    assert rm.last_error is None  # members are visible to participants
    refusals = refusal_events(hub, "bob", "role.grant")
    rm.people.query.value = "carol"
    rm.grant_button.click()
    assert rm.last_error is not None and rm.last_error.rule == "role.manage"
    assert "only the PI and managers" in rm.status.value and "role.manage" in rm.status.value
    assert "lv-refused" in rm.status.value
    rm.revoke_buttons[("frank", "facility_staff")].click()
    assert rm.last_error.rule == "role.manage"
    assert active_roles(hub, "NLS-2026-0001", "frank") == ["facility_staff"]
    assert refusal_events(hub, "bob", "role.grant") == refusals + 1  # the refusal is audited

    # vendor staff never get proprietary data, whoever grants
    pi = RoleManager("NLS-2026-0001", client=client_of("alice"))
    pi.people.query.value = "vera"
    assert pi.people.user == "vera"
    pi.grant_button.click()
    assert pi.last_error.rule == "vendor.never" and "vendor" in pi.status.value
    assert active_roles(hub, "NLS-2026-0001", "vera") == []
    assert count(hub, RoleGrant) == grants_before
    # nothing chosen: said, nothing sent
    pi.people.results.options = []
    pi.grant_button.click()
    assert "choose them first" in pi.status.value


def test_role_manager_escapes_what_others_typed(hub, client_of):
    rm = RoleManager(DOOMED, client=client_of("alice"))
    assert "<img" not in rm.header.value and "&lt;img src=x" in rm.header.value


def test_a_proprietary_experiment_one_cannot_open_is_not_revealed(hub, client_of):
    rm = RoleManager("NLS-2026-0001", client=client_of("vera"))
    assert rm.last_error.status == 404 and rm.members == []
    assert "Lysozyme" not in text_of(rm)


# -- SharingPanel ----------------------------------------------------------------------------
def test_sharing_inside_the_institution_takes_effect_at_once(hub, client_of):
    panel = SharingPanel("NLS-2026-0002", client=client_of("bob"))
    panel.people.query.value = "carol"
    panel.role.value = "viewer"
    panel.share_button.click()
    assert panel.last_error is None, panel.status.value
    assert "in effect now" in panel.status.value
    with hub.factory() as s:
        share = s.scalars(select(Share).join(User, User.id == Share.shared_with_id)
                          .where(User.name == "carol").order_by(Share.id.desc())).first()
        assert share.state == ShareState.confirmed and share.role_grant_id is not None
    assert "viewer" in active_roles(hub, "NLS-2026-0002", "carol")
    assert any(x["user"]["name"] == "carol" and x["state"] == "confirmed" for x in panel.shares)


def test_sharing_outside_waits_for_the_pi_who_confirms_or_refuses(hub, client_of):
    bob = SharingPanel("NLS-2026-0002", client=client_of("bob"))
    bob.people.query.value = "frank"
    bob.share_button.click()
    assert bob.last_error is None, bob.status.value
    assert "pending PI confirmation" in bob.status.value
    assert "pending PI confirmation" in bob.shares_html.value
    assert active_roles(hub, "NLS-2026-0002", "frank") == []
    bob.people.query.value = "vera"
    bob.share_button.click()
    assert "pending PI confirmation" in bob.status.value
    assert bob.pending == []  # requests are for the PI to decide

    alice = SharingPanel("NLS-2026-0002", client=client_of("alice"))
    pending = {x["user"]["name"]: x["id"] for x in alice.pending}
    assert set(pending) == {"frank", "vera"}
    assert "Frank Fischer (Nordic Light Source)" in text_of(alice.pending_box)
    alice.confirm_buttons[pending["frank"]].click()
    assert alice.last_error is None, alice.status.value
    assert active_roles(hub, "NLS-2026-0002", "frank") == ["viewer"]
    alice.refuse_buttons[pending["vera"]].click()
    assert alice.last_error is None, alice.status.value
    with hub.factory() as s:
        states = {sid: s.get(Share, sid).state for sid in pending.values()}
    assert states == {pending["frank"]: ShareState.confirmed, pending["vera"]: ShareState.refused}
    assert active_roles(hub, "NLS-2026-0002", "vera") == []
    assert alice.pending == [] and alice.confirm_buttons == {}


def test_sharing_refusals_show_the_reason_and_change_nothing(hub, client_of):
    shares = count(hub, Share)
    # facility staff may read the proprietary experiment but not hand it on
    panel = SharingPanel("NLS-2026-0001", client=client_of("frank"))
    panel.people.query.value = "carol"
    panel.share_button.click()
    assert panel.last_error.rule == "proprietary.assigned_only"
    assert "only its PI" in panel.status.value
    assert count(hub, Share) == shares and active_roles(hub, "NLS-2026-0001", "carol") == []


# -- RetentionPanel --------------------------------------------------------------------------
def test_retention_archive_extend_and_the_minimum(hub, client_of):
    panel = RetentionPanel("NLS-2025-0042", client=client_of("alice"))
    assert panel.info["manage"]["allowed"] and "Not archived" in panel.summary.value
    assert not panel.in_warning
    panel.archive_button.click()
    assert panel.last_error is None, panel.status.value
    e = experiment_row(hub, "NLS-2025-0042")
    assert e.archived_at is not None and e.retain_until.date() == (NOW + timedelta(days=365)).date()
    assert f"Kept until <b>{e.retain_until:%Y-%m-%d}</b>" in panel.summary.value
    assert "days left" in panel.summary.value

    # below the minimum period of archived data: refused with the reason, unchanged
    panel.until.value = (NOW + timedelta(days=100)).date()
    panel.extend_button.click()
    assert panel.last_error.rule == "retention.default_minimum" and "or later" in panel.status.value
    assert experiment_row(hub, "NLS-2025-0042").retain_until == e.retain_until

    later = (NOW + timedelta(days=800)).date()
    panel.until.value = later
    panel.extend_button.click()
    assert panel.last_error is None, panel.status.value
    assert experiment_row(hub, "NLS-2025-0042").retain_until.date() == later
    assert f"kept until {later:%Y-%m-%d}" in panel.status.value


def test_retention_warns_within_30_days_on_the_service_clock(hub, client_of):
    panel = RetentionPanel("NLS-2025-0042", client=client_of("alice"))
    until = experiment_row(hub, "NLS-2025-0042").retain_until
    assert until is not None and not panel.in_warning
    hub.set_clock(until - timedelta(days=10, hours=1))
    panel.refresh_button.click()
    assert panel.info["days_left"] == 10
    assert panel.in_warning and "permanently deleted in 10 days" in panel.warning.value
    hub.set_clock(until - timedelta(days=45))
    panel.refresh()
    assert not panel.in_warning


def test_retention_is_the_pis_alone(hub, client_of):
    before = experiment_row(hub, "NLS-2026-0001")
    panel = RetentionPanel("NLS-2026-0001", client=client_of("bob"))
    assert not panel.info["manage"]["allowed"] and "You cannot change this" in panel.summary.value
    panel.archive_button.click()
    assert panel.last_error.rule == "retention.pi_only" and "only the PI" in panel.status.value
    panel.until.value = (NOW + timedelta(days=900)).date()
    panel.extend_button.click()
    assert panel.last_error.rule == "retention.pi_only"
    after = experiment_row(hub, "NLS-2026-0001")
    assert (after.archived_at, after.retain_until) == (before.archived_at, before.retain_until)


def test_delete_needs_the_exid_typed_and_the_pi(hub, client_of):
    live = (StoredFile.deleted_at.is_(None), StoredFile.experiment_id == experiment_row(hub, DOOMED).id)
    assert count(hub, StoredFile, *live) == 1
    # a writer may not delete, even with the exID typed
    bob = RetentionPanel(DOOMED, client=client_of("bob"))
    bob.confirm.value = DOOMED
    bob.delete_button.click()
    assert bob.last_error.rule == "retention.pi_only"
    assert count(hub, StoredFile, *live) == 1 and experiment_row(hub, DOOMED).deleted_at is None

    alice = RetentionPanel(DOOMED, client=client_of("alice"))
    assert alice.delete_button.disabled
    alice.confirm.value = "NLS-2026-007"  # not quite
    assert alice.delete_button.disabled
    alice.delete_button.click()
    assert "type NLS-2026-0077" in alice.status.value
    assert count(hub, StoredFile, *live) == 1
    # the service insists as well
    with pytest.raises(LabvaultError) as refused:
        client_of("alice").request("POST", f"/experiments/{DOOMED}/delete", {"confirm": "NLS-2026-0001"})
    assert refused.value.status == 400 and count(hub, StoredFile, *live) == 1

    alice.confirm.value = DOOMED
    assert not alice.delete_button.disabled
    alice.reason.value = "consent withdrawn"
    alice.delete_button.click()
    assert alice.last_error is None, alice.status.value
    assert "1 file(s) destroyed" in alice.status.value and "Deleted" in alice.summary.value
    e = experiment_row(hub, DOOMED)
    assert e.deleted_at is not None and e.deleted_reason == "consent withdrawn"
    with hub.factory() as s:
        row = s.scalar(select(StoredFile).where(StoredFile.experiment_id == e.id))
        assert row.deleted_at is not None and row.deleted_reason == "consent withdrawn"
        key = s.get(DataKey, row.data_key_id)
        assert key.wrapped_key is None and key.destroyed_at is not None  # crypto-shredded
        assert s.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.action == "experiment.delete", AuditEvent.target == f"experiment:{DOOMED}",
            AuditEvent.allowed.is_(True))) == 1
    # the metadata stub stays; the data is gone for everyone
    with pytest.raises(LabvaultError) as gone:
        client_of("alice").open(DOOMED, "raw/frames.h5")
    assert gone.value.rule == "retention.deleted"
    with pytest.raises(LabvaultError):
        client_of("alice").request("POST", f"/experiments/{DOOMED}/delete", {"confirm": DOOMED})


# -- AuditTrail ------------------------------------------------------------------------------
def test_audit_trail_filters_exports_and_verifies(hub, client_of, tmp_path):
    with pytest.raises(LabvaultError):  # a refusal to find in the trail
        client_of("vera").experiment("NLS-2026-0001")
    trail = AuditTrail("NLS-2026-0001", client=client_of("alice"), export_dir=str(tmp_path))
    assert trail.full and trail.last_error is None
    assert "vera" in trail.actor.options and "role.grant" in trail.action.options
    trail.actor.value = "vera"
    rows = trail.filtered()
    assert rows and all(e["actor"] == "vera" for e in rows)
    trail.decision.value = "allowed"
    assert all(e["allowed"] for e in trail.filtered())
    trail.decision.value = "refused"
    assert trail.filtered() == rows and "REFUSED" in trail.table.value
    trail.actor.value = "(all)"
    trail.text.value = "vendor"
    assert trail.filtered() and all("vendor" in (e["reason"] + e["rule"]).lower() for e in trail.filtered())

    trail.export_button.click()
    files = list(tmp_path.glob("audit-NLS-2026-0001-*.csv"))
    assert len(files) == 1 and "download" in trail.download.value
    with open(files[0], newline="") as f:
        exported = list(csv.DictReader(f))
    assert len(exported) == len(trail.filtered())
    assert {r["seq"] for r in exported} == {str(e["seq"]) for e in trail.filtered()}
    assert all(r["allowed"] == "False" for r in exported)

    trail.verify_button.click()
    assert trail.chain["ok"] and 0 < trail.chain["events"] <= count(hub, AuditEvent)
    assert trail.chain["experiment_events"] > 0 and "intact" in trail.verify_result.value


def test_participants_get_the_activity_log_and_no_chain_verification(hub, client_of):
    trail = AuditTrail("NLS-2026-0001", client=client_of("bob"))
    assert not trail.full and "Activity log" in trail.header.value
    assert "full audit trail is for the PI" in trail.status.value
    assert trail.events and all(e["allowed"] and "ip" not in e for e in trail.events)
    trail.verify_button.click()
    assert trail.last_error.rule == "audit.full_trail" and trail.chain is None
    assert "lv-refused" in trail.status.value


def test_verify_chain_names_a_tampered_event(hub, client_of):
    """Edit one event behind the triggers' back (as a database superuser could), verify, and
    put it back as it was."""
    seq = count(hub, AuditEvent) // 2
    with hub.factory() as s:
        original = s.scalar(select(AuditEvent.reason).where(AuditEvent.seq == seq))
    _tamper(hub, f"UPDATE audit_events SET reason = 'nothing happened' WHERE seq = {seq}")
    try:
        trail = AuditTrail("NLS-2026-0001", client=client_of("alice"))
        trail.verify_button.click()
        assert trail.chain["ok"] is False and trail.chain["first_broken"] == seq
        assert "BROKEN" in trail.verify_result.value and f"event {seq} was edited" in trail.verify_result.value
    finally:
        _tamper(hub, "UPDATE audit_events SET reason = :r WHERE seq = :s", r=original, s=seq, restore=True)
    trail.verify()
    assert trail.chain["ok"]


def _tamper(hub, statement: str, restore: bool = False, **params) -> None:
    with hub.engine.begin() as c:
        if hub.kind == "postgresql":
            c.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
            c.execute(text(statement), params)
            c.execute(text("ALTER TABLE audit_events ENABLE TRIGGER USER"))
        else:
            c.execute(text("DROP TRIGGER IF EXISTS audit_events_no_update"))
            c.execute(text(statement), params)
            c.execute(text("CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events BEGIN "
                           "SELECT RAISE(ABORT, 'labvault: UPDATE on audit_events is not allowed (append-only)'); END"))


# -- ExperimentBrowser -----------------------------------------------------------------------
def test_browser_lists_what_i_may_see_and_previews_frames(hub, client_of):
    b = ExperimentBrowser(client=client_of("bob"))
    listed = [v for _, v in b.experiments.options]
    assert "NLS-2026-0001" in listed and "NLS-2025-0042" not in listed
    assert b.files.options == () and b.h5file is None  # nothing read before it is chosen
    b.experiments.value = "NLS-2026-0001"
    assert [v for _, v in b.files.options] == ["scan/frames.h5"] and b.h5file is None
    b.files.value = "scan/frames.h5"
    assert b.h5file is not None and [v for _, v in b.tree.options] == ["entry"]
    b.tree.value = "entry"
    names = [v for _, v in b.tree.options]
    assert names[0] == ".." and {"big", "data", "tall", "trace", "instrument"} <= set(names)
    b.tree.value = "data"
    b.tree.value = "data"  # the inner dataset entry/data/data
    assert b.dataset_path == "/entry/data/data"
    assert len(b.slice_sliders) == 1 and b.slice_sliders[0].max == 11
    np.testing.assert_array_equal(b.frame, hub.frames[0])
    assert b.image.value[:8] == b"\x89PNG\r\n\x1a\n" and b.histogram.value[:4] == b"\x89PNG"
    first_image = b.image.value

    b.slice_sliders[0].value = 5  # the slice picker reads that frame
    np.testing.assert_array_equal(b.frame, hub.frames[5])
    assert b.image.value != first_image
    limits = b.limits
    b.contrast.value = (10.0, 60.0)  # contrast: redrawn from the frame in memory
    assert b.limits[0] > limits[0] and b.limits[1] < limits[1]
    assert b.limits == pytest.approx(tuple(np.percentile(hub.frames[5], [10, 60])))
    drawn = b.image.value
    b.log_scale.value = True
    assert b.image.value != drawn
    b.cmap.value = "gray"

    b.tree.value = ".."
    assert b.group == "/entry"
    b.open_item("/entry/trace")  # 1-D: a line plot
    assert b.image.value[:4] == b"\x89PNG" and b.slice_sliders == []
    b.open_item("/entry/instrument/detector")  # empty: described, nothing drawn
    assert b.image.value == b"" and "detector" in b.info.value
    b.close()
    assert b.h5file is None


def test_browser_reads_large_frames_in_blocks_with_a_progress_bar(hub, client_of):
    b = ExperimentBrowser(client=client_of("alice"), progress_bytes=64 * 2 * 32)
    b.show("NLS-2026-0001", "scan/frames.h5", "/entry/tall")
    assert b.dataset_path == "/entry/tall"
    assert b.last_read_blocks == 256 // 32 and b.progress.value == b.progress.max == 256
    np.testing.assert_array_equal(b.frame, hub.tall[0])
    b.slice_sliders[0].value = 1
    np.testing.assert_array_equal(b.frame, hub.tall[1])
    assert b.progress.layout.visibility == "hidden"  # shown only while reading


def test_browser_access_that_ends_ends_mid_session(hub, client_of):
    """Facility staff lose access 30 days after the end: an open browser's next read is refused
    and says why."""
    b = ExperimentBrowser(client=client_of("frank"))
    b.show("NLS-2026-0001", "scan/frames.h5", "/entry/big")
    assert b.frame[0, 0] == 0
    end = experiment_row(hub, "NLS-2026-0001").end_at
    hub.set_clock(end + timedelta(days=31))
    b.slice_sliders[0].value = 23
    assert b.frame is None and "lv-refused" in b.status.value
    assert "facility staff access to NLS-2026-0001 ended" in b.status.value
    b.refresh_button.click()
    assert "NLS-2026-0001" not in [v for _, v in b.experiments.options]


# -- MyAccount -------------------------------------------------------------------------------
def test_my_account_profile_export_and_closing(hub, client_of, tmp_path):
    acct = MyAccount(client=client_of("dora"), export_dir=str(tmp_path))
    assert acct.me["name"] == "dora"
    assert "Dora Dorn" in acct.profile.value and "Alpine University" in acct.profile.value
    assert "role history" not in acct.status.value and "Close my account" in text_of(acct)
    assert "history of the roles you held" in text_of(acct) and "descriptive metadata" in text_of(acct)

    acct.export_button.click()
    exported = tmp_path / "labvault-export-dora.json"
    assert exported.exists() and stat.S_IMODE(exported.stat().st_mode) == 0o600
    assert json.loads(exported.read_text())["profile"]["name"] == "dora"
    assert acct.exported["profile"]["institution"] == demo.UNI
    assert acct.show_access_log() and "export" in acct.access_log.value

    # not armed: nothing happens
    assert acct.close_button.disabled
    acct.confirm.value = "dora"
    assert acct.close_button.disabled  # the box is not ticked
    acct.close_account()
    assert "tick the box" in acct.status.value
    with hub.factory() as s:
        assert s.scalar(select(User.state).where(User.name == "dora")) == UserState.active

    acct.understood.value = True
    assert not acct.close_button.disabled
    acct.close_button.click()
    assert acct.last_error is None, acct.status.value
    with hub.factory() as s:
        assert s.scalar(select(User.state).where(User.name == "dora")) == UserState.closed
    assert "role history" in acct.status.value and "descriptive metadata" in acct.status.value
    assert acct.close_button.disabled
    # a closed account has no access any more
    again = MyAccount(client=client_of("dora"), export_dir=str(tmp_path))
    assert again.me["state"] == "closed" and "closed" in again.profile.value
    assert client_of("dora").experiments() == []


# -- how the widgets are built ---------------------------------------------------------------
def test_widgets_default_to_the_client_from_the_environment(hub, client_of, monkeypatch):
    client_of("bob")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", hub.tokens["bob"])
    monkeypatch.setenv("LABVAULT_SERVICE_URL", hub.service_url)
    rm = RoleManager("NLS-2026-0001")
    assert rm.client.token == hub.tokens["bob"] and rm.last_error is None
    assert ("bob", "writer") in {(m["name"], m["role"]) for m in rm.members}
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN")
    with pytest.raises(LabvaultError, match="JUPYTERHUB_API_TOKEN"):
        MyAccount()


def test_the_widgets_hold_no_database_access_or_keys():
    """Importing the widgets pulls in the HTTP client only: no ORM, no store, no key code."""
    code = ("import sys, labvault.widgets; "
            "bad = [m for m in ('sqlalchemy', 'labvault.datastore.models', 'labvault.datastore.store', "
            "'labvault.datastore.store.keys', 'cryptography') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABVAULT_")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_an_unreachable_service_is_said_not_raised():
    from hubtools import free_port

    rm = RoleManager("NLS-2026-0001", client=Client(f"http://127.0.0.1:{free_port()}/services/labvault", "t"))
    assert rm.members == [] and rm.last_error.error == "unavailable"
    assert "did not answer" in rm.status.value
