"""Ingest through the store on SQLite and PostgreSQL: round trips, durability order, mirrors,
decisions, and bad input (unknown experiment, unreadable source, a failing replica)."""

from __future__ import annotations

import hashlib
import os

import h5py
import numpy as np
import pytest
from sqlalchemy import func, select, update
from store_support import FaultyBackend, all_files, detector_frames, make_store, object_path

from labvault.datastore import operations as ops
from labvault.datastore.models import AuditEvent, DataKey, Experiment, StoredFile, utcnow
from labvault.datastore.store import ReplicaWriteError
from labvault.datastore.store.format import object_key


def _count(sessions, model) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(model))


def _last_event(sessions) -> AuditEvent:
    with sessions() as s:
        return s.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()


def _objects(store) -> list:
    """Every file under every location: final objects and temporary uploads."""
    return [p for name in store.backends for p in all_files(store.backend(name).root)]


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_round_trip_bytes_and_h5py_arrays(world, store, tmp_path, compression):
    src = tmp_path / "frames.h5"
    frames = detector_frames(src, compression=compression)
    result = store.ingest_file(world.op, "E-1", src, "run1/frames.h5")
    info = result.file
    data = src.read_bytes()
    assert not result.skipped
    assert (info.size, info.checksum) == (len(data), hashlib.sha256(data).hexdigest())
    # cut along the HDF5 dataset chunks: every frame starts on a chunk boundary
    layout = store.layout(info.id)
    assert layout.starts is not None and info.chunk_count == layout.chunk_count
    assert all(n <= 1024 for n in map(layout.plain_len, range(layout.chunk_count)))
    with h5py.File(src, "r") as f:
        ds = f["entry/data"]
        frame_starts = {ds.id.get_chunk_info(i).byte_offset for i in range(ds.id.get_num_chunks())}
    assert frame_starts <= set(layout.starts)
    assert info.locations == ("replica-1", "replica-2")
    for loc in info.locations:  # ciphertext on every replica, no plaintext anywhere
        blob = object_path(store, loc, info.uuid).read_bytes()
        assert len(blob) == layout.object_size
        assert data[5000:5100] not in blob
    assert store.open_file(world.pi, "E-1", "run1/frames.h5").read() == data
    with h5py.File(store.open_file(world.writer, "E-1", "run1/frames.h5"), "r") as f:
        np.testing.assert_array_equal(f["entry/data"][...], frames)
        np.testing.assert_array_equal(f["entry/data"][7], frames[7])
    event = _last_event(world.sessions)
    assert (event.action, event.target, event.allowed) == ("file.read", "file:E-1/run1/frames.h5", True)


