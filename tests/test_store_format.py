"""The chunk format and the reader, without a database: layout, authentication, h5py, failover."""

from __future__ import annotations

import io
import json
import os
import uuid

import h5py
import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from hypothesis import given, settings
from hypothesis import strategies as st
from store_support import detector_frames, flip_byte

from labvault.datastore.store import EncryptedFile, IntegrityError, LocalDirectoryBackend
from labvault.datastore.store.align import chunk_starts, hdf5_chunk_starts
from labvault.datastore.store.errors import FormatError
from labvault.datastore.store.format import (
    HEADER_LEN,
    OVERHEAD,
    ChunkCipher,
    Layout,
    decode_chunk_map,
    encode_chunk_map,
    file_id_from_key,
    object_key,
    parse_header,
    size_from_object_size,
)
from labvault.datastore.store.keys import new_data_key
from labvault.datastore.store.reader import ReadLease


def write_object(backends, data: bytes, chunk_size: int, file_id: str | None = None, starts=None):
    """Encrypt ``data`` the way the store does and put it on ``backends``; (layout, key)."""
    file_id = file_id or uuid.uuid4().hex
    layout = Layout(file_id, chunk_size, len(data), starts)
    key = new_data_key()
    cipher = ChunkCipher(key, layout.header)
    records = [cipher.header]
    for i in range(layout.chunk_count):
        start = layout.chunk_start(i)
        plain = data[start:start + layout.plain_len(i)]
        rec = bytearray(len(plain) + OVERHEAD)
        cipher.encrypt_into(i, i == layout.chunk_count - 1, plain, memoryview(rec))
        records.append(bytes(rec))
    for b in backends:
        b.put(object_key(file_id), records)
    return layout, key


@pytest.fixture
def replicas(tmp_path):
    out = []
    for name in ("r1", "r2"):
        b = LocalDirectoryBackend(name, tmp_path / name)
        b.ensure()
        out.append(b)
    return out


def path_of(backend, layout):
    return backend.root / object_key(layout.file_id)


# ------------------------------------------------------------------------------------------
# layout
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, chunk, count", [(0, 16, 1), (1, 16, 1), (16, 16, 1), (17, 16, 2), (64, 16, 4)])
def test_layout_counts_and_sizes(size, chunk, count):
    layout = Layout(uuid.uuid4().hex, chunk, size)
    assert layout.chunk_count == count
    assert sum(layout.plain_len(i) for i in range(count)) == size
    assert layout.object_size == HEADER_LEN + size + count * OVERHEAD
    assert size_from_object_size(layout.object_size, chunk) == size


@given(st.integers(0, 10_000), st.integers(16, 600))
def test_object_size_determines_plaintext_size(size, chunk):
    layout = Layout(uuid.uuid4().hex, chunk, size)
    assert size_from_object_size(layout.object_size, chunk) == size
    # cut inside a record: no whole number of records fits
    assert size_from_object_size(layout.object_size - 1, chunk) != size


def test_header_round_trip_and_rejections():
    fid = uuid.uuid4().hex
    header = Layout(fid, 4096, 10).header
    assert len(header) == HEADER_LEN and parse_header(header) == (fid, 4096, False)
    with pytest.raises(FormatError, match="bad magic"):
        parse_header(b"X" + header[1:])
    with pytest.raises(FormatError, match="version 2 is not supported"):
        parse_header(header[:8] + b"\x00\x02" + header[10:])
    with pytest.raises(FormatError, match="expected 64"):
        parse_header(header[:10])


def test_object_keys():
    fid = uuid.uuid4().hex
    key = object_key(fid)
    assert key == f"{fid[:2]}/{fid}.lvc" and file_id_from_key(key) == fid
    for other in ("x/y.lvc", f"{fid}.lvc", f"zz/{fid}.lvc", f"{fid[:2]}/{fid}.tmp"):
        assert file_id_from_key(other) is None


# ------------------------------------------------------------------------------------------
# authentication: associated data binds file, index and the last-chunk flag
# ------------------------------------------------------------------------------------------
def _records(data: bytes, chunk: int, fid: str, key: bytes) -> list[bytes]:
    layout = Layout(fid, chunk, len(data))
    c = ChunkCipher(key, layout.header)
    out = []
    for i in range(layout.chunk_count):
        plain = data[i * chunk:(i + 1) * chunk]
        rec = bytearray(len(plain) + OVERHEAD)
        c.encrypt_into(i, i == layout.chunk_count - 1, plain, memoryview(rec))
        out.append(bytes(rec))
    return out


