"""Reads that fail over (faults recorded), scrub and repair, crash leftovers -- both databases."""

from __future__ import annotations

import os
import shutil
from datetime import timedelta

import pytest
from sqlalchemy import select
from store_support import all_files, flip_byte, make_store, object_path

from labvault.datastore import operations as ops
from labvault.datastore.models import AuditEvent, ReplicaFault, utcnow
from labvault.datastore.store import IntegrityError
from labvault.datastore.store.format import Layout, object_key

PAYLOAD = bytes(range(256)) * 40  # 10 KiB: 10 chunks of 1 KiB


def _stored(world, store, path="f.bin", data=PAYLOAD):
    info = store.ingest_stream(world.op, "E-1", path, [data]).file
    return info, Layout(info.uuid, info.chunk_size, info.size)


def _damage(store, location, info, layout, chunk):
    flip_byte(object_path(store, location, info.uuid), layout.record_offset(chunk) + 30)


def _faults(world):
    with world.sessions() as s:
        return [(f.location, f.chunk_index, f.kind, f.detected_by, f.resolved_at is not None)
                for f in s.scalars(select(ReplicaFault).order_by(ReplicaFault.id))]


def _events(world, action):
    with world.sessions() as s:
        return s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)).all()


def test_corrupt_chunk_is_read_from_the_next_replica_and_recorded(world, store):
    info, layout = _stored(world, store)
    _damage(store, "replica-1", info, layout, 4)
    assert store.open_file(world.pi, "E-1", "f.bin").read() == PAYLOAD
    assert _faults(world) == [("replica-1", 4, "corrupt", "read", False)]


def test_all_replicas_corrupt_is_a_clear_error(world, store):
    info, layout = _stored(world, store)
    for loc in ("replica-1", "replica-2"):
        _damage(store, loc, info, layout, 6)
    f = store.open_file(world.pi, "E-1", "f.bin")
    assert f.read(6 * 1024) == PAYLOAD[:6 * 1024]
    with pytest.raises(IntegrityError, match=r"^E-1/f.bin: chunk 6 could not be verified on any replica"):
        f.read()
    assert {(loc, chunk) for loc, chunk, *_ in _faults(world)} == {("replica-1", 6), ("replica-2", 6)}


def test_scrub_repairs_bad_and_missing_replicas_and_reports(world, store):
    a, la = _stored(world, store, "a.bin")
    b, lb = _stored(world, store, "b.bin", os.urandom(3000))
    _damage(store, "replica-1", a, la, 2)
    _damage(store, "replica-2", a, la, 7)  # both damaged, in different chunks: they mend each other
    object_path(store, "replica-2", b.uuid).unlink()
    good = object_path(store, "replica-1", b.uuid).read_bytes()

    report = store.scrub(world.op)

    assert report.ok and report.files == 2
    assert (report.replicas_repaired, report.replicas_restored, report.replicas_ok) == (2, 1, 1)
    assert report.bad_chunks == 2
    assert report.chunks_verified == 2 * la.chunk_count - 2 + lb.chunk_count
    for info in (a, b):
        blobs = {object_path(store, loc, info.uuid).read_bytes() for loc in ("replica-1", "replica-2")}
        assert len(blobs) == 1  # identical ciphertext again: copied, not re-encrypted
    assert object_path(store, "replica-2", b.uuid).read_bytes() == good
    assert store.open(a.id).read() == PAYLOAD
    assert all(resolved for *_, resolved in _faults(world))
    kinds = {(loc, chunk, kind) for loc, chunk, kind, by, _ in _faults(world) if by == "scrub"}
    assert {("replica-1", 2, "corrupt"), ("replica-2", 7, "corrupt"), ("replica-2", None, "missing")} <= kinds
    (scrub,) = _events(world, "store.scrub")
    assert scrub.details["replicas_repaired"] == 2 and scrub.details["replicas_restored"] == 1
    assert scrub.target == "store:*" and scrub.rule == "admin.access_rights"
    repairs = _events(world, "store.repair")
    assert [e.target for e in repairs] == ["file:E-1/a.bin", "file:E-1/b.bin"]
    # a second scrub finds everything healthy and changes nothing
    again = store.scrub(world.op, "E-1")
    assert again.ok and again.replicas_ok == 4 and again.replicas_repaired == again.replicas_restored == 0
    assert len(_events(world, "store.repair")) == 2


