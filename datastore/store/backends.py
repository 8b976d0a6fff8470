"""Storage locations behind one small interface: put (atomically), read a byte range, list, delete.

Nothing above this module assumes a file system. Object keys are relative, ``/``-separated
names (``ab/ab12...ef.lvc``). A put is two-phase so that the chunk store can make *every*
replica durable before it publishes any of them:

=================  ====================================  ======================================
step               :class:`LocalDirectoryBackend`         an S3-compatible object store
=================  ====================================  ======================================
``begin_put``      create ``.tmp/<random>`` (O_EXCL)      ``CreateMultipartUpload``
``write``          ``write(2)``                           buffer; ``UploadPart`` every >= 5 MiB
``prepare``        ``fsync`` the temporary file           upload the last part
``commit``         ``rename`` + ``fsync`` the directory   ``CompleteMultipartUpload`` (atomic)
``abort``          unlink the temporary file              ``AbortMultipartUpload``
``read_range``     ``pread``                              ``GetObject`` with ``Range:``
``list``           walk, skipping ``.tmp/``               ``ListObjectsV2``
``list_incomplete`` files in ``.tmp/``                    ``ListMultipartUploads``
=================  ====================================  ======================================

An object is either absent or complete: readers never see a partial one under its final key.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import StoreError


@dataclass(frozen=True)
class ObjectInfo:
    """An object (or an incomplete upload) in a storage location."""

    key: str
    size: int
    modified: datetime


class PendingPut(ABC):
    """An object being written; invisible under its key until :meth:`commit`."""

    @abstractmethod
    def write(self, data) -> None:
        """Append bytes (any buffer)."""

    @abstractmethod
    def prepare(self) -> None:
        """Make everything written so far durable (it is still invisible)."""

    @abstractmethod
    def commit(self) -> None:
        """Publish the object under its key, atomically and durably."""

    @abstractmethod
    def abort(self) -> None:
        """Throw the upload away; safe to call more than once and after a failure."""


class RangeReader(ABC):
    """Reads byte ranges of one object; kept open while a file is being read."""

    @abstractmethod
    def read_into(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; return the bytes read (fewer only at the object's end)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class StorageBackend(ABC):
    """One storage location. ``name`` is what the database records in ``files.locations``."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    @abstractmethod
    def begin_put(self, key: str) -> PendingPut:
        """Start writing ``key``; see :class:`PendingPut`."""

    @abstractmethod
    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of ``key`` from ``offset`` (fewer at its end).
        :class:`FileNotFoundError` if the object does not exist."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The object's size, or None if it does not exist."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Complete objects whose key starts with ``prefix``."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key``; False if it did not exist."""

    def list_incomplete(self) -> Iterator[ObjectInfo]:
        """Uploads that were begun and never committed or aborted (a killed writer)."""
        return iter(())

    def abort_incomplete(self, info: ObjectInfo) -> None:  # noqa: B027 - optional hook
        """Remove an upload :meth:`list_incomplete` returned."""

    # conveniences built on the primitives ----------------------------------------------
    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def put(self, key: str, data: Iterable) -> None:
        """Write a whole object atomically and durably."""
        pending = self.begin_put(key)
        try:
            for block in data:
                pending.write(block)
            pending.prepare()
            pending.commit()
        except BaseException:
            pending.abort()
            raise

    def open_reader(self, key: str) -> RangeReader:
        """A reader for ranges of ``key`` (backends with handles keep one open)."""
        return _RangeReaderByCalls(self, key)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class _RangeReaderByCalls(RangeReader):
    def __init__(self, backend: StorageBackend, key: str):
        self.backend, self.key = backend, key

    def read_into(self, offset: int, buf: memoryview) -> int:
        data = self.backend.read_range(self.key, offset, len(buf))
        buf[: len(data)] = data
        return len(data)


# --------------------------------------------------------------------------------------
# local directory
# --------------------------------------------------------------------------------------
def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise StoreError(f"bad object key {key!r}")
    return key


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime, timezone.utc)


