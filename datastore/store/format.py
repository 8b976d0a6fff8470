"""The on-storage format of one file: a versioned header followed by encrypted chunk records.

Version 1 (all integers big-endian)::

    header (64 bytes)
        magic        8s   b"LVCHUNKS"
        version      u16  1
        header_len   u16  64
        algorithm    u16  1 = AES-256-GCM, 96-bit random nonce, 128-bit tag
        flags        u16  bit 0: the chunk boundaries are a chunk map (below), else a fixed grid
        file_id      16s  the file's UUID (``files.uuid``)
        chunk_size   u32  the most plaintext bytes a chunk holds
        reserved     28s  zeros
    record i, for chunk i = 0 .. n - 1, at header_len + start(i) + 28 * i
        nonce        12s  random, fresh for every chunk
        ciphertext   n    the chunk's plaintext length
        tag          16s  GCM tag

Chunk boundaries. On the fixed grid chunk i starts at ``i * chunk_size``. With a chunk map
(``files.chunk_map``: the start offsets of chunks 1 .. n-1, see :func:`encode_chunk_map`) chunks
may be shorter than ``chunk_size``: ingest cuts an HDF5 file where its dataset chunks (detector
frames) start and end (:mod:`labvault.datastore.store.align`), so that reading a frame covers
whole chunks, which are decrypted straight into h5py's buffer -- no bytes decrypted for nothing,
no copy. The map needs no protection of its own: a record only authenticates at its own index
and position, so a wrong map makes reads fail, never return wrong bytes.

Each chunk's associated data is ``header || u64 index || u8 last``. So a record moved to another
position (index), to another file (file id in the header; and every file has its own key), a
truncated object (the new final record was not encrypted as the last one) or an edited header
all fail authentication. A file always has at least one chunk: an empty file is one empty,
last chunk, so "empty" cannot be confused with "truncated to nothing".

The database row holds size, chunk size, chunk count and the map; a short or long object shows
up as records that do not authenticate, and scrub also compares the object's size with the
layout's. A new version gets a new ``version`` number and its own layout class; readers
dispatch on the version the database row records.
"""

from __future__ import annotations

import os
import struct
import sys
import uuid as uuid_mod
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate, pairwise

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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
FLAG_CHUNK_MAP = 1


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


class Layout:
    """Where each chunk of one file lives and what its associated data is (format version 1).

    ``starts`` are the plaintext offsets of chunks 1 .. n-1 (a chunk map), or None for the
    fixed grid of ``chunk_size``.
    """

    __slots__ = ("file_id", "chunk_size", "size", "starts", "_count", "_header")

    def __init__(self, file_id: str, chunk_size: int, size: int, starts: Sequence[int] | None = None):
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise FormatError(f"chunk size {chunk_size} is out of range")
        if size < 0:
            raise FormatError(f"negative file size {size}")
        self.file_id, self.chunk_size, self.size = file_id, chunk_size, size
        if starts is not None:
            starts = array("Q", starts)
            _check_starts(starts, chunk_size, size)
            self._count = len(starts) + 1
        else:
            self._count = max(1, -(-size // chunk_size))
        self.starts = starts
        self._header = make_header(file_id, chunk_size, starts is not None)

    def __repr__(self) -> str:
        kind = f"{self._count - 1}-entry map" if self.starts is not None else "grid"
        return f"<Layout {self.file_id} {self.size} bytes, {self._count} chunks of <= {self.chunk_size} ({kind})>"

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and (self.file_id, self.chunk_size, self.size, self.starts) == (
            other.file_id, other.chunk_size, other.size, other.starts)

    __hash__ = None

    @property
    def version(self) -> int:
        return VERSION

    @property
    def header(self) -> bytes:
        return self._header

    @property
    def chunk_count(self) -> int:
        return self._count

    @property
    def record_size(self) -> int:
        """Size of a full record (the largest any record is)."""
        return self.chunk_size + OVERHEAD

    def chunk_start(self, index: int) -> int:
        """Plaintext offset of chunk ``index``."""
        if index == 0:
            return 0
        if self.starts is None:
            return index * self.chunk_size
        return self.starts[index - 1]

    def locate(self, pos: int) -> tuple[int, int, int]:
        """(chunk index, offset inside it, the chunk's plaintext length) of offset ``pos`` < size."""
        if self.starts is None:
            index, off = divmod(pos, self.chunk_size)
        else:
            index = bisect_right(self.starts, pos)
            off = pos - (self.starts[index - 1] if index else 0)
        return index, off, self.plain_len(index)

    def plain_len(self, index: int) -> int:
        end = self.size if index == self._count - 1 else self.chunk_start(index + 1)
        return end - self.chunk_start(index)

    def record_offset(self, index: int) -> int:
        return HEADER_LEN + self.chunk_start(index) + OVERHEAD * index

    def record_len(self, index: int) -> int:
        return self.plain_len(index) + OVERHEAD

    @property
    def object_size(self) -> int:
        return HEADER_LEN + self.size + OVERHEAD * self._count

    def aad(self, index: int) -> bytes:
        return chunk_aad(self._header, index, index == self._count - 1)


def _check_starts(starts, chunk_size: int, size: int) -> None:
    prev = 0
    for s in starts:
        if not prev < s < size or s - prev > chunk_size:
            raise FormatError(f"chunk map is inconsistent at offset {s} (previous {prev}, size {size})")
        prev = s
    if size - prev > chunk_size:
        raise FormatError(f"chunk map leaves a last chunk of {size - prev} bytes (most {chunk_size})")


def encode_chunk_map(starts: Sequence[int]) -> bytes:
    """The database form of a chunk map: zlib of the u64 little-endian gaps between starts
    (detector files repeat the same few gaps, so a map of a million chunks is a few KiB)."""
    gaps = array("Q", (b - a for a, b in pairwise([0, *starts])))
    if sys.byteorder != "little":
        gaps.byteswap()
    return zlib.compress(gaps.tobytes(), 6)


def decode_chunk_map(blob: bytes) -> array:
    gaps = array("Q")
    try:
        gaps.frombytes(zlib.decompress(blob))
    except (zlib.error, ValueError):
        raise FormatError("the chunk map in the database is damaged") from None
    if sys.byteorder != "little":
        gaps.byteswap()
    return array("Q", accumulate(gaps))


def make_header(file_id: str, chunk_size: int, chunk_map: bool = False) -> bytes:
    """The version-1 header of file ``file_id`` (32 hex digits)."""
    return _HEADER.pack(
        MAGIC, VERSION, HEADER_LEN, ALGORITHM_AES256GCM, FLAG_CHUNK_MAP if chunk_map else 0,
        uuid_mod.UUID(file_id).bytes, chunk_size, b"\0" * 28,
    )


def chunk_aad(header: bytes, index: int, last: bool) -> bytes:
    """Associated data of chunk ``index``: the header, the index and the last-chunk flag."""
    return header + _INDEX.pack(index, last)


def parse_header(data: bytes) -> tuple[str, int, bool]:
    """Check a header; return (file id, chunk size, has a chunk map). :class:`FormatError` says
    what is wrong."""
    if len(data) < HEADER_LEN:
        raise FormatError(f"header is {len(data)} bytes, expected {HEADER_LEN}")
    magic, version, header_len, algorithm, flags, fid, chunk_size, _ = _HEADER.unpack(data[:HEADER_LEN])
    if magic != MAGIC:
        raise FormatError("not a labvault chunk object (bad magic)")
    if version != VERSION:
        raise FormatError(f"chunk format version {version} is not supported (this labvault reads {VERSION})")
    if header_len != HEADER_LEN or algorithm != ALGORITHM_AES256GCM or flags & ~FLAG_CHUNK_MAP:
        raise FormatError(f"unsupported header (length {header_len}, algorithm {algorithm}, flags {flags})")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise FormatError(f"chunk size {chunk_size} in the header is out of range")
    return uuid_mod.UUID(bytes=fid).hex, chunk_size, bool(flags & FLAG_CHUNK_MAP)


def size_from_object_size(object_size: int, chunk_size: int) -> int | None:
    """The plaintext size an object of ``object_size`` bytes on the fixed grid holds, or None if
    no whole number of records fits (the object was cut inside a record or the header)."""
    body = object_size - HEADER_LEN
    if body < OVERHEAD:
        return None
    full, rest = divmod(body, chunk_size + OVERHEAD)
    if rest == 0:
        return full * chunk_size
    if rest < OVERHEAD or (rest == OVERHEAD and full):
        return None
    return full * chunk_size + rest - OVERHEAD


def new_nonce() -> bytes:
    return os.urandom(NONCE_LEN)


# --------------------------------------------------------------------------------------
# AES-256-GCM on records
# --------------------------------------------------------------------------------------
#: Newer cryptography releases (e.g. 50) en/decrypt into a caller's buffer; older ones return
#: new bytes, which costs one more copy per chunk.
HAVE_DECRYPT_INTO = hasattr(AESGCM, "decrypt_into")
HAVE_ENCRYPT_INTO = hasattr(AESGCM, "encrypt_into")


class ChunkCipher:
    """Encrypts and authenticates the records of one file with its data key.

    ``chunk_count`` is needed to decrypt (it says which chunk is the last); a writer that does
    not know the count yet passes ``last`` explicitly. The key lives only inside the AESGCM
    object: never exposed, never logged.
    """

    __slots__ = ("_aead", "_header", "_last")

    def __init__(self, data_key: bytes, header: bytes, chunk_count: int | None = None):
        self._aead = AESGCM(data_key)
        self._header = header
        self._last = None if chunk_count is None else chunk_count - 1

    @classmethod
    def for_layout(cls, data_key: bytes, layout: Layout) -> ChunkCipher:
        return cls(data_key, layout.header, layout.chunk_count)

    def __repr__(self) -> str:
        return "<ChunkCipher>"

    @property
    def header(self) -> bytes:
        return self._header

    def aad(self, index: int, last: bool | None = None) -> bytes:
        if last is None:
            if self._last is None:
                raise ValueError("the chunk count is unknown: say which chunk is the last")
            last = index == self._last
        return self._header + _INDEX.pack(index, last)

    def encrypt_into(self, index: int, last: bool, plain, record: memoryview) -> int:
        """Write record ``index`` (nonce, ciphertext, tag) of ``plain`` into ``record``; return
        its length. ``record`` must hold ``len(plain) + OVERHEAD`` bytes."""
        n = len(plain)
        nonce = new_nonce()
        record[:NONCE_LEN] = nonce
        aad = self.aad(index, last)
        if HAVE_ENCRYPT_INTO:
            self._aead.encrypt_into(nonce, plain, aad, record[NONCE_LEN : NONCE_LEN + n + TAG_LEN])
        else:  # pragma: no cover - older cryptography
            record[NONCE_LEN : NONCE_LEN + n + TAG_LEN] = self._aead.encrypt(nonce, bytes(plain), aad)
        return n + OVERHEAD

    def decrypt_into(self, index: int, record: memoryview, out: memoryview) -> None:
        """Authenticate record ``index`` and write its plaintext to ``out`` (exactly the
        plaintext's length). Raises ``cryptography.exceptions.InvalidTag``; ``out`` is then
        zeroed, because OpenSSL writes the unauthenticated plaintext before checking the tag."""
        try:
            if HAVE_DECRYPT_INTO:
                self._aead.decrypt_into(record[:NONCE_LEN], record[NONCE_LEN:], self.aad(index), out)
            else:  # pragma: no cover - older cryptography
                out[:] = self._aead.decrypt(bytes(record[:NONCE_LEN]), bytes(record[NONCE_LEN:]), self.aad(index))
        except BaseException:
            out[:] = bytes(len(out))
            raise

    def decrypt(self, index: int, record) -> bytes:
        """The plaintext of record ``index`` as new bytes (small reads, tests)."""
        record = memoryview(record)
        return self._aead.decrypt(record[:NONCE_LEN], record[NONCE_LEN:], self.aad(index))
