"""Master keys: the file key provider, key rotation without re-encryption, wrong and missing keys."""

from __future__ import annotations

import base64
import logging
import os
import stat

import pytest
from sqlalchemy import select
from store_support import all_files, make_store

from labvault.datastore.models import DataKey
from labvault.datastore.store import FileKeyProvider, KeyUnavailable
from labvault.datastore.store.keys import new_data_key, wrap_context

CTX = wrap_context("0" * 32)


@pytest.fixture
def provider(tmp_path):
    p = FileKeyProvider(key_dir=str(tmp_path / "keys"))
    p.ensure_key()
    return p


def test_init_creates_a_private_master_key(provider, tmp_path):
    d = tmp_path / "keys"
    key_id = provider.current_key_id()
    key_file = d / f"{key_id}.key"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert provider.ensure_key() == key_id  # idempotent: init twice keeps the key
    assert provider.key_ids() == [key_id]


def test_wrap_unwrap_is_bound_to_key_and_context(provider):
    dk = new_data_key()
    key_id, wrapped = provider.wrap(dk, CTX)
    assert dk not in wrapped and len(wrapped) == 61
    assert provider.unwrap(key_id, wrapped, CTX) == dk
    with pytest.raises(KeyUnavailable, match="belongs to another file"):
        provider.unwrap(key_id, wrapped, wrap_context("1" * 32))
    tampered = bytearray(wrapped)
    tampered[20] ^= 1
    with pytest.raises(KeyUnavailable):
        provider.unwrap(key_id, bytes(tampered), CTX)


def test_wrong_missing_or_exposed_master_key_is_a_clear_error(provider, tmp_path):
    dk = new_data_key()
    key_id, wrapped = provider.wrap(dk, CTX)
    key_file = tmp_path / "keys" / f"{key_id}.key"
    # another key in the same file: a fresh provider (no cache) must refuse, not return garbage
    key_file.write_text(f"labvault-master-key-v1\n{base64.b64encode(os.urandom(32)).decode()}\n")
    fresh = FileKeyProvider(key_dir=str(tmp_path / "keys"))
    with pytest.raises(KeyUnavailable, match=f"does not unwrap with master key {key_id}"):
        fresh.unwrap(key_id, wrapped, CTX)
    os.chmod(key_file, 0o644)
    with pytest.raises(KeyUnavailable, match=r"accessible by others \(mode 0644\): chmod 600"):
        FileKeyProvider(key_dir=str(tmp_path / "keys")).unwrap(key_id, wrapped, CTX)
    os.chmod(key_file, 0o600)
    key_file.write_text("garbage\n")
    with pytest.raises(KeyUnavailable, match="damaged"):
        FileKeyProvider(key_dir=str(tmp_path / "keys")).unwrap(key_id, wrapped, CTX)
    key_file.unlink()
    with pytest.raises(KeyUnavailable, match="is not in"):
        FileKeyProvider(key_dir=str(tmp_path / "keys")).unwrap(key_id, wrapped, CTX)
    with pytest.raises(KeyUnavailable, match="run `labvault init`"):
        FileKeyProvider(key_dir=str(tmp_path / "nokeys")).current_key_id()


def test_current_key_cannot_be_retired(provider):
    with pytest.raises(KeyUnavailable, match="is current"):
        provider.retire_key(provider.current_key_id())


# ------------------------------------------------------------------------------------------
# rotation through the store (SQLite and PostgreSQL)
# ------------------------------------------------------------------------------------------
def _ciphertext(store):
    return {p: p.read_bytes() for loc in store.locations for p in all_files(store.backend(loc).root)}


def test_rotate_rewraps_every_data_key_without_reencrypting(world, store, tmp_path):
    payloads = {f"f{i}.bin": os.urandom(3000 + i) for i in range(3)}
    for name, data in payloads.items():
        store.ingest_stream(world.op, "E-1", name, [data])
    store.ingest_stream(world.op, "E-1", "gone.bin", [b"x" * 10])
    store.delete_file(world.pi, "E-1", "gone.bin", reason="test")
    old_key = store.key_provider.current_key_id()
    before_ct = _ciphertext(store)
    with world.sessions() as s:
        before = {k.id: k.wrapped_key for k in s.scalars(select(DataKey))}

    report = store.rotate_keys(world.op)

    assert report.rewrapped == 3 and report.retired == [old_key] and not report.failures
    assert report.new_key_id != old_key == report.retired[0]
    with world.sessions() as s:
        keys = s.scalars(select(DataKey)).all()
    live = [k for k in keys if k.wrapped_key is not None]
    assert {k.master_key_id for k in live} == {report.new_key_id}
    assert all(before[k.id] != k.wrapped_key for k in live)
    assert [k.wrapped_key for k in keys if k.destroyed_at is not None] == [None]  # stays shredded
    assert _ciphertext(store) == before_ct  # data untouched: no re-encryption
    # the old master key is gone, and no longer needed: a fresh store reads everything
    assert not (tmp_path / "data" / "keys" / f"{old_key}.key").exists()
    fresh = make_store(world.sessions, tmp_path / "data")
    for name, data in payloads.items():
        assert fresh.open_file(world.pi, "E-1", name).read() == data


def test_rotate_keep_old_and_keys_that_cannot_be_unwrapped(world, store, tmp_path):
    store.ingest_stream(world.op, "E-1", "a.bin", [b"a" * 100])
    first = store.key_provider.current_key_id()
    report = store.rotate_keys(world.op, keep_old=True)
    assert report.kept == [first] and report.retired == []
    assert (tmp_path / "data" / "keys" / f"{first}.key").exists()
    # a data key whose master key is lost: reported, its master key id stays referenced
    store.ingest_stream(world.op, "E-1", "b.bin", [b"b" * 100])
    second = store.key_provider.current_key_id()
    os.unlink(tmp_path / "data" / "keys" / f"{second}.key")
    store.key_provider._cache.clear()
    os.unlink(tmp_path / "data" / "keys" / f"{first}.key")
    report = store.rotate_keys(world.op)
    assert report.rewrapped == 0 and len(report.failures) == 2
    assert all("is not in" in f for f in report.failures)
    with pytest.raises(KeyUnavailable, match=f"master key {second} is not in"):
        store.open_file(world.pi, "E-1", "b.bin")


def test_wrong_master_key_on_read_is_one_line(world, store, tmp_path):
    store.ingest_stream(world.op, "E-1", "a.bin", [b"a" * 100])
    key_id = store.key_provider.current_key_id()
    (tmp_path / "data" / "keys" / f"{key_id}.key").write_text(
        f"labvault-master-key-v1\n{base64.b64encode(os.urandom(32)).decode()}\n")
    fresh = make_store(world.sessions, tmp_path / "data")
    with pytest.raises(KeyUnavailable) as e:
        fresh.open_file(world.pi, "E-1", "a.bin")
    assert "\n" not in str(e.value) and "does not unwrap" in str(e.value)


def test_key_material_is_never_logged(world, store, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    store.log.setLevel(logging.DEBUG)
    store.ingest_stream(world.op, "E-1", "a.bin", [b"a" * 5000])
    store.open_file(world.pi, "E-1", "a.bin").read()
    store.rotate_keys(world.op)
    key_id = store.key_provider.current_key_id()
    master_b64 = (tmp_path / "data" / "keys" / f"{key_id}.key").read_text().split()[1]
    row = world.row("E-1", "a.bin")
    with world.sessions() as s:
        dk = s.get(DataKey, row.data_key_id)
    data_key = store.key_provider.unwrap(dk.master_key_id, dk.wrapped_key, wrap_context(row.uuid))
    text = caplog.text + repr(store.key_provider) + repr(store.open(row.id)._cipher)
    assert caplog.records  # the store did log
    for secret in (master_b64, base64.b64decode(master_b64).hex(), data_key.hex(),
                   base64.b64encode(data_key).decode(), repr(data_key)):
        assert secret not in text