def test_swapped_reordered_truncated_and_foreign_chunks_fail():
    fid, key, chunk = uuid.uuid4().hex, new_data_key(), 32
    data = os.urandom(32 * 4)
    recs = _records(data, chunk, fid, key)
    layout = Layout(fid, chunk, len(data))
    c = ChunkCipher.for_layout(key, layout)
    assert b"".join(c.decrypt(i, r) for i, r in enumerate(recs)) == data
    with pytest.raises(InvalidTag):  # swapped: record 2 at position 1
        c.decrypt(1, recs[2])
    with pytest.raises(InvalidTag):  # reordered: the last record moved to the front
        c.decrypt(0, recs[3])
    # truncated to three whole records: the new "last" one was not encrypted as the last
    short = ChunkCipher.for_layout(key, Layout(fid, chunk, 32 * 3))
    assert short.decrypt(0, recs[0]) == data[:32]
    with pytest.raises(InvalidTag):
        short.decrypt(2, recs[2])
    # a record of another file (same key even) does not open under this file's id
    other = uuid.uuid4().hex
    foreign = _records(data, chunk, other, key)
    with pytest.raises(InvalidTag):
        c.decrypt(0, foreign[0])
    # a different chunk size in the header changes the associated data too
    with pytest.raises(InvalidTag):
        ChunkCipher.for_layout(key, Layout(fid, 64, len(data))).decrypt(0, recs[0])


def test_failed_decrypt_leaves_no_plaintext_in_the_buffer():
    fid, key = uuid.uuid4().hex, new_data_key()
    data = b"secret-plaintext" * 4
    rec = bytearray(_records(data, 64, fid, key)[0])
    rec[-1] ^= 1  # break the tag only: OpenSSL still writes the plaintext before checking it
    out = bytearray(len(data))
    c = ChunkCipher.for_layout(key, Layout(fid, 64, len(data)))
    with pytest.raises(InvalidTag):
        c.decrypt_into(0, memoryview(rec), memoryview(out))
    assert out == bytes(len(data))


# ------------------------------------------------------------------------------------------
# the reader
# ------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_reader_matches_bytes_for_any_seek_and_read(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("r")
    b = LocalDirectoryBackend("r1", d)
    b.ensure()
    chunk = data.draw(st.integers(16, 200), label="chunk")
    payload = os.urandom(data.draw(st.integers(0, 1500), label="size"))
    layout, key = write_object([b], payload, chunk)
    f = EncryptedFile([b], key, layout, cache_chunks=2)
    for _ in range(8):
        pos = data.draw(st.integers(0, len(payload) + 20))
        n = data.draw(st.integers(0, 700))
        f.seek(pos)
        buf = bytearray(n)
        got = f.readinto(buf)
        want = payload[pos:pos + n]
        # always a full buffer, short only at the end of the file
        assert got == len(want) and bytes(buf[:got]) == want
        assert f.tell() == pos + got
    f.seek(0)
    assert f.read() == payload
    f.close()


def test_reader_file_object_protocol(replicas):
    payload = os.urandom(5000)
    layout, key = write_object(replicas[:1], payload, 256)
    with EncryptedFile(replicas[:1], key, layout, name="E/x") as f:
        assert f.readable() and f.seekable() and not f.writable()
        assert f.seek(-10, io.SEEK_END) == 4990 and f.read() == payload[-10:]
        assert f.seek(100) == 100 and f.seek(28, io.SEEK_CUR) == 128
        assert f.read(300) == payload[128:428]
        assert f.read(0) == b"" and f.size == 5000
        with pytest.raises(ValueError):
            f.seek(-1)
        assert io.BufferedReader(f).read() == payload[428:]
    assert f.closed


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_h5py_reads_equal_arrays(tmp_path, replicas, compression):
    src = tmp_path / "frames.h5"
    frames = detector_frames(src, compression=compression)
    layout, key = write_object(replicas[:1], src.read_bytes(), 1000)  # chunks straddle HDF5 chunks
    with h5py.File(EncryptedFile(replicas[:1], key, layout), "r") as f:
        ds = f["entry/data"]
        assert ds.chunks == (1, 64, 64) and ds.compression == compression
        assert ds.attrs["units"] == "counts"
        np.testing.assert_array_equal(ds[...], frames)
        for i in (7, 0, 11, 3):
            np.testing.assert_array_equal(ds[i], frames[i])
        np.testing.assert_array_equal(ds[2:9, 10:20, 5], frames[2:9, 10:20, 5])


