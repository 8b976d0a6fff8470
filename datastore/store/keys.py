"""Envelope encryption: per-file data keys wrapped by master keys, and where master keys live.

A :class:`KeyProvider` is the only code that touches master keys. The chunk store hands it a
fresh data key and a *context* (the file's id) and stores what comes back -- the wrapped key
and the id of the master key that wrapped it -- in the ``data_keys`` table. Reading a file
unwraps it again. Destroying the wrapped key destroys the file (crypto-shredding).

Writing a provider for a KMS
----------------------------
Subclass :class:`KeyProvider` and implement five methods; select it with
``c.ChunkStore.key_provider_class = "mypackage.MyKmsProvider"``. With AWS KMS, for example:

* :meth:`~KeyProvider.current_key_id` -- the key ARN new data keys are wrapped with (a trait).
* :meth:`~KeyProvider.wrap` -- ``Encrypt(KeyId=current, Plaintext=data_key,
  EncryptionContext={"labvault-file": context.hex()})``; return ``(KeyId, CiphertextBlob)``.
* :meth:`~KeyProvider.unwrap` -- ``Decrypt(KeyId=key_id, CiphertextBlob=wrapped,
  EncryptionContext=...)``; raise :class:`KeyUnavailable` on any failure.
* :meth:`~KeyProvider.create_key` -- for ``labvault keys rotate``: create (or name, via a trait)
  the next KMS key and make it current. KMS-internal rotation of a key's backing material
  needs no re-wrap at all; ``rotate`` is for moving to a *different* key.
* :meth:`~KeyProvider.retire_key` -- schedule deletion of a key no data key uses any more
  (``ScheduleKeyDeletion``), or do nothing and leave it to the KMS's own policy.

HashiCorp Vault's transit engine maps the same way (``encrypt``/``decrypt`` with ``context``).
Providers must never log, return or store key material other than as described here.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import stat
import struct
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from traitlets import Unicode
from traitlets.config import LoggingConfigurable

from .errors import KeyUnavailable

DATA_KEY_BYTES = 32  # AES-256
_CONTEXT_PREFIX = b"labvault data key v1:"
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def wrap_context(file_id: str) -> bytes:
    """The context a file's data key is wrapped under: the key opens that file and no other."""
    return _CONTEXT_PREFIX + bytes.fromhex(file_id)


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


