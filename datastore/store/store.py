"""The encrypted, replicated chunk store: ingest, open, delete (crypto-shred), scrub, key rotation.

:class:`ChunkStore` ties the pieces together -- the format (:mod:`.format`), the master keys
(:mod:`.keys`), the storage locations (:mod:`.backends`) and the reader (:mod:`.reader`) -- with
the metadata database. Its operations follow :mod:`labvault.datastore.operations`: decide with
the policy, record the audit event, apply; a refusal is audited and raised as ``Denied``.

Durability. An ingest writes every target location's object as an upload that stays invisible
(temporary file / multipart upload), makes all of them durable, publishes all of them (atomic
rename + directory fsync), and only then commits the ``files`` row, its data key and the audit
event in one transaction. A crash at any moment leaves either nothing visible or the complete
file; what a crash leaves behind (temporary uploads, published objects without a row, whose
data key never reached the database) is unreadable garbage that :meth:`ChunkStore.scrub`
removes after ``orphan_grace_seconds``.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import uuid as uuid_mod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from traitlets import Bool, Dict, Instance, Integer, TraitError, Type, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from labvault import policies as p
from labvault.policies import Decision

from .. import operations as ops
from ..access import experiment_value, load_subject, personal_shared_with
from ..models import DataKey, Experiment, ReplicaFault, StoredFile, User, utcnow
from .align import hdf5_chunk_starts
from .backends import LocalDirectoryBackend, PendingPut, StorageBackend, make_backend
from .errors import FileDeleted, IntegrityError, KeyUnavailable, ReplicaWriteError, StoreError
from .format import (
    OVERHEAD,
    VERSION,
    ChunkCipher,
    Layout,
    decode_chunk_map,
    encode_chunk_map,
    file_id_from_key,
    make_header,
    object_key,
)
from .keys import FileKeyProvider, KeyProvider, new_data_key, wrap_context
from .reader import EncryptedFile, Fault, ReadLease

KiB = 1024
MiB = 1024 * KiB

#: Chosen by benchmarks/bench_store.py (see benchmarks/README.md, "Chunk store").
DEFAULT_CHUNK_SIZE = 512 * KiB

_BAD_PATH_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


def normalise_path(path: str) -> str:
    """A file's path inside its experiment: relative, ``/``-separated, no ``.``/``..``/empty parts."""
    p_ = path.strip()
    while p_.startswith("./"):
        p_ = p_[2:]
    parts = p_.split("/")
    if not p_ or p_.startswith("/") or any(x in ("", ".", "..") for x in parts):
        raise ops.OperationError(f"bad file path {path!r}: a relative path like run1/frames.h5")
    if _BAD_PATH_CHARS.search(p_):
        raise ops.OperationError(f"bad file path {path!r}: control characters or backslashes")
    if len(p_) > 1024:
        raise ops.OperationError("file path longer than 1024 characters")
    return p_


@dataclass(frozen=True)
class StoredFileInfo:
    """What the store knows about one file (also of a deleted one: its stub)."""

    id: int
    uuid: str | None
    exid: str
    path: str
    size: int
    checksum: str | None
    chunk_size: int | None
    chunk_count: int | None
    locations: tuple[str, ...]
    created_at: datetime
    deleted_at: datetime | None = None
    deleted_reason: str | None = None
    purged_at: datetime | None = None

    @property
    def name(self) -> str:
        return f"{self.exid}/{self.path}"


@dataclass(frozen=True)
class Home:
    """Where a file lives: an experiment (``exid``) or a user's personal repository (``owner``)."""

    exid: str | None = None
    owner: str | None = None

    def __post_init__(self):
        if (self.exid is None) == (self.owner is None):
            raise ValueError("a file lives in exactly one experiment or personal repository")

    @property
    def label(self) -> str:
        """How files' names start: ``NLS-2026-0001`` or ``~alice`` (a personal repository)."""
        return self.exid if self.exid is not None else f"~{self.owner}"

    def target(self, path: str) -> str:
        """The audit target of a file here."""
        return f"file:{self.exid}/{path}" if self.exid is not None else f"personal:{self.owner}/{path}"


@dataclass(frozen=True)
class IngestResult:
    file: StoredFileInfo
    skipped: bool = False  # already stored with the same checksum


@dataclass
class ScrubReport:
    """Counts of one scrub run (also written to its audit event)."""

    files: int = 0
    chunks_verified: int = 0
    replicas_ok: int = 0
    replicas_repaired: int = 0  # existed but had bad chunks / header / size
    replicas_restored: int = 0  # were missing
    mirror_copies_removed: int = 0  # mirrors of experiments whose PI withdrew the agreement
    bad_chunks: int = 0
    unrecoverable: list[str] = field(default_factory=list)
    deleted_purged: int = 0
    orphans_removed: int = 0
    incomplete_removed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unrecoverable and not self.errors

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if not isinstance(v, list)}
        d["unrecoverable"] = self.unrecoverable[:50]
        d["errors"] = self.errors[:50]
        return d


@dataclass
class RotateReport:
    new_key_id: str
    rewrapped: int = 0
    retired: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class _Replicas:
    """The pending uploads of one file to every target location, moved forward together."""

    def __init__(self, store: ChunkStore, names: list[str], key: str, display: str):
        self.key, self.display = key, display
        self.pending: list[tuple[str, PendingPut]] = []
        self.published: list[str] = []
        self.store = store
        try:
            for name in names:
                self.pending.append((name, self._call(name, store.backend(name).begin_put, key)))
        except BaseException:
            self.abort()
            raise

    def _call(self, name: str, fn, *args):
        try:
            return fn(*args)
        except StoreError:
            raise
        except OSError as e:
            raise ReplicaWriteError(
                f"storing {self.display} on location {name} failed: {e.strerror or e}; nothing was stored"
            ) from None

    def write(self, data) -> None:
        for name, pending in self.pending:
            self._call(name, pending.write, data)

    def publish(self) -> None:
        """Durable everywhere first, then visible everywhere."""
        for name, pending in self.pending:
            self._call(name, pending.prepare)
        for name, pending in self.pending:
            self._call(name, pending.commit)
            self.published.append(name)

    def abort(self) -> None:
        for _name, pending in self.pending:
            try:
                pending.abort()
            except Exception as e:  # keep cleaning the others
                self.store.log.warning("could not remove an upload of %s: %s", self.display, e)
        self.unpublish()

    def unpublish(self) -> None:
        for name in self.published:
            try:
                self.store.backend(name).delete(self.key)
            except Exception as e:
                self.store.log.warning(
                    "could not remove %s from %s after a failed ingest (scrub removes it): %s",
                    self.display, name, e,
                )
        self.published = []


