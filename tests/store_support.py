"""Shared pieces of the chunk-store tests: a small world, a store on tmp_path, fault injection.

The fixtures are imported by the ``test_store_*`` modules. Fault injection wraps the real
local backend (it is the only stand-in used): it fails writes after a number of bytes, fails
one step of the put, or records the order in which replicas become durable and visible.
"""

from __future__ import annotations

import errno
from pathlib import Path

import h5py
import numpy as np
import pytest
from sqlalchemy import select, update

from labvault.datastore import operations as ops
from labvault.datastore.models import Experiment, StoredFile, User
from labvault.datastore.store import ChunkStore
from labvault.datastore.store.backends import PendingPut, StorageBackend
from labvault.datastore.store.format import object_key

OP = ops.Actor(operator="test")


class World:
    """Users and experiments of the store tests (ids resolved once)."""

    def __init__(self, sessions):
        self.sessions = sessions
        ops.add_institution(sessions, OP, "Uni", domains=["uni.example"])
        ops.add_user(sessions, OP, "pi", institution="Uni", institutional_email="pi@uni.example",
                     verified_institutional_email=True)
        ops.add_user(sessions, OP, "writer", institution="Uni")
        ops.add_user(sessions, OP, "viewer", institution="Uni")
        ops.add_user(sessions, OP, "outsider", institution="Uni")
        ops.add_experiment(sessions, OP, "E-1", pi="pi")
        ops.add_experiment(sessions, OP, "E-2", pi="pi")
        ops.grant_role(sessions, OP, "E-1", "writer", "writer")
        ops.grant_role(sessions, OP, "E-1", "viewer", "viewer")
        with sessions() as s:
            ids = dict(s.execute(select(User.name, User.id)).all())
        self.op = OP
        self.pi = ops.Actor(user_id=ids["pi"])
        self.writer = ops.Actor(user_id=ids["writer"])
        self.viewer = ops.Actor(user_id=ids["viewer"])
        self.outsider = ops.Actor(user_id=ids["outsider"])

    def agree_mirror(self, exid: str, agreed: bool = True) -> None:
        with self.sessions.begin() as s:
            s.execute(update(Experiment).where(Experiment.exid == exid).values(mirror_agreed=agreed))

    def row(self, exid: str, path: str) -> StoredFile:
        with self.sessions() as s:
            return s.scalars(
                select(StoredFile).join(Experiment, Experiment.id == StoredFile.experiment_id)
                .where(Experiment.exid == exid, StoredFile.path == path)
                .order_by(StoredFile.id.desc())
            ).first()


@pytest.fixture
def world(sessions) -> World:
    return World(sessions)


def make_store(sessions, data_dir: Path, **traits) -> ChunkStore:
    traits.setdefault("chunk_size", 1024)
    store = ChunkStore(sessions=sessions, data_dir=str(data_dir), **traits)
    store.prepare_locations()
    return store


@pytest.fixture
def store(sessions, tmp_path) -> ChunkStore:
    return make_store(sessions, tmp_path / "data")


def object_path(store: ChunkStore, location: str, file_uuid: str) -> Path:
    return store.backend(location).root / object_key(file_uuid)


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def detector_frames(path: Path, frames: int = 12, shape=(64, 64), compression=None, seed=0) -> np.ndarray:
    """An HDF5 file of detector-like uint16 frames (Poisson counts + a ring), chunked per frame."""
    rng = np.random.default_rng(seed)
    y, x = np.indices(shape)
    r = np.hypot(y - shape[0] / 2, x - shape[1] / 2)
    ring = (np.abs(r - shape[0] / 4) < 2) * 200
    data = (rng.poisson(5, (frames, *shape)) + ring).astype("uint16")
    with h5py.File(path, "w") as f:
        f.create_dataset("entry/data", data=data, chunks=(1, *shape), compression=compression)
        f["entry/data"].attrs["units"] = "counts"
    return data


# ------------------------------------------------------------------------------------------
# fault injection: a wrapper around the real backend
# ------------------------------------------------------------------------------------------
class FaultyBackend(StorageBackend):
    """Delegates to ``inner``; fails as told, and logs each step of each put in ``events``."""

    def __init__(self, inner: StorageBackend, *, fail_after_bytes: int | None = None,
                 fail_on: str | None = None, fail_delete: bool = False, events: list | None = None,
                 on_step=None):
        super().__init__(inner.name)
        self.inner = inner
        self.fail_after_bytes = fail_after_bytes
        self.fail_on = fail_on  # "prepare" | "commit"
        self.fail_delete = fail_delete
        self.events = events if events is not None else []
        self.on_step = on_step
        self.root = getattr(inner, "root", None)

    def begin_put(self, key):
        return _FaultyPut(self, self.inner.begin_put(key))

    def read_range(self, key, offset, length):
        return self.inner.read_range(key, offset, length)

    def open_reader(self, key):
        return self.inner.open_reader(key)

    def size(self, key):
        return self.inner.size(key)

    def list(self, prefix=""):
        return self.inner.list(prefix)

    def delete(self, key):
        if self.fail_delete:
            raise OSError(errno.EIO, "Input/output error")
        self.events.append((self.name, "delete"))
        if self.on_step:
            self.on_step(self.name, "delete")
        return self.inner.delete(key)

    def list_incomplete(self):
        return self.inner.list_incomplete()

    def abort_incomplete(self, info):
        return self.inner.abort_incomplete(info)


class _FaultyPut(PendingPut):
    def __init__(self, backend: FaultyBackend, inner: PendingPut):
        self.backend, self.inner, self.written = backend, inner, 0

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        limit = self.backend.fail_after_bytes
        if limit is not None and self.written + n > limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += n
        self.inner.write(data)

    def _step(self, name):
        if self.backend.fail_on == name:
            raise OSError(errno.EIO, "Input/output error")
        self.backend.events.append((self.backend.name, name))
        if self.backend.on_step:
            self.backend.on_step(self.backend.name, name)

    def prepare(self):
        self._step("prepare")
        self.inner.prepare()

    def commit(self):
        self._step("commit")
        self.inner.commit()

    def abort(self):
        self.inner.abort()
