"""The on-storage format of one file: a versioned header followed by encrypted chunk records.

Version 1 (all integers big-endian)::

    header (64 bytes)
        magic        8s   b"LVCHUNKS"
        version      u16  1
        header_len   u16  64
        algorithm    u16  1 = AES-256-GCM, 96-bit random nonce, 128-bit tag
        flags        u16  0 (reserved)
        file_id      16s  the file's UUID (``files.uuid``)
        chunk_size   u32  plaintext bytes per chunk (the last chunk may be shorter)
        reserved     28s  zeros
    record i (i = 0 .. chunk_count - 1), at header_len + i * (12 + chunk_size + 16)
        nonce        12s  random, fresh for every chunk
        ciphertext   n    n = chunk_size, or the rest of the file for the last chunk
        tag          16s  GCM tag

Each chunk's associated data is ``header || u64 index || u8 last``. So a record moved to another
position (index), to another file (file id in the header; and every file has its own key), a
truncated object (the new final record was not encrypted as the last one) or an edited header
all fail authentication. A file always has at least one chunk: an empty file is one empty,
last chunk, so "empty" cannot be confused with "truncated to nothing".

The plaintext size follows from the object size (see :func:`size_from_object_size`), so an
object describes itself; the database row repeats size, chunk size and chunk count, and the
reader checks that both agree. A new version gets a new ``version`` number and its own layout
class; readers dispatch on the version the database row records.
"""

from __future__ import annotations

import os
import struct
import uuid as uuid_mod
from dataclasses import dataclass

from .errors import FormatError

MAGIC = b"LVCHUNKS"
VERSION = 1
ALGORITHM_AES256GCM = 1
HEADER_LEN = 64
NONCE_LEN = 12
TAG_LEN = 16
OVERHEAD = NONCE_LEN + TAG_LEN  # per record

_HEADER = struct.Struct(">8sHHHH16sI28s")
_INDEX = struct.Struct(">QB")
assert _HEADER.size == HEADER_LEN

#: Longest chunk the format allows (the header field is u32); the store's trait is stricter.
MAX_CHUNK_SIZE = 1 << 30


def object_key(file_id: str) -> str:
    """Where a file's object lives inside a storage location (the same on every location).

    Two hex digits of fan-out keep directories small on a local file system and spread
    prefixes on an object store.
    """
    hexid = uuid_mod.UUID(file_id).hex
    return f"{hexid[:2]}/{hexid}.lvc"


def file_id_from_key(key: str) -> str | None:
    """The file id an object key belongs to, or None if ``key`` is not a chunk-store object."""
    head, _, name = key.rpartition("/")
    if not name.endswith(".lvc"):
        return None
    try:
        u = uuid_mod.UUID(name[:-4])
    except ValueError:
        return None
    if u.hex != name[:-4] or head != u.hex[:2]:
        return None
    return u.hex


@dataclass(frozen=True)
class Layout:
    """Where each chunk of one file lives and what its associated data is (format version 1)."""

    file_id: str  # 32 hex digits
    chunk_size: int
    size: int  # plaintext bytes

    def __post_init__(self):
        if not 0 < self.chunk_size <= MAX_CHUNK_SIZE:
            raise FormatError(f"chunk size {self.chunk_size} is out of range")
        if self.size < 0:
            raise FormatError(f"negative file size {self.size}")

    @property
    def version(self) -> int:
        return VERSION

    @property
    def header(self) -> bytes:
        return _HEADER.pack(
            MAGIC, VERSION, HEADER_LEN, ALGORITHM_AES256GCM, 0,
            uuid_mod.UUID(self.file_id).bytes, self.chunk_size, b"\0" * 28,
        )

    @property
    def chunk_count(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    @property
    def record_size(self) -> int:
        """Size of a full record (every record but possibly the last)."""
        return self.chunk_size + OVERHEAD

    def plain_len(self, index: int) -> int:
        if index < self.chunk_count - 1:
            return self.chunk_size
        return self.size - (self.chunk_count - 1) * self.chunk_size

    def record_offset(self, index: int) -> int:
        return HEADER_LEN + index * self.record_size

    def record_len(self, index: int) -> int:
        return self.plain_len(index) + OVERHEAD

    @property
    def object_size(self) -> int:
        last = self.chunk_count - 1
        return self.record_offset(last) + self.record_len(last)

    def aad_prefix(self) -> bytes:
        return self.header

    def aad(self, index: int) -> bytes:
        return self.header + _INDEX.pack(index, index == self.chunk_count - 1)


class AadBuilder:
    """Associated data for every chunk of one file, built without re-packing the header."""

    __slots__ = ("_prefix", "_last")

    def __init__(self, layout: Layout):
        self._prefix = layout.header
        self._last = layout.chunk_count - 1

    def __call__(self, index: int) -> bytes:
        return self._prefix + _INDEX.pack(index, index == self._last)


def parse_header(data: bytes) -> tuple[str, int]:
    """Check a header and return (file id, chunk size); :class:`FormatError` says what is wrong."""
    if len(data) < HEADER_LEN:
        raise FormatError(f"header is {len(data)} bytes, expected {HEADER_LEN}")
    magic, version, header_len, algorithm, _flags, fid, chunk_size, _ = _HEADER.unpack(
        data[:HEADER_LEN]
    )
    if magic != MAGIC:
        raise FormatError("not a labvault chunk object (bad magic)")
    if version != VERSION:
        raise FormatError(f"chunk format version {version} is not supported (this labvault reads {VERSION})")
    if header_len != HEADER_LEN or algorithm != ALGORITHM_AES256GCM:
        raise FormatError(f"unsupported header (length {header_len}, algorithm {algorithm})")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise FormatError(f"chunk size {chunk_size} in the header is out of range")
    return uuid_mod.UUID(bytes=fid).hex, chunk_size


def size_from_object_size(object_size: int, chunk_size: int) -> int | None:
    """The plaintext size an object of ``object_size`` bytes holds, or None if no whole number
    of records fits (the object was cut inside a record or the header)."""
    body = object_size - HEADER_LEN
    if body < OVERHEAD:
        return None
    full, rest = divmod(body, chunk_size + OVERHEAD)
    if rest == 0:
        return full * chunk_size
    if rest < OVERHEAD:
        return None
    return full * chunk_size + rest - OVERHEAD


def new_nonce() -> bytes:
    return os.urandom(NONCE_LEN)
