"""Crypto-shredding deletes on both databases: key first, then chunks; the stub and audit stay."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from store_support import FaultyBackend, object_path

from labvault.datastore import operations as ops
from labvault.datastore.models import AuditEvent, DataKey
from labvault.datastore.store import FileDeleted, IntegrityError
from labvault.datastore.store.format import object_key


def _key(world, row):
    with world.sessions() as s:
        return s.get(DataKey, row.data_key_id)


def test_delete_destroys_the_key_first_then_the_chunks(world, store, now):
    info = store.ingest_stream(world.op, "E-1", "d.bin", [b"d" * 5000]).file
    seen = []

    def key_already_destroyed(location, step):
        # every chunk removal happens after the destroyed key was committed
        seen.append((location, _key(world, world.row("E-1", "d.bin")).wrapped_key))

    for name in ("replica-1", "replica-2"):
        store.set_backend(name, FaultyBackend(store.backend(name), on_step=key_already_destroyed))
    stub = store.delete_file(world.pi, "E-1", "d.bin", reason="wrong sample mounted", now=now)

    assert seen == [("replica-1", None), ("replica-2", None)]
    assert (stub.deleted_at, stub.deleted_reason, stub.purged_at) == (now, "wrong sample mounted", now)
    row = world.row("E-1", "d.bin")
    dk = _key(world, row)
    assert dk.wrapped_key is None and dk.destroyed_at == now
    assert (row.size, row.checksum, row.uuid) == (info.size, info.checksum, info.uuid)  # the stub
    for loc in ("replica-1", "replica-2"):
        assert not object_path(store, loc, info.uuid).exists()
    with world.sessions() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "file.delete")).one()
    assert (event.allowed, event.rule, event.target) == (True, "retention.pi_only", "file:E-1/d.bin")
    assert event.details["reason"] == "wrong sample mounted"


def test_reading_a_deleted_file_says_when_and_why(world, store, now):
    store.ingest_stream(world.op, "E-1", "d.bin", [b"d" * 100])
    stub = store.delete_file(world.op, "E-1", "d.bin", reason="PI request 2026-05", now=now)
    message = "E-1/d.bin was permanently deleted on 2026-06-01 12:00 UTC: PI request 2026-05"
    for actor in (world.pi, world.viewer):
        with pytest.raises(FileDeleted) as e:
            store.open_file(actor, "E-1", "d.bin")
        assert str(e.value) == message
    with pytest.raises(FileDeleted, match="permanently deleted on 2026-06-01"):
        store.open(stub.id)
    with world.sessions() as s:
        refusal = s.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()
    assert (refusal.action, refusal.allowed, refusal.rule) == ("file.read", False, "retention.deleted")
    # an outsider learns nothing about the deletion: an ordinary refusal
    with pytest.raises(ops.Denied, match="proprietary.assigned_only"):
        store.open_file(world.outsider, "E-1", "d.bin")
    # deleting again says it is gone; the path can hold a new file, the stub stays
    with pytest.raises(FileDeleted):
        store.delete_file(world.pi, "E-1", "d.bin", reason="again")
    new = store.ingest_stream(world.op, "E-1", "d.bin", [b"new"]).file
    assert store.open_file(world.pi, "E-1", "d.bin").read() == b"new"
    assert [f.deleted_at is not None for f in store.list_files("E-1")] == [True, False]
    assert new.id != stub.id


def test_only_the_pi_deletes_and_refusals_are_audited(world, store):
    store.ingest_stream(world.op, "E-1", "d.bin", [b"d" * 100])
    with pytest.raises(ops.Denied, match="retention.pi_only"):
        store.delete_file(world.writer, "E-1", "d.bin", reason="tidy up")
    assert store.open_file(world.pi, "E-1", "d.bin").read() == b"d" * 100
    with pytest.raises(ops.OperationError, match="a reason is required"):
        store.delete_file(world.pi, "E-1", "d.bin", reason="  ")
    with pytest.raises(ops.NotFound, match="no file 'nope.bin' in experiment E-1"):
        store.delete_file(world.pi, "E-1", "nope.bin", reason="x")
    with world.sessions() as s:
        refusal = s.scalars(select(AuditEvent).where(AuditEvent.action == "file.delete")).one()
    assert (refusal.allowed, refusal.rule) == (False, "retention.pi_only")


def test_chunks_left_by_a_failed_removal_are_unreadable_and_scrub_removes_them(world, store, now):
    info = store.ingest_stream(world.op, "E-1", "d.bin", [b"d" * 3000]).file
    store.set_backend("replica-2", FaultyBackend(store.backend("replica-2"), fail_delete=True))
    stub = store.delete_file(world.pi, "E-1", "d.bin", reason="x", now=now)
    assert stub.purged_at is None  # the key is destroyed, one replica still holds ciphertext
    assert object_path(store, "replica-2", info.uuid).exists()
    with pytest.raises(FileDeleted):
        store.open(info.id)
    store.set_backend("replica-2", store.backend("replica-2").inner)
    report = store.scrub(world.op, "E-1", now=now)
    assert report.deleted_purged == 1
    assert not store.backend("replica-2").exists(object_key(info.uuid))
    assert world.row("E-1", "d.bin").purged_at == now


def test_a_lease_opens_a_live_file_and_never_a_deleted_one(world, store):
    info = store.ingest_stream(world.op, "E-1", "l.bin", [b"lease" * 1000]).file
    lease = store.lease(info.id)
    assert lease.locations == ("replica-1", "replica-2") and lease.name == "E-1/l.bin"
    with lease.open(store.backends) as f:
        assert f.read() == b"lease" * 1000
    store.delete_file(world.pi, "E-1", "l.bin", reason="done")
    with pytest.raises(FileDeleted, match="done"):
        store.lease(info.id)
    # a lease granted before the deletion opens nothing afterwards: the chunks are gone
    with pytest.raises(IntegrityError, match="missing"):
        lease.open(store.backends).read()