def test_stream_api_recuts_blocks_of_any_size(world, store):
    payload = os.urandom(5 * 1024 + 17)
    blocks = [payload[i:i + n] for i, n in ((0, 1), (1, 3000), (3001, 2048), (5049, 10**6))]
    progress = []
    info = store.ingest_stream(world.writer, "E-1", "s.bin", iter(blocks), progress=progress.append).file
    assert sum(progress) == len(payload) and info.chunk_count == 6
    assert store.open(info.id).read() == payload
    for size in (0, 1024, 2048):  # empty, exactly one chunk, exactly two
        data = os.urandom(size)
        info = store.ingest_stream(world.op, "E-1", f"exact-{size}", [data]).file
        assert info.chunk_count == max(1, size // 1024)
        assert store.open(info.id).read() == data


def test_row_is_committed_only_after_every_replica_is_durable(world, store):
    events = []

    def no_row_yet(location, step):
        with world.sessions() as s:
            rows = s.scalar(select(func.count()).select_from(StoredFile))
            keys = s.scalar(select(func.count()).select_from(DataKey))
        events.append((location, step, rows, keys))

    for name in ("replica-1", "replica-2"):
        store.set_backend(name, FaultyBackend(store.backend(name), on_step=no_row_yet))
    info = store.ingest_stream(world.op, "E-1", "d.bin", [b"d" * 3000]).file
    # every replica fsynced before any is published, and no row existed at any of these steps
    assert [(loc, step) for loc, step, _, _ in events] == [
        ("replica-1", "prepare"), ("replica-2", "prepare"),
        ("replica-1", "commit"), ("replica-2", "commit"),
    ]
    assert all(rows == 0 and keys == 0 for _, _, rows, keys in events)
    assert world.row("E-1", "d.bin").id == info.id


@pytest.mark.parametrize("agreed", [False, True])
def test_mirror_locations_only_when_the_pi_agreed(world, sessions, tmp_path, agreed):
    store = make_store(sessions, tmp_path / "m", mirror_locations={"offsite": "mirror"})
    world.agree_mirror("E-2", agreed)
    info = store.ingest_stream(world.op, "E-2", "x.bin", [b"x" * 2000]).file
    expected = ("replica-1", "replica-2", "offsite") if agreed else ("replica-1", "replica-2")
    assert info.locations == expected
    assert object_path(store, "offsite", info.uuid).exists() == agreed
    event = _last_event(sessions)
    assert event.action == "file.upload"
    assert event.details["mirror"].startswith("mirror.pi_agreed")
    assert event.details["locations"] == list(expected)


def test_ingest_is_resumable_by_checksum(world, store, tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(4000))
    first = store.ingest_file(world.op, "E-1", src, "a.bin")
    again = store.ingest_file(world.op, "E-1", src, "a.bin")
    assert again.skipped and again.file.id == first.file.id
    assert _count(world.sessions, StoredFile) == 1
    src.write_bytes(os.urandom(4000))  # same size, other content: never overwritten silently
    with pytest.raises(ops.OperationError, match="already stored with different content; delete it first"):
        store.ingest_file(world.op, "E-1", src, "a.bin")
    with pytest.raises(ops.OperationError, match="already stored"):
        store.ingest_stream(world.op, "E-1", "a.bin", [b"x"])


def test_upload_is_decided_by_the_policy_and_refusals_audited(world, store):
    assert store.ingest_stream(world.writer, "E-1", "w.bin", [b"w"]).file.path == "w.bin"
    for actor, rule in ((world.viewer, "modify.authorised_roles"), (world.outsider, "proprietary.assigned_only")):
        with pytest.raises(ops.Denied, match=rule):
            store.ingest_stream(actor, "E-1", "no.bin", [b"n" * 5000])
        event = _last_event(world.sessions)
        assert (event.action, event.allowed, event.rule) == ("file.upload", False, rule)
    assert _count(world.sessions, StoredFile) == 1
    assert len(_objects(store)) == 2  # w.bin on two replicas, nothing else


def test_right_revoked_during_upload_commits_nothing(world, store):
    def body():
        yield b"a" * 3000
        with world.sessions.begin() as s:  # the experiment is deleted while the upload runs
            s.execute(update(Experiment).where(Experiment.exid == "E-1").values(deleted_at=utcnow()))
        yield b"b" * 3000

    with pytest.raises(ops.Denied, match="retention.deleted"):
        store.ingest_stream(world.writer, "E-1", "late.bin", body())
    assert _count(world.sessions, StoredFile) == 0 and _count(world.sessions, DataKey) == 0
    assert _objects(store) == []


def test_bad_input_is_one_line_and_stores_nothing(world, store, tmp_path):
    paths = {"ok": tmp_path / "ok.bin", "missing": tmp_path / "missing.bin",
             "fifo": tmp_path / "fifo", "dir": tmp_path, "dangling": tmp_path / "dangling"}
    paths["ok"].write_bytes(b"ok")
    os.mkfifo(paths["fifo"])  # opening it would block: refused before it is opened
    os.symlink(tmp_path / "nowhere", paths["dangling"])
    cases = [
        ("E-404", "ok", "unknown experiment 'E-404'"),
        ("E-1", "missing", f"cannot read {tmp_path}/missing.bin: No such file or directory"),
        ("E-1", "fifo", f"cannot read {tmp_path}/fifo: not a regular file"),
        ("E-1", "dir", f"cannot read {tmp_path}: not a regular file"),
        ("E-1", "dangling", f"cannot read {tmp_path}/dangling: No such file or directory"),
    ]
    for exid, source, message in cases:
        with pytest.raises(ops.OperationError) as e:
            store.ingest_file(world.op, exid, paths[source], "x.bin")
        assert str(e.value) == message
    for bad in ("/abs", "a/../b", "a//b", "", "a\\b", "x\x00y"):
        with pytest.raises(ops.OperationError, match="bad file path"):
            store.ingest_stream(world.op, "E-1", bad, [b"x"])
    assert _count(world.sessions, StoredFile) == 0 and _objects(store) == []


@pytest.mark.parametrize("fail", ["write", "prepare", "commit"])
def test_a_failing_replica_fails_the_ingest_cleanly(world, store, tmp_path, fail):
    keep = store.ingest_stream(world.op, "E-1", "keep.bin", [b"k" * 3000]).file  # stored before
    before = {p: p.read_bytes() for p in _objects(store)}
    store.set_backend("replica-2", FaultyBackend(
        store.backend("replica-2"),
        fail_after_bytes=5000 if fail == "write" else None,
        fail_on=None if fail == "write" else fail,
    ))
    with pytest.raises(ReplicaWriteError) as e:
        store.ingest_stream(world.op, "E-1", "big.bin", [os.urandom(20_000)])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("storing E-1/big.bin on location replica-2 failed: ")
    assert msg.endswith("; nothing was stored")
    assert ("No space left on device" if fail == "write" else "Input/output error") in msg
    # nothing committed; no temporary upload and no published object left on any replica
    assert _count(world.sessions, StoredFile) == 1 and _count(world.sessions, DataKey) == 1
    assert {p: p.read_bytes() for p in _objects(store)} == before
    # what was stored before is intact and readable
    assert store.open(keep.id).read() == b"k" * 3000


def test_the_source_changing_while_read_is_refused(world, store, tmp_path):
    src = tmp_path / "grow.bin"
    src.write_bytes(b"a" * 5000)
    real = store._ingest

    def grow_then_ingest(*args, **kwargs):
        with open(src, "ab") as f:
            f.write(b"more")
        return real(*args, **kwargs)

    store._ingest = grow_then_ingest
    with pytest.raises(ops.OperationError, match="changed while it was read; nothing was stored"):
        store.ingest_file(world.op, "E-1", src, "grow.bin")
    assert _count(world.sessions, StoredFile) == 0 and _objects(store) == []


def test_object_key_is_the_file_uuid_everywhere(world, store):
    info = store.ingest_stream(world.op, "E-1", "k.bin", [b"k"]).file
    for loc in ("replica-1", "replica-2"):
        assert store.backend(loc).exists(object_key(info.uuid))