class KeyProvider(LoggingConfigurable):
    """Where master keys live and how data keys are wrapped with them (the interface).

    Implementations wrap and unwrap data keys under a *context* (bytes that must be given
    again to unwrap: it binds a wrapped key to its file). See the module docstring for how a
    KMS maps onto it.
    """

    def current_key_id(self) -> str:
        """The id of the master key that wraps new data keys."""
        raise NotImplementedError

    def wrap(self, data_key: bytes, context: bytes) -> tuple[str, bytes]:
        """Wrap ``data_key`` with the current master key: return (master key id, wrapped)."""
        raise NotImplementedError

    def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        """The data key, or :class:`KeyUnavailable` (unknown key, wrong key, wrong context)."""
        raise NotImplementedError

    def create_key(self) -> str:
        """Create a new master key, make it current and return its id (key rotation)."""
        raise NotImplementedError

    def retire_key(self, key_id: str) -> None:
        """No data key is wrapped by ``key_id`` any more: destroy it (or schedule that)."""
        raise NotImplementedError

    def key_ids(self) -> list[str]:
        """Ids of the master keys this provider can use, oldest first (for ``keys list``)."""
        return [self.current_key_id()]

    def ensure_key(self) -> str:
        """Make sure a current master key exists (``labvault init``); return its id."""
        return self.current_key_id()

    def rewrap(self, key_id: str, wrapped: bytes, context: bytes) -> tuple[str, bytes]:
        """Unwrap with ``key_id`` and wrap again with the current key (rotation)."""
        return self.wrap(self.unwrap(key_id, wrapped, context), context)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileKeyProvider(KeyProvider):
    """Master keys in files of one directory (the embedded default).

    Each key is ``<key_dir>/<key id>.key`` (mode 0600, 32 random bytes, base64), and
    ``<key_dir>/current`` names the one that wraps new data keys. Keep the directory off the
    storage locations and out of user servers; back it up separately from the database (a
    database backup plus its master key can open every file that was live at backup time).
    """

    key_dir = Unicode(
        "",
        help="""Directory of the master key files (mode 0700; each key file 0600).

        Default: keys/ in the data directory. Files readable by group or others are refused,
        like JupyterHub refuses a cookie secret file that others can read.""",
    ).tag(config=True)

    _WRAP_VERSION = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._cache: dict[str, AESGCM] = {}

    # ----------------------------------------------------------------------------------
    @property
    def _dir(self) -> Path:
        if not self.key_dir:
            raise KeyUnavailable("no master key directory configured (FileKeyProvider.key_dir)")
        return Path(self.key_dir)

    def _path(self, key_id: str) -> Path:
        if not _KEY_ID_RE.match(key_id):
            raise KeyUnavailable(f"bad master key id {key_id!r}")
        return self._dir / f"{key_id}.key"

    def _load(self, key_id: str) -> AESGCM:
        cached = self._cache.get(key_id)
        if cached is not None:
            return cached
        path = self._path(key_id)
        try:
            st = path.stat()
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise KeyUnavailable(
                    f"master key file {path} is accessible by others (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 it"
                )
            text = path.read_text().split()
        except FileNotFoundError:
            raise KeyUnavailable(
                f"master key {key_id} is not in {self._dir} (was it rotated away, or is this the wrong key directory?)"
            ) from None
        except OSError as e:
            raise KeyUnavailable(f"cannot read master key file {path}: {e.strerror}") from None
        try:
            if len(text) != 2 or text[0] != "labvault-master-key-v1":
                raise ValueError
            raw = base64.b64decode(text[1], validate=True)
            if len(raw) != DATA_KEY_BYTES:
                raise ValueError
        except ValueError:
            raise KeyUnavailable(f"master key file {path} is damaged (not a labvault master key)") from None
        aead = AESGCM(raw)
        self._cache[key_id] = aead
        return aead

    def current_key_id(self) -> str:
        try:
            key_id = (self._dir / "current").read_text().strip()
        except FileNotFoundError:
            raise KeyUnavailable(f"no current master key in {self._dir}: run `labvault init`") from None
        except OSError as e:
            raise KeyUnavailable(f"cannot read {self._dir / 'current'}: {e.strerror}") from None
        self._path(key_id)  # validates the id
        return key_id

    def key_ids(self) -> list[str]:
        try:
            files = [p for p in self._dir.glob("*.key") if _KEY_ID_RE.match(p.stem)]
        except OSError:
            return []
        return [p.stem for p in sorted(files, key=lambda p: (p.stat().st_mtime, p.stem))]

    def wrap(self, data_key: bytes, context: bytes) -> tuple[str, bytes]:
        key_id = self.current_key_id()
        nonce = os.urandom(12)
        blob = self._load(key_id).encrypt(nonce, data_key, self._aad(key_id, context))
        return key_id, struct.pack(">B", self._WRAP_VERSION) + nonce + blob

    def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        aead = self._load(key_id)
        if len(wrapped) != 1 + 12 + DATA_KEY_BYTES + 16 or wrapped[0] != self._WRAP_VERSION:
            raise KeyUnavailable(f"wrapped data key has an unknown layout (master key {key_id})")
        try:
            return aead.decrypt(wrapped[1:13], wrapped[13:], self._aad(key_id, context))
        except InvalidTag:
            raise KeyUnavailable(
                f"a data key does not unwrap with master key {key_id}: the key file was replaced "
                "or the data key belongs to another file"
            ) from None

    @staticmethod
    def _aad(key_id: str, context: bytes) -> bytes:
        return key_id.encode() + b"\0" + context

    def create_key(self) -> str:
        d = self._dir
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        key_id = f"mk-{datetime.now(timezone.utc):%Y%m%d%H%M%S}-{secrets.token_hex(4)}"
        path = self._path(key_id)
        body = f"labvault-master-key-v1\n{base64.b64encode(os.urandom(DATA_KEY_BYTES)).decode()}\n"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, body.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        # `current` is replaced atomically: a reader sees the old or the new id, never half.
        tmp = d / f".current.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (key_id + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, d / "current")
        _fsync_dir(d)
        self.log.info("created master key %s in %s", key_id, d)
        return key_id

    def retire_key(self, key_id: str) -> None:
        if key_id == self.current_key_id():
            raise KeyUnavailable(f"master key {key_id} is current and cannot be retired")
        path = self._path(key_id)
        self._cache.pop(key_id, None)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(self._dir)
        self.log.info("destroyed retired master key %s", key_id)

    def ensure_key(self) -> str:
        try:
            key_id = self.current_key_id()
        except KeyUnavailable:
            return self.create_key()
        self._load(key_id)
        return key_id