def test_corrupt_chunk_is_read_from_the_next_replica_and_reported(replicas):
    payload = os.urandom(4000)
    layout, key = write_object(replicas, payload, 512)
    flip_byte(path_of(replicas[0], layout), layout.record_offset(3) + 40)
    faults = []
    f = EncryptedFile(replicas, key, layout, on_fault=faults.append)
    assert f.read() == payload
    assert [(x.location, x.chunk, x.kind) for x in faults] == [("r1", 3, "corrupt")]


def test_missing_and_truncated_replicas_fail_over(replicas):
    payload = os.urandom(3000)
    layout, key = write_object(replicas, payload, 512)
    os.truncate(path_of(replicas[1], layout), layout.record_offset(4) + 10)
    os.unlink(path_of(replicas[0], layout))
    faults = []
    f = EncryptedFile(replicas, key, layout, on_fault=faults.append)
    assert f.read(2048) == payload[:2048]  # chunks 0-3 from r2
    with pytest.raises(IntegrityError, match=r"chunk 4 .*\(r2: truncated; r1: missing\)"):
        f.read()
    assert {(x.location, x.chunk, x.kind) for x in faults} == {("r1", None, "missing"), ("r2", 4, "truncated")}


def test_all_replicas_bad_is_a_clear_error_never_wrong_bytes(replicas):
    payload = os.urandom(4000)
    layout, key = write_object(replicas, payload, 512)
    for r in replicas:
        flip_byte(path_of(r, layout), layout.record_offset(2) + 20)
    f = EncryptedFile(replicas, key, layout, name="E-1/run.h5")
    assert f.read(1024) == payload[:1024]
    buf = bytearray(b"\xaa" * 600)
    with pytest.raises(IntegrityError, match=r"E-1/run.h5: chunk 2 could not be verified on any replica") as e:
        f.readinto(buf)
    assert "\n" not in str(e.value)
    # nothing of the failed chunk reached the caller's buffer (it was decrypted straight into
    # it, and zeroed when the tag did not match)
    assert bytes(buf[:512]) in (bytes(512), b"\xaa" * 512)
    # the straddling read that would return plaintext of chunk 2 fails as a whole
    f.seek(1000)
    with pytest.raises(IntegrityError):
        f.read(100)
    # other chunks still read
    f.seek(1536)
    assert f.read(512) == payload[1536:2048]


