"""A seekable, read-only binary file over the encrypted chunks of one stored file.

``h5py.File(EncryptedFile(...))`` works: h5py's file-object driver seeks and calls
:meth:`EncryptedFile.readinto` once per read and trusts the count it gets back without
retrying, so ``readinto`` here always fills the whole buffer (it returns less only at the end
of the file). Chunks are decrypted straight into the caller's buffer when a read covers a
whole chunk; partly read chunks go through a small LRU of reused buffers, so a sequential read
decrypts every chunk once and allocates nothing per read.

Every chunk is authenticated before a byte of it is returned. A chunk that fails on one replica
(corrupt, truncated, missing, unreadable) is read from the next; each failure is reported once
to ``on_fault`` (the store records it in ``replica_faults``; the direct read path in a kernel
reports it to the service). When every replica fails the read raises :class:`IntegrityError`.

This module imports no database code: the direct read path uses it with a leased data key.
Not thread-safe; open one per thread.
"""

from __future__ import annotations

import base64
import io
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from .backends import RangeReader, StorageBackend
from .errors import IntegrityError
from .format import ChunkCipher, Layout, decode_chunk_map, object_key


@dataclass(frozen=True)
class Fault:
    """A replica that failed to deliver a chunk (or the header)."""

    location: str
    chunk: int | None  # None: the whole object (missing, wrong size)
    kind: str  # corrupt | truncated | missing | unreadable
    detail: str = ""


FaultSink = Callable[[Fault], None]


@dataclass(frozen=True, repr=False)
class ReadLease:
    """Everything a reader needs to open one file without the database: where its chunks are
    and its data key (the direct read path: the service grants it after a decision, for
    minutes). Treat it as a secret; ``repr`` leaves the key out."""

    file_id: str
    chunk_size: int
    size: int
    chunk_map: bytes | None  # format.encode_chunk_map, or None for the fixed grid
    locations: tuple[str, ...]
    data_key: bytes
    name: str = ""

    def __repr__(self) -> str:
        return f"<ReadLease {self.name or self.file_id} on {', '.join(self.locations)}>"

    @property
    def layout(self) -> Layout:
        starts = decode_chunk_map(self.chunk_map) if self.chunk_map is not None else None
        return Layout(self.file_id, self.chunk_size, self.size, starts)

    def to_json(self) -> dict:
        return {
            "file_id": self.file_id, "chunk_size": self.chunk_size, "size": self.size,
            "chunk_map": base64.b64encode(self.chunk_map).decode() if self.chunk_map else None,
            "locations": list(self.locations), "name": self.name,
            "data_key": base64.b64encode(self.data_key).decode(),
        }

    @classmethod
    def from_json(cls, d: dict) -> ReadLease:
        return cls(
            file_id=d["file_id"], chunk_size=int(d["chunk_size"]), size=int(d["size"]),
            chunk_map=base64.b64decode(d["chunk_map"]) if d.get("chunk_map") else None,
            locations=tuple(d["locations"]), name=d.get("name", ""),
            data_key=base64.b64decode(d["data_key"]),
        )

    def open(self, backends: dict[str, StorageBackend], **kwargs) -> EncryptedFile:
        """Open the file on the locations of ``backends`` (by name) that the lease names."""
        replicas = [backends[n] for n in self.locations if n in backends]
        return EncryptedFile(replicas, self.data_key, self.layout, name=self.name, **kwargs)