def test_a_chunk_bad_everywhere_is_reported_and_left_alone(world, store):
    info, layout = _stored(world, store)
    for loc in ("replica-1", "replica-2"):
        _damage(store, loc, info, layout, 3)
    before = {loc: object_path(store, loc, info.uuid).read_bytes() for loc in ("replica-1", "replica-2")}
    report = store.scrub(world.op, "E-1")
    assert not report.ok
    assert report.unrecoverable == ["E-1/f.bin: chunk(s) 3 fail on every replica; left as they are"]
    assert {loc: object_path(store, loc, info.uuid).read_bytes() for loc in before} == before
    (event,) = _events(world, "store.scrub")
    assert event.target == "experiment:E-1" and event.details["unrecoverable"] == report.unrecoverable


def test_truncated_and_header_damaged_replicas_are_rewritten(world, store):
    info, layout = _stored(world, store)
    p1 = object_path(store, "replica-1", info.uuid)
    os.truncate(p1, layout.record_offset(layout.chunk_count - 1))  # the last record cut off
    flip_byte(object_path(store, "replica-2", info.uuid), 10)  # header byte
    report = store.scrub(world.op)
    assert report.ok and report.replicas_repaired == 2
    assert p1.stat().st_size == layout.object_size
    assert store.open(info.id).read() == PAYLOAD


def test_scrub_follows_the_mirror_agreement(world, sessions, tmp_path):
    store = make_store(sessions, tmp_path / "m", mirror_locations={"offsite": "mirror"})
    info = store.ingest_stream(world.op, "E-2", "x.bin", [PAYLOAD]).file
    assert info.locations == ("replica-1", "replica-2")
    world.agree_mirror("E-2")
    report = store.scrub(world.op, "E-2")
    assert report.replicas_restored == 1 and object_path(store, "offsite", info.uuid).exists()
    assert world.row("E-2", "x.bin").locations == ["replica-1", "replica-2", "offsite"]
    world.agree_mirror("E-2", False)  # the PI withdraws: the mirror copy goes
    report = store.scrub(world.op, "E-2")
    assert report.mirror_copies_removed == 1 and not object_path(store, "offsite", info.uuid).exists()
    assert world.row("E-2", "x.bin").locations == ["replica-1", "replica-2"]


def test_scrub_removes_crash_leftovers_after_the_grace_period(world, store):
    now = utcnow()  # compared with the files' real modification times
    info, _ = _stored(world, store)
    r1 = store.backend("replica-1")
    # what a killed ingest leaves: an unfinished upload and a published object without a row
    pending = r1.begin_put(object_key("ab" + "0" * 30))
    pending.write(b"partial")
    orphan = "cd" + "1" * 30
    r1.put(object_key(orphan), [b"x" * 100])
    foreign = r1.root / "README.txt"
    foreign.write_text("not ours")
    report = store.scrub(world.op, now=now + timedelta(hours=1))  # younger than the grace period
    assert (report.orphans_removed, report.incomplete_removed) == (0, 0)
    report = store.scrub(world.op, now=now + timedelta(days=30))
    assert (report.orphans_removed, report.incomplete_removed) == (1, 1)
    assert not r1.exists(object_key(orphan)) and list(r1.list_incomplete()) == []
    assert foreign.exists() and store.open(info.id).read() == PAYLOAD


def test_scrub_refuses_to_sweep_against_the_wrong_database(world, store):
    now = utcnow()
    # storage full of objects this database has never seen: remove nothing
    for i in range(12):
        store.backend("replica-1").put(object_key(f"{i:02x}" + "e" * 30), [b"z"])
    report = store.scrub(world.op, now=now + timedelta(days=30))
    assert report.orphans_removed == 0
    assert any("is it the right database? nothing was removed" in e for e in report.errors)
    assert len(all_files(store.backend("replica-1").root)) == 12


def test_scrub_of_an_unknown_experiment(world, store):
    with pytest.raises(ops.NotFound, match="unknown experiment 'E-9'"):
        store.scrub(world.op, "E-9")


def test_lost_replica_directory_is_restored(world, store):
    info, _ = _stored(world, store)
    shutil.rmtree(store.backend("replica-2").root)
    store.backend("replica-2").ensure()
    report = store.scrub(world.op)
    assert report.replicas_restored == 1 and store.open(info.id).read() == PAYLOAD
