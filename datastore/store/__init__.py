"""The encrypted, replicated chunk store (DESIGN.md, "Data at rest and in flight").

Files are stored as AES-256-GCM encrypted chunks (:mod:`.format`) under per-file data keys
wrapped by master keys (:mod:`.keys`), on every configured storage location
(:mod:`.backends`), and read back slice by slice through a seekable file object that h5py
opens (:mod:`.reader`). :class:`ChunkStore` (:mod:`.store`) ties them to the metadata database:
atomic ingest, reads, crypto-shredding deletes, scrub and key rotation. docs/storage.md
describes the format and the guarantees.

Names are imported lazily: a kernel that only reads (``from labvault.datastore.store.reader
import EncryptedFile``) does not load the database layer.
"""

from __future__ import annotations

import importlib

from .errors import (
    FileDeleted,
    FormatError,
    IntegrityError,
    KeyUnavailable,
    ReplicaWriteError,
    StoreError,
)

_LAZY = {
    "ChunkStore": "store", "IngestResult": "store", "RotateReport": "store",
    "ScrubReport": "store", "StoredFileInfo": "store",
    "EncryptedFile": "reader", "Fault": "reader", "ReadLease": "reader",
    "FileKeyProvider": "keys", "KeyProvider": "keys",
    "Layout": "format",
    "LocalDirectoryBackend": "backends", "ObjectInfo": "backends", "PendingPut": "backends",
    "RangeReader": "backends", "StorageBackend": "backends",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = [
    "ChunkStore", "EncryptedFile", "Fault", "FileDeleted", "FileKeyProvider", "FormatError",
    "IngestResult", "IntegrityError", "KeyProvider", "KeyUnavailable", "Layout",
    "LocalDirectoryBackend", "ObjectInfo", "PendingPut", "RangeReader", "ReadLease",
    "ReplicaWriteError", "RotateReport", "ScrubReport", "StorageBackend", "StoreError",
    "StoredFileInfo",
]