def _sync_file_range():
    """Linux's sync_file_range(2), to start writing dirty pages back early; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
#: Start write-back every this many bytes, so that the final fsync finds little left to do
#: (the disk works while the next chunks are encrypted, as databases do with their WAL).
WRITEBACK_EVERY = 8 * 1024 * 1024


class _LocalPendingPut(PendingPut):
    def __init__(self, backend: LocalDirectoryBackend, key: str):
        self.backend = backend
        self.final = backend._path(key)
        tmpdir = backend.root / LocalDirectoryBackend.TMP
        tmpdir.mkdir(parents=True, exist_ok=True)
        self.tmp = tmpdir / f"{secrets.token_hex(8)}.{self.final.name}"
        self.fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        self.done = False
        self.written = self.flushed = 0

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.written += n
        if _SYNC_FILE_RANGE is not None and self.written - self.flushed >= WRITEBACK_EVERY:
            # asynchronous: only starts the write-back (durability still comes from fsync)
            _SYNC_FILE_RANGE(self.fd, self.flushed, self.written - self.flushed, _SYNC_FILE_RANGE_WRITE)
            self.flushed = self.written

    def prepare(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None

    def commit(self) -> None:
        if self.fd is not None:
            self.prepare()
        parent = self.final.parent
        created = not parent.is_dir()
        parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.tmp, self.final)
        self.done = True
        _fsync_dir(parent)
        if created:  # the new fan-out directory's own entry must be durable too
            _fsync_dir(parent.parent)

    def abort(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if not self.done:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.done = True


class _LocalRangeReader(RangeReader):
    """pread(2) on a descriptor kept open while the file is read.

    (A memory map would save the copy into the record buffer, but in a fresh process its
    page-table set-up costs more than the copy: measured slower for whole and random reads.)
    """

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def read_into(self, offset: int, buf: memoryview) -> int:
        got = os.preadv(self.fd, [buf], offset)
        if got == len(buf) or got == 0:
            return got
        total = got  # a short read before the end of the file: keep reading
        while total < len(buf):
            n = os.preadv(self.fd, [buf[total:]], offset + total)
            if n == 0:
                break
            total += n
        return total

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LocalDirectoryBackend(StorageBackend):
    """A directory on a local (or mounted) file system.

    Objects live at ``<root>/<key>``; uploads in progress in ``<root>/.tmp/`` (the same file
    system, so the final rename is atomic).
    """

    TMP = ".tmp"

    def __init__(self, name: str, root: str | os.PathLike):
        super().__init__(name)
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"<LocalDirectoryBackend {self.name} at {self.root}>"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def ensure(self) -> None:
        """Create the location's directory (``labvault init``)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.root / self.TMP).mkdir(mode=0o700, exist_ok=True)

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise StoreError(f"storage location {self.name}: directory {self.root} does not exist (run `labvault init`)")

    def begin_put(self, key: str) -> PendingPut:
        self._require_root()
        return _LocalPendingPut(self, key)

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        with open(self._path(key), "rb", buffering=0) as f:
            return os.pread(f.fileno(), length, offset)

    def open_reader(self, key: str) -> RangeReader:
        return _LocalRangeReader(self._path(key))

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.root.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for fn in sorted(filenames):
                if fn.startswith("."):
                    continue
                key = fn if rel == "." else f"{rel}/{fn}"
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, fn))
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key, st.st_size, _mtime(st))

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(path.parent)
        return True

    def list_incomplete(self) -> Iterator[ObjectInfo]:
        tmp = self.root / self.TMP
        if not tmp.is_dir():
            return
        for entry in sorted(os.scandir(tmp), key=lambda e: e.name):
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            yield ObjectInfo(f"{self.TMP}/{entry.name}", st.st_size, _mtime(st))

    def abort_incomplete(self, info: ObjectInfo) -> None:
        name = info.key.removeprefix(f"{self.TMP}/")
        if "/" in name or name.startswith("."):
            raise StoreError(f"bad temporary object {info.key!r}")
        try:
            (self.root / self.TMP / name).unlink()
        except FileNotFoundError:
            pass


def make_backend(name: str, spec: str, root_dir: str | os.PathLike = ".") -> StorageBackend:
    """A backend from a location spec of the configuration: a directory path (relative paths
    are taken from the data directory) or a ``file://`` URL. Object stores get their own
    scheme (``s3://bucket/prefix``) when their backend lands."""
    if "://" in spec:
        scheme, _, rest = spec.partition("://")
        if scheme == "file":
            return LocalDirectoryBackend(name, rest)
        raise StoreError(
            f"storage location {name}: {scheme}:// is not supported yet (use a directory; "
            "object stores plug in through labvault.datastore.store.backends.StorageBackend)"
        )
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = Path(root_dir) / path
    return LocalDirectoryBackend(name, path)


__all__ = [
    "LocalDirectoryBackend", "ObjectInfo", "PendingPut", "RangeReader", "StorageBackend",
    "make_backend",
]