class EncryptedFile(io.RawIOBase):
    """Read-only, seekable view of one stored file's plaintext.

    ``replicas`` are tried in order; one that fails is moved to the back for later chunks.
    """

    def __init__(
        self,
        replicas: Sequence[StorageBackend],
        data_key: bytes,
        layout: Layout,
        *,
        cache_chunks: int = 2,
        on_fault: FaultSink | None = None,
        name: str = "",
    ):
        super().__init__()
        if not replicas:
            raise IntegrityError(f"{name or layout.file_id}: no storage location holds this file")
        self._replicas = list(replicas)
        self._order = list(range(len(self._replicas)))
        self._readers: dict[int, RangeReader] = {}
        self._key = object_key(layout.file_id)
        self._cipher = ChunkCipher.for_layout(data_key, layout)
        self.layout = layout
        self.name = name or layout.file_id
        self._size = layout.size
        self._cs = layout.chunk_size
        self._starts = layout.starts
        self._last = layout.chunk_count - 1
        self._pos = 0
        self._record = bytearray(layout.record_size)
        self._cache: OrderedDict[int, memoryview] = OrderedDict()
        self._cache_slots = max(1, cache_chunks)
        self._spare: list[bytearray] = []
        self._on_fault = on_fault
        self._reported: set[tuple] = set()

    # -- io.RawIOBase ---------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    @property
    def size(self) -> int:
        return self._size

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, b) -> int:
        """Fill ``b`` completely from the current position (less only at the end of file)."""
        self._checkClosed()
        mv = b if isinstance(b, memoryview) else memoryview(b)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        pos = self._pos
        end = min(pos + len(mv), self._size)
        if pos >= end:
            return 0
        cs, starts, last, size = self._cs, self._starts, self._last, self._size
        cache = self._cache
        done = 0
        while pos < end:
            if starts is None:  # the fixed grid
                index, off = divmod(pos, cs)
                plen = cs if index < last else size - index * cs
            else:  # a chunk map
                index = bisect_right(starts, pos)
                begin = starts[index - 1] if index else 0
                off = pos - begin
                plen = (starts[index] if index < last else size) - begin
            take = min(plen - off, end - pos)
            chunk = cache.get(index)
            if chunk is not None:
                cache.move_to_end(index)
                mv[done : done + take] = chunk[off : off + take]
            elif off == 0 and take == plen:
                # the whole chunk is wanted: decrypt straight into the caller's buffer
                self._load(index, mv[done : done + plen])
            else:
                chunk = self._cached(index, plen)
                mv[done : done + take] = chunk[off : off + take]
            done += take
            pos += take
        self._pos = end
        return done

    def readall(self) -> bytes:
        self._checkClosed()
        out = bytearray(max(0, self._size - self._pos))
        n = self.readinto(out)
        del out[n:]
        return bytes(out)

    def close(self) -> None:
        if not self.closed:
            for reader in self._readers.values():
                try:
                    reader.close()
                except OSError:
                    pass
            self._readers.clear()
            self._cache.clear()
            self._spare.clear()
        super().close()

    # -- chunks ---------------------------------------------------------------------------
    def _cached(self, index: int, plen: int) -> memoryview:
        """Decrypt chunk ``index`` into a cache slot (evicting the least recently used)."""
        cache = self._cache
        if len(cache) >= self._cache_slots:
            _, old = cache.popitem(last=False)
            self._spare.append(old.obj)
        buf = self._spare.pop() if self._spare else bytearray(self._cs)
        view = memoryview(buf)[:plen]
        try:
            self._load(index, view)
        except BaseException:
            self._spare.append(buf)  # never cache a chunk that did not verify
            raise
        cache[index] = view
        return view

    def _reader(self, r: int) -> RangeReader:
        reader = self._readers.get(r)
        if reader is None:
            reader = self._replicas[r].open_reader(self._key)
            self._readers[r] = reader
        return reader

    def _load(self, index: int, out: memoryview) -> None:
        """Decrypt chunk ``index`` into ``out`` from the first replica that authenticates."""
        layout = self.layout
        offset = layout.record_offset(index)
        rlen = len(out) + (layout.record_size - layout.chunk_size)
        record = memoryview(self._record)[:rlen]
        failures = []
        for r in list(self._order):
            location = self._replicas[r].name
            try:
                got = self._reader(r).read_into(offset, record)
                if got != rlen:
                    self._fault(Fault(location, index, "truncated", f"record is {got} of {rlen} bytes"))
                    failures.append(f"{location}: truncated")
                else:
                    self._cipher.decrypt_into(index, record, out)
                    return
            except InvalidTag:
                self._fault(Fault(location, index, "corrupt", "failed authentication"))
                failures.append(f"{location}: failed authentication")
            except FileNotFoundError:
                self._fault(Fault(location, None, "missing", "object not found"))
                failures.append(f"{location}: missing")
            except OSError as e:
                self._fault(Fault(location, index, "unreadable", e.strerror or str(e)))
                failures.append(f"{location}: {e.strerror or e}")
            # demote the replica that failed, so later chunks try the others first
            self._order.remove(r)
            self._order.append(r)
        raise IntegrityError(
            f"{self.name}: chunk {index} could not be verified on any replica "
            f"({'; '.join(failures)}); no unverified data was returned"
        )

    def _fault(self, fault: Fault) -> None:
        token = (fault.location, fault.chunk if fault.kind != "missing" else None, fault.kind)
        if token in self._reported:
            return
        self._reported.add(token)
        if self._on_fault is not None:
            self._on_fault(fault)
