"""Resumable ingest of local files and directories (``labvault ingest EXID PATH...``).

Every source is checked before the first byte is stored (it exists, is a regular file or a
directory, can be opened), then the files are stored one by one with a progress bar over all
bytes. A file that is already stored at its destination with the same SHA-256 is skipped, so
re-running an interrupted ingest finishes the job; the first error stops the run with one line
(whatever was stored before it stays stored).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from .. import operations as ops
from .store import ChunkStore, IngestResult, normalise_path


@dataclass(frozen=True)
class IngestItem:
    source: Path
    dest: str  # path inside the experiment
    size: int


def plan(paths: Sequence[str | os.PathLike], dest_prefix: str = "") -> list[IngestItem]:
    """What ``labvault ingest`` will store: a file argument goes to ``PREFIX/<its name>``, a
    directory argument to ``PREFIX/<directory name>/<relative path>`` for every file below it."""
    prefix = PurePosixPath(normalise_path(dest_prefix.strip("/"))) if dest_prefix.strip("/ ") else None
    items: list[IngestItem] = []
    for arg in paths:
        src = Path(arg)
        try:
            st = src.stat()
        except OSError as e:
            raise ops.OperationError(f"cannot read {src}: {e.strerror or e}") from None
        if src.is_dir():
            base = PurePosixPath(src.resolve().name)
            found = []
            for dirpath, dirnames, filenames in os.walk(src, onerror=_raise):
                dirnames.sort()
                for fn in sorted(filenames):
                    f = Path(dirpath, fn)
                    if f.is_file():
                        found.append(f)
            for f in found:
                rel = PurePosixPath(f.relative_to(src).as_posix())
                items.append(_item(f, (prefix / base if prefix else base) / rel))
        elif src.is_file():
            items.append(_item(src, (prefix / src.name) if prefix else PurePosixPath(src.name), st.st_size))
        else:
            raise ops.OperationError(f"cannot read {src}: not a regular file or directory")
    dests = [i.dest for i in items]
    if len(set(dests)) != len(dests):
        dup = sorted({d for d in dests if dests.count(d) > 1})[0]
        raise ops.OperationError(f"two sources would be stored as {dup}")
    return items


def _raise(err: OSError) -> None:
    raise ops.OperationError(f"cannot read {err.filename}: {err.strerror or err}")


def _item(src: Path, dest: PurePosixPath, size: int | None = None) -> IngestItem:
    try:
        if not os.access(src, os.R_OK):
            raise PermissionError(13, "Permission denied")
        size = src.stat().st_size if size is None else size
    except OSError as e:
        raise ops.OperationError(f"cannot read {src}: {e.strerror or e}") from None
    return IngestItem(src, normalise_path(dest.as_posix()), size)


def ingest_paths(
    store: ChunkStore,
    actor: ops.Actor,
    exid: str,
    paths: Sequence[str | os.PathLike],
    *,
    dest_prefix: str = "",
    progress: bool = True,
    report: Callable[[str], None] | None = None,
) -> list[IngestResult]:
    """Store ``paths`` in experiment ``exid``; return one result per file (``skipped`` for
    files already stored with the same content)."""
    with store._require_sessions()() as s:
        ops.get_experiment(s, exid)  # unknown experiment: fail before walking anything
    items = plan(paths, dest_prefix)
    total = sum(i.size for i in items)
    results = []
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              disable=None if progress else True, desc=exid, leave=False) as bar:
        for item in items:
            bar.set_postfix_str(item.dest[-40:], refresh=False)
            result = store.ingest_file(actor, exid, item.source, item.dest, progress=bar.update)
            results.append(result)
            verb = "already stored" if result.skipped else "stored"
            line = f"{verb}: {exid}/{result.file.path} ({_size(result.file.size)}, sha256 {result.file.checksum[:12]}…)"
            if report is not None:
                report(line)
            else:  # above the progress bar, not through it
                bar.write(line, file=sys.stdout)
    return results


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover
