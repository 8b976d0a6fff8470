"""Errors of the chunk store. Each message is one line a person can act on.

They do not derive from :class:`labvault.datastore.operations.OperationError` on purpose: a bad
request (400) and damaged or unreadable storage (an operator's problem) are different answers
for the service, and the reader module must stay importable without the database layer.
"""

from __future__ import annotations

from datetime import datetime


class StoreError(Exception):
    """Something in the chunk store failed; the message says what and where."""


class FormatError(StoreError):
    """Bytes that are not (this version of) the labvault chunk format."""


class IntegrityError(StoreError):
    """Stored data failed authentication on every replica: never returned as plaintext."""


class KeyUnavailable(StoreError):
    """A master key is missing, unreadable or wrong, so a data key cannot be unwrapped."""


class ReplicaWriteError(StoreError):
    """Writing a replica failed; nothing was committed and temporary objects were removed."""


class FileDeleted(StoreError):
    """The file was permanently deleted (crypto-shredded); says when and why."""

    def __init__(self, name: str, deleted_at: datetime | None, reason: str | None):
        when = f"{deleted_at:%Y-%m-%d %H:%M} UTC" if deleted_at else "an unknown time"
        super().__init__(
            f"{name} was permanently deleted on {when}: {reason or 'no reason recorded'}"
        )
        self.deleted_at = deleted_at
        self.reason = reason