def _read_full(f: BinaryIO, buf: memoryview) -> int:
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            break
        got += n
    return got


def _file_chunks(f: BinaryIO, layout: Layout) -> Iterator[tuple[memoryview, bool]]:
    """(plaintext, is last) for each chunk of ``layout``, read into one reused buffer; a file
    that ends early or goes on is refused (it changed while it was read)."""
    buf = memoryview(bytearray(layout.chunk_size))
    last = layout.chunk_count - 1
    for index in range(layout.chunk_count):
        want = layout.plain_len(index)
        if _read_full(f, buf[:want]) != want:
            raise _Changed()
        yield buf[:want], index == last
    if f.read(1):
        raise _Changed()


class _Changed(Exception):
    pass


def _block_chunks(blocks: Iterable, chunk_size: int) -> Iterator[tuple[memoryview, bool]]:
    """Re-cut blocks of any size (an HTTP body) into chunks, one chunk of look-ahead."""
    pending = bytearray()
    ready: bytes | None = None
    for block in blocks:
        pending += block
        while len(pending) >= chunk_size:
            if ready is not None:
                yield memoryview(ready), False
            ready = bytes(pending[:chunk_size])
            del pending[:chunk_size]
    if ready is not None:
        if pending:
            yield memoryview(ready), False
        else:
            yield memoryview(ready), True
            return
    yield memoryview(bytes(pending)), True


