"""Chunk boundaries for an HDF5 file that follow its dataset chunks (the format's chunk map).

h5py reads a chunked dataset one dataset chunk (typically one detector frame) at a time. When
such a read covers whole encryption chunks, the reader decrypts them straight into h5py's
buffer; when it covers part of one, the whole chunk is decrypted elsewhere and copied, and on
random access the bytes around the frame are decrypted for nothing. A fixed grid cannot follow
the frames: HDF5 puts index nodes between them as a file grows. So ingest cuts the file where
large dataset chunks start and end, and every ``chunk_size`` in between.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def chunk_starts(size: int, chunk_size: int, boundaries) -> list[int]:
    """Start offsets of chunks 1 .. n-1: cut at every boundary and at most ``chunk_size`` apart."""
    cuts = sorted({b for b in boundaries if 0 < b < size})
    starts: list[int] = []
    pos, i = 0, 0
    while True:
        nxt = pos + chunk_size
        while i < len(cuts) and cuts[i] <= pos:
            i += 1
        if i < len(cuts) and cuts[i] < nxt:
            nxt = cuts[i]
        if nxt >= size:
            return starts
        starts.append(nxt)
        pos = nxt


def hdf5_chunk_starts(path: str | os.PathLike, size: int, chunk_size: int) -> list[int] | None:
    """A chunk map for the HDF5 file at ``path`` whose boundaries include the start and end of
    every dataset chunk of at least ``chunk_size / 4`` bytes; None for anything else (not
    HDF5, no such dataset chunks, unreadable) -- the fixed grid is used then."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != HDF5_SIGNATURE:
                return None
        import h5py  # only for HDF5 sources
    except (OSError, ImportError):
        return None
    smallest = max(1, chunk_size // 4)  # smaller dataset chunks: not worth a cut of their own
    boundaries: list[int] = []

    def add(info) -> None:
        if info.byte_offset is not None and info.size >= smallest:
            boundaries.append(info.byte_offset)
            boundaries.append(info.byte_offset + info.size)

    def visit(_name, obj):
        if not isinstance(obj, h5py.Dataset) or obj.chunks is None:
            return
        try:
            if hasattr(obj.id, "chunk_iter"):
                obj.id.chunk_iter(add)
            else:  # pragma: no cover - HDF5 < 1.12.3
                for i in range(obj.id.get_num_chunks()):
                    add(obj.id.get_chunk_info(i))
        except Exception as e:  # an odd dataset must not stop the ingest
            log.debug("no chunk layout for %s: %s", obj.name, e)

    try:
        with h5py.File(path, "r") as f:
            f.visititems(visit)
    except Exception as e:
        log.debug("%s: no chunk map (%s)", path, e)
        return None
    if not boundaries:
        return None
    return chunk_starts(size, chunk_size, boundaries)