def test_h5py_surfaces_the_integrity_error(tmp_path, replicas):
    src = tmp_path / "frames.h5"
    detector_frames(src)
    layout, key = write_object(replicas[:1], src.read_bytes(), 1024)
    with h5py.File(src, "r") as f:  # where frame 5 lies in the plaintext
        at = f["entry/data"].id.get_chunk_info(5).byte_offset + 100
    flip_byte(path_of(replicas[0], layout), layout.record_offset(at // 1024) + 12 + at % 1024)
    with h5py.File(EncryptedFile(replicas[:1], key, layout), "r") as f:
        f["entry/data"][2]  # other frames still read
        with pytest.raises(Exception) as e:
            f["entry/data"][5]
    chain = []
    err = e.value
    while err is not None:
        chain.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    assert any("could not be verified" in c for c in chain), chain


def test_wrong_key_fails_authentication(replicas):
    payload = os.urandom(100)
    layout, _ = write_object(replicas[:1], payload, 64)
    with pytest.raises(IntegrityError):
        EncryptedFile(replicas[:1], new_data_key(), layout).read()


# ------------------------------------------------------------------------------------------
# chunk maps: boundaries that follow the HDF5 dataset chunks
# ------------------------------------------------------------------------------------------
@st.composite
def mapped_payloads(draw):
    chunk = draw(st.integers(16, 200), label="chunk")
    size = draw(st.integers(0, 1500), label="size")
    cuts = draw(st.lists(st.integers(0, size + 5), max_size=12), label="boundaries")
    return chunk, os.urandom(size), chunk_starts(size, chunk, cuts), cuts


@settings(max_examples=60, deadline=None)
@given(spec=mapped_payloads(), data=st.data())
def test_reader_over_a_chunk_map(tmp_path_factory, spec, data):
    chunk, payload, starts, cuts = spec
    assert {c for c in cuts if 0 < c < len(payload)} <= set(starts)
    b = LocalDirectoryBackend("r1", tmp_path_factory.mktemp("m"))
    b.ensure()
    layout, key = write_object([b], payload, chunk, starts=starts)
    assert all(0 < layout.plain_len(i) <= chunk for i in range(layout.chunk_count)) or not payload
    assert decode_chunk_map(encode_chunk_map(starts)).tolist() == starts
    f = EncryptedFile([b], key, layout)
    for _ in range(6):
        pos = data.draw(st.integers(0, len(payload) + 10))
        n = data.draw(st.integers(0, 500))
        f.seek(pos)
        buf = bytearray(n)
        got = f.readinto(buf)
        assert bytes(buf[:got]) == payload[pos:pos + n] and got == len(payload[pos:pos + n])


@settings(max_examples=40, deadline=None)
@given(spec=mapped_payloads(), other=st.lists(st.integers(1, 1500), max_size=12))
def test_a_wrong_chunk_map_fails_never_returns_wrong_bytes(tmp_path_factory, spec, other):
    chunk, payload, starts, _ = spec
    b = LocalDirectoryBackend("r1", tmp_path_factory.mktemp("w"))
    b.ensure()
    layout, key = write_object([b], payload, chunk, starts=starts)
    wrong = chunk_starts(len(payload), chunk, other)
    f = EncryptedFile([b], key, Layout(layout.file_id, chunk, len(payload), wrong))
    try:
        got = f.read()
    except IntegrityError:
        return
    assert got == payload  # only the true boundaries authenticate


def test_chunk_starts_bounds_and_map_encoding():
    assert chunk_starts(10, 4, []) == [4, 8]
    assert chunk_starts(10, 4, [3, 5, 0, 10, 99]) == [3, 5, 9]
    assert chunk_starts(0, 4, [1]) == [] and chunk_starts(4, 4, []) == []
    with pytest.raises(FormatError, match="inconsistent"):
        Layout(uuid.uuid4().hex, 4, 10, [4, 3])
    with pytest.raises(FormatError, match="last chunk of 6 bytes"):
        Layout(uuid.uuid4().hex, 4, 10, [4])
    with pytest.raises(FormatError, match="damaged"):
        decode_chunk_map(b"not zlib")
    many = chunk_starts(10**9, 1 << 18, range(12345, 10**9, 1 << 19))
    assert len(encode_chunk_map(many)) < 20_000  # a million-ish boundaries stay small


def test_hdf5_files_are_cut_along_their_dataset_chunks(tmp_path):
    src = tmp_path / "frames.h5"
    detector_frames(src, frames=20, shape=(32, 32))  # 2 KiB frames
    size = src.stat().st_size
    starts = hdf5_chunk_starts(src, size, 1024)
    with h5py.File(src, "r") as f:
        ds = f["entry/data"]
        frames = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
    assert {c.byte_offset for c in frames} | {c.byte_offset + c.size for c in frames if c.byte_offset + c.size < size} <= set(starts)
    assert hdf5_chunk_starts(src, size, 1 << 20) is None  # frames much smaller than a chunk: the grid
    (tmp_path / "x.bin").write_bytes(b"not hdf5" * 100)
    assert hdf5_chunk_starts(tmp_path / "x.bin", 800, 64) is None
    (tmp_path / "bad.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    assert hdf5_chunk_starts(tmp_path / "bad.h5", 108, 64) is None


def test_read_lease_round_trip_and_no_key_in_repr(replicas):
    payload = os.urandom(3000)
    starts = chunk_starts(3000, 512, [700, 1900])
    layout, key = write_object(replicas, payload, 512, starts=starts)
    lease = ReadLease(layout.file_id, 512, 3000, encode_chunk_map(starts), ("r2", "r1"), key, "E-1/x")
    again = ReadLease.from_json(json.loads(json.dumps(lease.to_json())))
    assert again == lease and key.hex() not in repr(again) and "E-1/x" in repr(again)
    with again.open({b.name: b for b in replicas}) as f:
        assert f.read() == payload


def test_records_swapped_or_cut_on_disk_are_refused(replicas):
    payload = os.urandom(2048)
    layout, key = write_object(replicas[:1], payload, 512)  # four records of equal length
    path = path_of(replicas[0], layout)
    blob = bytearray(path.read_bytes())
    r1, r2 = (slice(layout.record_offset(i), layout.record_offset(i) + layout.record_len(i)) for i in (1, 2))
    blob[r1], blob[r2] = blob[r2], blob[r1]
    path.write_bytes(bytes(blob))
    f = EncryptedFile(replicas[:1], key, layout)
    assert f.read(512) == payload[:512]
    with pytest.raises(IntegrityError, match="chunk 1 "):
        f.read(512)
    # cut after the third record: as a 3-chunk file its last record was not encrypted as last
    layout, key = write_object(replicas[:1], payload, 512)
    path = path_of(replicas[0], layout)
    os.truncate(path, layout.record_offset(3))
    short = Layout(layout.file_id, 512, size_from_object_size(path.stat().st_size, 512))
    assert short.size == 1536
    f = EncryptedFile(replicas[:1], key, short)
    assert f.read(1024) == payload[:1024]
    with pytest.raises(IntegrityError, match="chunk 2 "):
        f.read()