class ChunkStore(LoggingConfigurable):
    """Encrypted, replicated storage of experiment files, with the metadata database.

    Every file goes to every location of :attr:`locations`, and to :attr:`mirror_locations`
    too when the experiment's PI agreed to mirrors. Configure it in ``labvault_config.py``::

        c.ChunkStore.locations = {"replica-1": "/srv/a/labvault", "replica-2": "/srv/b/labvault"}
        c.ChunkStore.mirror_locations = {"offsite": "/mnt/offsite/labvault"}
    """

    locations = Dict(
        value_trait=Unicode(),
        default_value={"replica-1": "store/replica-1", "replica-2": "store/replica-2"},
        help="""Storage locations every file is written to: {name: directory}.

        The name is recorded with each file (keep it when a directory moves); relative
        directories are inside the data directory. Put them on different disks or machines:
        a file is stored once per location. Reads try them in this order.""",
    ).tag(config=True)

    mirror_locations = Dict(
        value_trait=Unicode(),
        default_value={},
        help="""Extra mirror/backup locations, used only for experiments whose PI agreed
        (``mirror_agreed``; policy rule mirror.pi_agreed). {name: directory}.""",
    ).tag(config=True)

    chunk_size = Integer(
        DEFAULT_CHUNK_SIZE,
        help="""Plaintext bytes per encrypted chunk of newly stored files.

        Each chunk is authenticated on its own, so a read decrypts only the chunks it touches.
        Smaller chunks waste less on random reads of small slices, larger ones cost fewer
        calls on whole-file reads; the default was chosen by benchmarks/bench_store.py.
        Existing files keep the chunk size they were stored with.""",
    ).tag(config=True)

    @validate("chunk_size")
    def _check_chunk_size(self, proposal):
        v = proposal["value"]
        if not 64 <= v <= 64 * MiB:
            raise TraitError(f"ChunkStore.chunk_size must be between 64 bytes and 64 MiB, not {v}")
        return v

    cache_chunks = Integer(
        2,
        help="""Decrypted chunks each open file keeps (an LRU). Two cover a sequential read
        whose requests straddle chunk boundaries; memory per open file is about
        (cache_chunks + 1) * chunk_size.""",
    ).tag(config=True)

    key_provider_class = Type(
        FileKeyProvider,
        klass=KeyProvider,
        help="""Where master keys live: FileKeyProvider (key files in the data directory) or a
        KMS-backed KeyProvider subclass (see docs/storage.md).""",
    ).tag(config=True)

    orphan_grace_seconds = Integer(
        24 * 3600,
        help="""Age after which scrub removes uploads that were never finished and stored
        objects no file row refers to (left by a crash). Longer than any ingest takes.""",
    ).tag(config=True)

    verify_checksum_on_scrub = Bool(
        True,
        help="Scrub also recomputes each file's SHA-256 and compares it with the database.",
    ).tag(config=True)

    data_dir = Unicode(
        "var",
        help="Data directory; relative storage locations and the default key directory are in it.",
    )

    key_provider = Instance(KeyProvider)

    @default("key_provider")
    def _default_key_provider(self):
        provider = self.key_provider_class(parent=self)
        if isinstance(provider, FileKeyProvider) and not provider.key_dir:
            provider.key_dir = os.path.join(self.data_dir, "keys")
        return provider

    def __init__(self, sessions: sessionmaker[Session] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.sessions = sessions
        self._backends: dict[str, StorageBackend] | None = None

    # ----------------------------------------------------------------------------------
    # locations
    # ----------------------------------------------------------------------------------
    @property
    def backends(self) -> dict[str, StorageBackend]:
        """Every configured location by name: the replicas first, then the mirrors."""
        if self._backends is None:
            clash = set(self.locations) & set(self.mirror_locations)
            if clash:
                raise StoreError(f"location names used twice: {', '.join(sorted(clash))}")
            if not self.locations:
                raise StoreError("no storage locations configured (ChunkStore.locations)")
            self._backends = {
                name: make_backend(name, spec, self.data_dir)
                for name, spec in {**self.locations, **self.mirror_locations}.items()
            }
        return self._backends

    def backend(self, name: str) -> StorageBackend:
        try:
            return self.backends[name]
        except KeyError:
            raise StoreError(f"storage location {name!r} is not configured") from None

    def set_backend(self, name: str, backend: StorageBackend) -> None:
        """Replace a location's backend (a custom backend class, or a fault-injecting wrapper)."""
        self.backends[name] = backend

    def prepare_locations(self) -> list[str]:
        """Create the local storage directories and the first master key (``labvault init``)."""
        made = []
        for backend in self.backends.values():
            if isinstance(backend, LocalDirectoryBackend):
                backend.ensure()
                made.append(str(backend.root.resolve()))
        self.key_provider.ensure_key()
        return made

    def _targets(self, session: Session, e: Experiment, now: datetime) -> tuple[list[str], Decision | None]:
        """Where a file of ``e`` belongs: every location, and the mirrors if its PI agreed."""
        names = list(self.locations)
        if not self.mirror_locations:
            return names, None
        mirror = p.decide(p.SYSTEM, "mirror", experiment_value(session, e), now)
        if mirror.allowed:
            names += list(self.mirror_locations)
        return names, mirror

    def _read_order(self, locations: Iterable[str]) -> list[StorageBackend]:
        held = set(locations)
        unknown = held - set(self.backends)
        if unknown:
            self.log.warning("file stored on unconfigured locations %s", ", ".join(sorted(unknown)))
        return [b for name, b in self.backends.items() if name in held]

    # ----------------------------------------------------------------------------------
    # helpers on rows
    # ----------------------------------------------------------------------------------
    def _require_sessions(self) -> sessionmaker[Session]:
        if self.sessions is None:
            raise StoreError("this ChunkStore has no database sessions")
        return self.sessions

    def _info(self, row: StoredFile, exid: str) -> StoredFileInfo:
        return StoredFileInfo(
            id=row.id, uuid=row.uuid, exid=exid, path=row.path, size=row.size,
            checksum=row.checksum, chunk_size=row.chunk_size, chunk_count=row.chunk_count,
            locations=tuple(row.locations or ()), created_at=row.created_at,
            deleted_at=row.deleted_at, deleted_reason=row.deleted_reason, purged_at=row.purged_at,
        )

    @staticmethod
    def _live_file(session: Session, e: Experiment, path: str) -> StoredFile | None:
        return session.scalar(
            select(StoredFile).where(
                StoredFile.experiment_id == e.id, StoredFile.path == path,
                StoredFile.deleted_at.is_(None),
            )
        )

    def _get_file(self, session: Session, exid: str, path: str) -> tuple[Experiment, StoredFile]:
        """The live file at ``path``, else the newest deleted stub, else NotFound."""
        e = ops.get_experiment(session, exid)
        path = normalise_path(path)
        row = self._live_file(session, e, path) or session.scalars(
            select(StoredFile)
            .where(StoredFile.experiment_id == e.id, StoredFile.path == path)
            .order_by(StoredFile.deleted_at.desc(), StoredFile.id.desc())
        ).first()
        if row is None:
            raise ops.NotFound(f"no file {path!r} in experiment {exid}")
        return e, row

    def _data_key(self, session: Session, row: StoredFile, name: str) -> bytes:
        dk = session.get(DataKey, row.data_key_id) if row.data_key_id else None
        if dk is None or dk.wrapped_key is None:
            if row.deleted_at is not None:
                raise FileDeleted(name, row.deleted_at, row.deleted_reason)
            raise IntegrityError(f"{name}: its data key is missing from the database")
        return self.key_provider.unwrap(dk.master_key_id, dk.wrapped_key, wrap_context(row.uuid))

    def _record_fault(self, file_id: int, fault: Fault, detected_by: str,
                      now: datetime | None = None) -> None:
        self.log.warning(
            "replica fault: file %s on %s, chunk %s: %s %s",
            file_id, fault.location, fault.chunk, fault.kind, fault.detail,
        )
        if self.sessions is None:
            return
        try:
            with self.sessions.begin() as s:
                s.add(ReplicaFault(
                    file_id=file_id, location=fault.location, chunk_index=fault.chunk,
                    kind=fault.kind, detail=fault.detail[:500], detected_by=detected_by,
                    detected_at=now or utcnow(),
                ))
        except Exception as e:  # a read must not fail because the fault could not be recorded
            self.log.error("could not record a replica fault of file %s: %s", file_id, e)

    # ----------------------------------------------------------------------------------
    # ingest
    # ----------------------------------------------------------------------------------
    def _decide_upload(self, session: Session, actor: ops.Actor, e: Experiment, path: str,
                       now: datetime) -> Decision:
        if e.deleted_at is not None:
            return Decision(False, "retention.deleted", f"{e.exid} was permanently deleted")
        if actor.user_id is None:
            return ops.OPERATOR
        subject = load_subject(session, actor.user_id, now)
        return p.decide(subject, "upload", p.File(experiment_value(session, e), path), now)

    def _home_upload(self, s: Session, actor: ops.Actor, home: Home, path: str, now: datetime
                     ) -> tuple[dict, Decision, StoredFile | None, list[str], Decision | None]:
        """For an upload to ``home``: the row's home columns, the decision, the live file
        already at ``path``, the target locations and the mirror decision."""
        if home.exid is not None:
            e = ops.get_experiment(s, home.exid)
            targets, mirror = self._targets(s, e, now)
            return ({"experiment_id": e.id}, self._decide_upload(s, actor, e, path, now),
                    self._live_file(s, e, path), targets, mirror)
        owner = ops.get_user(s, home.owner)
        decision = self._decide_personal(s, actor, owner.id, path, "modify", now)
        # personal data is never mirrored: mirrors are an experiment PI's agreement
        return {"owner_id": owner.id}, decision, self._live_personal(s, owner.id, path), list(self.locations), None

    def _decide_personal(self, s: Session, actor: ops.Actor, owner_id: int, path: str, action: str,
                         now: datetime) -> Decision:
        if actor.user_id is None:
            return ops.OPERATOR
        item = p.PersonalItem(owner_id, path, personal_shared_with(s, owner_id, path))
        return p.decide(load_subject(s, actor.user_id, now), action, item, now)

    @staticmethod
    def _live_personal(session: Session, owner_id: int, path: str) -> StoredFile | None:
        return session.scalar(
            select(StoredFile).where(
                StoredFile.owner_id == owner_id, StoredFile.path == path, StoredFile.deleted_at.is_(None),
            )
        )

    def _check_upload(self, actor: ops.Actor, home: Home, path: str, now: datetime
                      ) -> tuple[list[str], Decision | None, StoredFileInfo | None]:
        """Decide before writing anything (a refusal is audited); return the target locations,
        the mirror decision and the live file already at ``path``, if any."""
        factory = self._require_sessions()
        with factory() as s:
            _, decision, existing, targets, mirror = self._home_upload(s, actor, home, path, now)
            info = self._info(existing, home.label) if existing else None
        if not decision.allowed:
            raise ops._refuse(factory, actor, "file.upload", home.target(path), decision, now)
        return targets, mirror, info

    def ingest_stream(self, actor: ops.Actor, exid: str | Home, path: str, blocks: Iterable, *,
                      now: datetime | None = None,
                      progress: Callable[[int], None] | None = None) -> IngestResult:
        """Store a file from an iterable of byte blocks of any size (an upload's body).

        The row is committed only once every target location holds the complete, durable
        object; on any error nothing is committed and the uploads are removed. A path that
        already holds a file is refused (delete it first). Streams use the fixed chunk grid.
        """
        now = now or utcnow()
        home = exid if isinstance(exid, Home) else Home(exid=exid)
        path = normalise_path(path)
        targets, mirror, existing = self._check_upload(actor, home, path, now)
        if existing is not None:
            raise ops.OperationError(f"{home.label}/{path} is already stored; delete it first to store a new version")
        return self._ingest(actor, home, path, _block_chunks(blocks, self.chunk_size), None,
                            targets, mirror, now, progress)

    def ingest_file(self, actor: ops.Actor, exid: str | Home, source: str | os.PathLike, path: str, *,
                    now: datetime | None = None, align: bool = True,
                    progress: Callable[[int], None] | None = None) -> IngestResult:
        """Store the local file ``source`` as ``path`` of experiment ``exid``.

        Resumable: if ``path`` already holds a file with the same size and SHA-256, nothing is
        written and the result says ``skipped``. The source must not change while it is read.
        HDF5 sources are cut along their dataset chunks (``align``; see :mod:`.align`).
        """
        now = now or utcnow()
        home = exid if isinstance(exid, Home) else Home(exid=exid)
        path = normalise_path(path)
        display = f"{home.label}/{path}"
        try:
            # stat first: opening a FIFO or a device could block or never end
            if not stat.S_ISREG(os.stat(source).st_mode):
                raise ops.OperationError(f"cannot read {source}: not a regular file")
            f = open(source, "rb", buffering=0)  # noqa: SIM115 - closed below
        except OSError as e:
            raise ops.OperationError(f"cannot read {source}: {e.strerror or e}") from None
        with f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ops.OperationError(f"cannot read {source}: not a regular file")
            targets, mirror, existing = self._check_upload(actor, home, path, now)
            if existing is not None:
                if existing.size == st.st_size and existing.checksum == _sha256_of(f, source):
                    if progress:
                        progress(st.st_size)
                    return IngestResult(existing, skipped=True)
                raise ops.OperationError(
                    f"{display} is already stored with different content; delete it first "
                    "(labvault file delete) to store a new version"
                )
            cs = self.chunk_size
            starts = hdf5_chunk_starts(source, st.st_size, cs) if align else None
            plan = Layout(uuid_mod.uuid4().hex, cs, st.st_size, starts)
            try:
                result = self._ingest(actor, home, path, _file_chunks(f, plan), starts, targets,
                                      mirror, now, progress,
                                      check_source=lambda size: _unchanged(f, st, size, source))
            except _Changed:
                raise ops.OperationError(f"{source} changed while it was read; nothing was stored, try again") from None
            except OSError as e:
                raise ops.OperationError(f"cannot read {source}: {e.strerror or e}") from None
        return result

    def _ingest(self, actor: ops.Actor, home: Home, path: str,
                chunks: Iterator[tuple[memoryview, bool]], starts: list[int] | None, targets: list[str],
                mirror: Decision | None, now: datetime,
                progress: Callable[[int], None] | None,
                check_source: Callable[[int], None] | None = None) -> IngestResult:
        display = f"{home.label}/{path}"
        file_id = uuid_mod.uuid4().hex
        data_key = new_data_key()
        cs = self.chunk_size
        cipher = ChunkCipher(data_key, make_header(file_id, cs, starts is not None))
        replicas = _Replicas(self, targets, object_key(file_id), display)
        hasher = hashlib.sha256()
        size = count = 0
        record = memoryview(bytearray(cs + OVERHEAD))
        # One thread: hashing beside encryption in a second thread was slower on the 2-core
        # benchmark machine (benchmarks/README.md), the write-back overlap is what pays.
        try:
            replicas.write(cipher.header)
            for plain, last in chunks:
                hasher.update(plain)
                n = cipher.encrypt_into(count, last, plain, record)
                replicas.write(record[:n])
                size += len(plain)
                count += 1
                if progress:
                    progress(len(plain))
            if check_source:
                check_source(size)
            replicas.publish()
        except BaseException:
            replicas.abort()
            raise
        checksum = hasher.hexdigest()
        layout = Layout(file_id, cs, size, starts)
        assert layout.chunk_count == count, (layout.chunk_count, count)
        try:
            info = self._commit_ingest(actor, home, path, file_id, data_key, layout, checksum,
                                       replicas.published, mirror, now)
        except BaseException:
            replicas.unpublish()
            raise
        self.log.info("stored %s (%d bytes, %d chunks) on %s", display, size, count,
                      ", ".join(replicas.published))
        return IngestResult(info)

    def _commit_ingest(self, actor: ops.Actor, home: Home, path: str, file_id: str,
                       data_key: bytes, layout: Layout, checksum: str, locations: list[str],
                       mirror: Decision | None, now: datetime) -> StoredFileInfo:
        target = home.target(path)
        factory = self._require_sessions()
        with factory.begin() as s:
            # decided again at commit: a long upload must not outlive the right to make it
            where, decision, _, _, _ = self._home_upload(s, actor, home, path, now)
            if decision.allowed:
                details = {
                    "uuid": file_id, "size": layout.size, "sha256": checksum,
                    "chunk_size": layout.chunk_size, "chunks": layout.chunk_count,
                    "chunk_map": layout.starts is not None,
                    "locations": locations,
                }
                if mirror is not None:
                    details["mirror"] = f"{mirror.rule}: {mirror.reason}"
                # The audit append locks the chain head: this transaction is serialised with
                # every other change, so the path check below cannot race, and a key rotation's
                # final pass sees this data key (see rotate_keys).
                ops._record(s, actor, "file.upload", target, decision, now, details)
                if s.scalar(select(StoredFile.id).filter_by(**where, path=path, deleted_at=None)) is not None:
                    raise ops.OperationError(f"{home.label}/{path} was stored by someone else meanwhile")
                master_key_id, wrapped = self.key_provider.wrap(data_key, wrap_context(file_id))
                dk = DataKey(wrapped_key=wrapped, master_key_id=master_key_id, created_at=now)
                s.add(dk)
                s.flush()
                row = StoredFile(
                    **where, path=path, size=layout.size, checksum=checksum,
                    chunk_size=layout.chunk_size, chunk_count=layout.chunk_count,
                    chunk_map=encode_chunk_map(layout.starts) if layout.starts is not None else None,
                    data_key_id=dk.id, locations=list(locations), created_by_id=actor.user_id,
                    created_at=now, uuid=file_id, format_version=VERSION,
                )
                s.add(row)
                s.flush()
                return self._info(row, home.label)
        raise ops._refuse(factory, actor, "file.upload", target, decision, now)

    # ----------------------------------------------------------------------------------
    # reading
    # ----------------------------------------------------------------------------------
    def open_file(self, actor: ops.Actor, exid: str, path: str, *,
                  now: datetime | None = None) -> EncryptedFile:
        """Open a file for ``actor`` after a policy decision (audited: one event per open)."""
        now = now or utcnow()
        factory = self._require_sessions()
        with factory() as s:
            e, row = self._get_file(s, exid, path)
            target = f"file:{exid}/{row.path}"
            subject = load_subject(s, actor.user_id, now) if actor.user_id is not None else ops.OPERATOR_SUBJECT
            decision = p.decide(subject, "read", p.File(experiment_value(s, e), row.path), now)
        deleted = None
        if row.deleted_at is not None:
            deleted = FileDeleted(f"{exid}/{row.path}", row.deleted_at, row.deleted_reason)
            if decision.allowed:  # those who may read it learn when and why it went
                decision = Decision(False, "retention.deleted", str(deleted))
        if not decision.allowed:
            denied = ops._refuse(factory, actor, "file.read", target, decision, now)
            raise deleted if deleted is not None and decision.rule == "retention.deleted" else denied
        with factory.begin() as s:
            ops._record(s, actor, "file.read", target, decision, now, {"uuid": row.uuid})
        return self.open(row.id)

    def open(self, file_id: int) -> EncryptedFile:
        """Open a stored file by row id, without a policy decision or audit event: for callers
        that decided already (the service) and for the store's own jobs."""
        factory = self._require_sessions()
        with factory() as s:
            row = s.get(StoredFile, file_id)
            if row is None:
                raise ops.NotFound(f"no stored file with id {file_id}")
            name = _row_name(s, row)
            if row.deleted_at is not None:
                raise FileDeleted(name, row.deleted_at, row.deleted_reason)
            data_key = self._data_key(s, row, name)
            layout = _layout(row)
            if layout.chunk_count != row.chunk_count:
                raise IntegrityError(f"{name}: the database row is inconsistent (chunk count)")
            replicas = self._read_order(row.locations or ())
        return EncryptedFile(
            replicas, data_key, layout, cache_chunks=self.cache_chunks, name=name,
            on_fault=lambda fault: self._record_fault(file_id, fault, "read"),
        )

    def lease(self, file_id: int) -> ReadLease:
        """What a reader without database access needs to open stored file ``file_id`` (the
        direct read path). No policy decision here: the caller decides and audits."""
        with self._require_sessions()() as s:
            row = s.get(StoredFile, file_id)
            if row is None or row.uuid is None:
                raise ops.NotFound(f"no stored file with id {file_id}")
            name = _row_name(s, row)
            if row.deleted_at is not None:
                raise FileDeleted(name, row.deleted_at, row.deleted_reason)
            return ReadLease(
                file_id=row.uuid, chunk_size=row.chunk_size, size=row.size, chunk_map=row.chunk_map,
                locations=tuple(n for n in self.backends if n in set(row.locations or ())),
                data_key=self._data_key(s, row, name), name=name,
            )

    def layout(self, file_id: int) -> Layout:
        """Where the chunks of stored file ``file_id`` are (from its database row)."""
        with self._require_sessions()() as s:
            row = s.get(StoredFile, file_id)
            if row is None or row.uuid is None:
                raise ops.NotFound(f"no stored file with id {file_id}")
            return _layout(row)

    def list_files(self, exid: str | Home, *, include_deleted: bool = True) -> list[StoredFileInfo]:
        home = exid if isinstance(exid, Home) else Home(exid=exid)
        with self._require_sessions()() as s:
            if home.exid is not None:
                q = select(StoredFile).where(StoredFile.experiment_id == ops.get_experiment(s, home.exid).id)
            else:
                q = select(StoredFile).where(StoredFile.owner_id == ops.get_user(s, home.owner).id)
            if not include_deleted:
                q = q.where(StoredFile.deleted_at.is_(None))
            return [self._info(r, home.label) for r in s.scalars(q.order_by(StoredFile.path, StoredFile.id))]

    # ----------------------------------------------------------------------------------
    # delete = crypto-shred
    # ----------------------------------------------------------------------------------
    def delete_file(self, actor: ops.Actor, exid: str | Home, path: str, *, reason: str,
                    now: datetime | None = None) -> StoredFileInfo:
        """Permanently delete a file: destroy its data key (committed first: from then on no
        replica or backup can be decrypted), then remove its chunks from every location. The
        row stays as a stub with when and why; the audit events stay.

        Only the experiment's PI may delete (an operator acts for the PI, as for roles); in a
        personal repository, only its owner.
        """
        now = now or utcnow()
        home = exid if isinstance(exid, Home) else Home(exid=exid)
        reason = " ".join(reason.split())
        if not reason:
            raise ops.OperationError("a reason is required: it is shown to whoever tries to read the file")
        factory = self._require_sessions()
        with factory.begin() as s:
            path = normalise_path(path)
            target = home.target(path)
            if home.exid is not None:
                e = ops.get_experiment(s, home.exid)
                row = self._live_file(s, e, path)
                if row is None:
                    _, stub = self._get_file(s, home.exid, path)  # NotFound, or a stub: say when
                    raise FileDeleted(f"{home.exid}/{path}", stub.deleted_at, stub.deleted_reason)
                acting = actor.user_id if actor.user_id is not None else e.pi_id
                decision = p.decide(load_subject(s, acting, now), "delete", experiment_value(s, e), now)
            else:
                owner = ops.get_user(s, home.owner)
                row = self._live_personal(s, owner.id, path)
                if row is None:
                    raise ops.NotFound(f"no file {path!r} in {home.label}")
                decision = self._decide_personal(s, actor, owner.id, path, "delete", now)
            if decision.allowed:
                dk = s.get(DataKey, row.data_key_id) if row.data_key_id else None
                if dk is not None:
                    dk.wrapped_key = None
                    dk.destroyed_at = now
                row.deleted_at = now
                row.deleted_reason = reason[:2000]
                details = {"uuid": row.uuid, "reason": row.deleted_reason, "sha256": row.checksum}
                if actor.user_id is None and home.exid is not None:
                    details["on_behalf_of_pi"] = True
                ops._record(s, actor, "file.delete", target, decision, now, details)
                file_row_id = row.id
        if not decision.allowed:
            raise ops._refuse(factory, actor, "file.delete", target, decision, now)
        self._purge(file_row_id, now)
        with factory() as s:
            return self._info(s.get(StoredFile, file_row_id), home.label)

    def _purge(self, file_row_id: int, now: datetime) -> bool:
        """Remove a deleted file's objects from every configured location; True when gone."""
        factory = self._require_sessions()
        with factory() as s:
            row = s.get(StoredFile, file_row_id)
            if row is None or row.deleted_at is None or row.purged_at is not None or not row.uuid:
                return False
            key = object_key(row.uuid)
        complete = True
        for name, backend in self.backends.items():
            try:
                backend.delete(key)
            except Exception as e:
                complete = False
                self.log.warning("could not remove deleted file %s from %s (scrub retries): %s",
                                 file_row_id, name, e)
        if complete:
            with factory.begin() as s:
                s.get(StoredFile, file_row_id).purged_at = now
        return complete

    # ----------------------------------------------------------------------------------
    # scrub
    # ----------------------------------------------------------------------------------
    def scrub(self, actor: ops.Actor, exid: str | None = None, *, grace_seconds: int | None = None,
              now: datetime | None = None) -> ScrubReport:
        """Verify every chunk of every live file on every location and repair what is bad or
        missing from good copies (chunk by chunk, so two damaged replicas can mend each other).
        Also finishes interrupted deletions and, for a whole-store scrub, removes what crashed
        ingests left behind. One ``store.repair`` audit event per repaired file and one
        ``store.scrub`` event with the counts."""
        now = now or utcnow()
        grace = timedelta(seconds=self.orphan_grace_seconds if grace_seconds is None else grace_seconds)
        factory = self._require_sessions()
        report = ScrubReport()
        with factory() as s:
            q = (select(StoredFile.id, Experiment.exid, User.name)
                 .outerjoin(Experiment, Experiment.id == StoredFile.experiment_id)
                 .outerjoin(User, User.id == StoredFile.owner_id))
            if exid is not None:
                q = q.where(Experiment.id == ops.get_experiment(s, exid).id)
            rows = [(fid, e if e is not None else f"~{owner}")
                    for fid, e, owner in s.execute(q.order_by(StoredFile.id)).all()]
        for file_row_id, file_exid in rows:
            try:
                self._scrub_one(actor, file_row_id, file_exid, report, now)
            except StoreError as e:
                report.errors.append(str(e))
        if exid is None:
            self._sweep(report, now, grace)
        target = f"experiment:{exid}" if exid else "store:*"
        with factory.begin() as s:
            ops._record(s, actor, "store.scrub", target, ops.OPERATOR, now, report.as_dict())
        return report

    def _scrub_one(self, actor: ops.Actor, file_row_id: int, exid: str, report: ScrubReport,
                   now: datetime) -> None:
        factory = self._require_sessions()
        with factory() as s:
            row = s.get(StoredFile, file_row_id)
            if row.uuid is None:
                return
            if row.deleted_at is not None:
                if row.purged_at is None and self._purge(file_row_id, now):
                    report.deleted_purged += 1
                return
            name = f"{exid}/{row.path}"
            e = s.get(Experiment, row.experiment_id)
            desired, _ = self._targets(s, e, now)
            try:
                data_key = self._data_key(s, row, name)
            except KeyUnavailable as err:
                report.unrecoverable.append(f"{name}: {err}")
                return
            layout = _layout(row)
            held = list(row.locations or ())
            checksum = row.checksum
        report.files += 1
        cipher = ChunkCipher.for_layout(data_key, layout)
        key = object_key(layout.file_id)
        names = [n for n in self.backends if n in set(desired) | set(held)]
        state = {n: _ReplicaState(self.backend(n), key, layout) for n in names}
        hasher = hashlib.sha256() if self.verify_checksum_on_scrub else None
        plain = memoryview(bytearray(layout.chunk_size))
        source: list[str | None] = []
        for i in range(layout.chunk_count):
            good = None
            out = plain[: layout.plain_len(i)]
            for n in names:
                st = state[n]
                if st.check(i, cipher, out):
                    report.chunks_verified += 1
                    if good is None:
                        good = n
                        if hasher:
                            hasher.update(out)
            source.append(good)
        faults = [f for st in state.values() for f in st.faults]
        report.bad_chunks += sum(len(st.bad) for st in state.values())
        lost = [i for i, g in enumerate(source) if g is None]
        if lost:
            report.unrecoverable.append(
                f"{name}: chunk(s) {_ranges(lost)} fail on every replica; left as they are"
            )
        elif hasher and hasher.hexdigest() != checksum:
            lost = [-1]
            report.unrecoverable.append(f"{name}: SHA-256 of the stored data differs from the database")
        repaired, restored, removed = [], [], []
        if not lost:
            for n in names:
                st = state[n]
                if n not in desired:
                    continue
                if st.healthy:
                    report.replicas_ok += 1
                    continue
                try:
                    self._rewrite(n, key, layout, source, state)
                except (StoreError, OSError) as err:
                    report.errors.append(f"{name}: repairing {n} failed: {err}")
                    continue
                (restored if st.missing else repaired).append(n)
            for n in names:
                if n not in desired and n in self.mirror_locations and not state[n].missing:
                    self.backend(n).delete(key)  # the PI withdrew the mirror agreement
                    removed.append(n)
        report.replicas_repaired += len(repaired)
        report.replicas_restored += len(restored)
        report.mirror_copies_removed += len(removed)
        healthy_now = [n for n in names if n in desired and (state[n].healthy or n in repaired or n in restored)]
        with factory.begin() as s:
            row = s.get(StoredFile, file_row_id)
            for f in faults:
                s.add(ReplicaFault(
                    file_id=file_row_id, location=f.location, chunk_index=f.chunk, kind=f.kind,
                    detail=f.detail[:500], detected_by="scrub", detected_at=now,
                    resolved_at=now if f.location in repaired or f.location in restored else None,
                ))
            for old in s.scalars(select(ReplicaFault).where(
                ReplicaFault.file_id == file_row_id, ReplicaFault.resolved_at.is_(None),
                ReplicaFault.location.in_([n for n in names if state[n].healthy]),
            )):
                old.resolved_at = now  # found healthy again (repaired by an earlier run, or transient)
            if row.deleted_at is not None:
                # deleted while we scrubbed: what we just wrote must go too
                for n in repaired + restored:
                    self.backend(n).delete(key)
                return
            if not lost and (repaired or restored or removed or sorted(row.locations or ()) != sorted(healthy_now)):
                row.locations = healthy_now
                ops._record(s, actor, "store.repair", f"file:{name}", ops.OPERATOR, now, {
                    "uuid": layout.file_id, "repaired": repaired, "restored": restored,
                    "mirror_copies_removed": removed, "bad_chunks": sum(len(st.bad) for st in state.values()),
                })

    def _rewrite(self, name: str, key: str, layout: Layout, source: list[str | None],
                 state: dict[str, _ReplicaState]) -> None:
        """Write a complete object on ``name``, each record copied from a replica where it
        verified (ciphertext as it is: no re-encryption)."""
        pending = self.backend(name).begin_put(key)
        buf = bytearray(layout.record_size)
        try:
            pending.write(layout.header)
            for i, src in enumerate(source):
                rlen = layout.record_len(i)
                view = memoryview(buf)[:rlen]
                got = state[src].reader().read_into(layout.record_offset(i), view)
                if got != rlen:
                    raise IntegrityError(f"record {i} changed on {src} during repair")
                pending.write(view)
            pending.prepare()
            pending.commit()
        except BaseException:
            pending.abort()
            raise
        finally:
            for st in state.values():
                st.close()

    def _sweep(self, report: ScrubReport, now: datetime, grace: timedelta) -> None:
        """Remove objects no live file refers to, and uploads a crash left unfinished."""
        factory = self._require_sessions()
        with factory() as s:
            live = set(s.scalars(select(StoredFile.uuid).where(
                StoredFile.deleted_at.is_(None), StoredFile.uuid.is_not(None))))
            deleted = set(s.scalars(select(StoredFile.uuid).where(
                StoredFile.deleted_at.is_not(None), StoredFile.uuid.is_not(None))))
        cutoff = now - grace
        for name, backend in self.backends.items():
            try:
                listed, orphans = 0, []
                for obj in backend.list():
                    listed += 1
                    fid = file_id_from_key(obj.key)
                    if fid is None or fid in live:
                        continue  # not ours (never touched), or a live file
                    if fid in deleted:
                        backend.delete(obj.key)  # its data key is destroyed: only ciphertext noise
                        report.deleted_purged += 1
                    elif obj.modified <= cutoff:
                        orphans.append(obj)
                # Many objects this database does not know is a wrong database, not a crash:
                # remove nothing rather than every file.
                if len(orphans) > 10 and len(orphans) * 10 > listed:
                    report.errors.append(
                        f"{name}: {len(orphans)} of {listed} objects are unknown to this database; "
                        "is it the right database? nothing was removed"
                    )
                    orphans = []
                for obj in orphans:
                    backend.delete(obj.key)
                    report.orphans_removed += 1
                for obj in backend.list_incomplete():
                    if obj.modified <= cutoff:
                        backend.abort_incomplete(obj)
                        report.incomplete_removed += 1
            except (OSError, StoreError) as e:
                report.errors.append(f"sweeping {name}: {e}")

    # ----------------------------------------------------------------------------------
    # key rotation
    # ----------------------------------------------------------------------------------
    def rotate_keys(self, actor: ops.Actor, *, keep_old: bool = False, batch: int = 500,
                    now: datetime | None = None) -> RotateReport:
        """Make a new master key current and re-wrap every live data key under it; the data
        itself is not re-encrypted. Then destroy the old master keys no data key needs any
        more (unless ``keep_old``): a database backup taken before the rotation can then no
        longer open files deleted since."""
        now = now or utcnow()
        factory = self._require_sessions()
        provider = self.key_provider
        old_ids = list(provider.key_ids())
        report = RotateReport(new_key_id=provider.create_key())
        failed: set[int] = set()

        def rewrap_pass(s: Session) -> int:
            q = (
                select(DataKey, StoredFile.uuid)
                .join(StoredFile, StoredFile.data_key_id == DataKey.id)
                .where(DataKey.wrapped_key.is_not(None), DataKey.master_key_id != report.new_key_id)
                .order_by(DataKey.id)
            )
            if failed:
                q = q.where(DataKey.id.not_in(failed))
            done = 0
            for dk, file_uuid in s.execute(q.limit(batch)).all():
                try:
                    dk.master_key_id, dk.wrapped_key = provider.rewrap(
                        dk.master_key_id, dk.wrapped_key, wrap_context(file_uuid))
                    done += 1
                except KeyUnavailable as e:
                    failed.add(dk.id)
                    report.failures.append(f"data key {dk.id}: {e}")
            return done

        while True:
            with factory.begin() as s:
                n = rewrap_pass(s)
            report.rewrapped += n
            if n == 0:
                break
        with factory.begin() as s:
            # Final pass under the audit chain's lock: an ingest that wrapped its data key with
            # the old master key either committed before this (re-wrapped here) or commits after
            # and wraps with the new one.
            ops._record(s, actor, "keys.rotate", "keys:master", ops.OPERATOR, now,
                        {"new_key": report.new_key_id, "rewrapped_before_final_pass": report.rewrapped})
            while (n := rewrap_pass(s)):
                report.rewrapped += n
            still_used = set(s.scalars(select(DataKey.master_key_id).where(
                DataKey.wrapped_key.is_not(None)).distinct()))
        for key_id in old_ids:
            if key_id == report.new_key_id:
                continue
            if keep_old or key_id in still_used:
                report.kept.append(key_id)
            else:
                provider.retire_key(key_id)
                report.retired.append(key_id)
        return report


class _ReplicaState:
    """What one location holds of one file, found chunk by chunk."""

    def __init__(self, backend: StorageBackend, key: str, layout: Layout):
        self.backend, self.key, self.layout = backend, key, layout
        self.bad: list[int] = []
        self.faults: list[Fault] = []
        self._reader = None
        self._record = memoryview(bytearray(layout.record_size))
        try:
            size = backend.size(key)
        except OSError as e:
            size = None
            self.faults.append(Fault(backend.name, None, "unreadable", e.strerror or str(e)))
        self.missing = size is None
        self.header_ok = self.size_ok = False
        if not self.missing:
            self.size_ok = size == layout.object_size
            if not self.size_ok:
                self.faults.append(Fault(backend.name, None, "truncated" if size < layout.object_size else "corrupt",
                                         f"object is {size} bytes, expected {layout.object_size}"))
            try:
                self.header_ok = backend.read_range(key, 0, len(layout.header)) == layout.header
            except OSError:
                self.header_ok = False
            if not self.header_ok:
                self.faults.append(Fault(backend.name, None, "corrupt", "header does not match"))
        elif not self.faults:
            self.faults.append(Fault(backend.name, None, "missing", "object not found"))

    @property
    def healthy(self) -> bool:
        return not self.missing and self.size_ok and self.header_ok and not self.bad

    def reader(self):
        if self._reader is None:
            self._reader = self.backend.open_reader(self.key)
        return self._reader

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def check(self, index: int, cipher: ChunkCipher, out: memoryview) -> bool:
        if self.missing:
            return False
        rlen = self.layout.record_len(index)
        record = self._record[:rlen]
        try:
            got = self.reader().read_into(self.layout.record_offset(index), record)
        except OSError as e:
            self._bad(index, "unreadable", e.strerror or str(e))
            return False
        if got != rlen:
            self._bad(index, "truncated", f"record is {got} of {rlen} bytes")
            return False
        try:
            cipher.decrypt_into(index, record, out)
        except InvalidTag:
            self._bad(index, "corrupt", "failed authentication")
            return False
        return True

    def _bad(self, index: int, kind: str, detail: str) -> None:
        self.bad.append(index)
        if len(self.faults) < 100:  # one row per bad chunk, bounded
            self.faults.append(Fault(self.backend.name, index, kind, detail))


def _row_name(s: Session, row: StoredFile) -> str:
    if row.experiment_id is not None:
        return f"{s.get(Experiment, row.experiment_id).exid}/{row.path}"
    return f"~{s.get(User, row.owner_id).name}/{row.path}"


def _layout(row: StoredFile) -> Layout:
    starts = decode_chunk_map(row.chunk_map) if row.chunk_map is not None else None
    return Layout(row.uuid, row.chunk_size, row.size, starts)


def _ranges(indexes: list[int]) -> str:
    out, start, prev = [], None, None
    for i in indexes:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(out[:20]) + (" ..." if len(out) > 20 else "")


def _sha256_of(f: BinaryIO, source) -> str:
    h = hashlib.sha256()
    buf = memoryview(bytearray(MiB))
    f.seek(0)
    while n := f.readinto(buf):
        h.update(buf[:n])
    f.seek(0)
    return h.hexdigest()


def _unchanged(f: BinaryIO, before: os.stat_result, size_read: int, source) -> None:
    after = os.fstat(f.fileno())
    if (after.st_size, after.st_mtime_ns, size_read) != (before.st_size, before.st_mtime_ns, before.st_size):
        raise ops.OperationError(f"{source} changed while it was read; nothing was stored, try again")
