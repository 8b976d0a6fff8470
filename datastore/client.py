"""The kernel-side client of the datastore service.

Holds the user's Hub token and nothing else that grants access (no database URL, no master
key). In a notebook::

    from labvault.datastore.client import Client
    lv = Client()                       # token from $JUPYTERHUB_API_TOKEN
    lv.experiments()                    # what I may access now
    lv.files("NLS-2026-0001")
    with lv.h5("NLS-2026-0001", "scan/frames.h5") as f:
        frame = f["entry/data"][17]

Reads go through the *served* path (HTTP Range requests, decrypted by the service) unless the
deployment mounts the ciphertext read-only into user servers and the service grants a
*direct* lease: then the client decrypts locally with a short-lived key for that one file.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import urllib3


class LabvaultError(Exception):
    """A refusal or failure reported by the service: ``status``, ``rule`` and ``reason``."""

    def __init__(self, status: int, error: str, rule: str = "", reason: str = ""):
        super().__init__(f"{status} {error}: {reason}" + (f" ({rule})" if rule else ""))
        self.status, self.error, self.rule, self.reason = status, error, rule, reason


def _service_url() -> str:
    explicit = os.environ.get("LABVAULT_SERVICE_URL")
    if explicit:
        return explicit.rstrip("/")
    hub_api = os.environ.get("JUPYTERHUB_API_URL")
    if hub_api:
        u = urlparse(hub_api)
        return f"{u.scheme}://{u.netloc}/services/labvault"
    raise LabvaultError(0, "not configured", "", "set LABVAULT_SERVICE_URL (the spawner does this)")


class Client:
    """A connection-pooling client of the service for one user."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 60.0,
                 maxsize: int = 8, direct: bool | None = None):
        self.url = (url or _service_url()).rstrip("/")
        self.token = token or os.environ.get("JUPYTERHUB_API_TOKEN") or ""
        if not self.token:
            raise LabvaultError(0, "no token", "", "no JupyterHub token: set JUPYTERHUB_API_TOKEN")
        self.http = urllib3.PoolManager(num_pools=4, maxsize=maxsize, retries=False,
                                        timeout=urllib3.Timeout(connect=10, read=timeout))
        self.headers = {"Authorization": f"token {self.token}"}
        # direct reads: on by default when the service offers them and the path is mounted
        self.direct = direct

    # -- plumbing ---------------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return f"{self.url}/api/v1{path}"

    def request(self, method: str, path: str, body: Any = None, **kwargs) -> Any:
        """Call the API; the JSON answer, or :class:`LabvaultError` with the rule and reason."""
        return self._json(self.send(method, path, body, **kwargs))

    def send(self, method: str, path: str, body: Any = None, **kwargs):
        """The raw answer (a urllib3 response) of one API call with a JSON ``body``."""
        headers = dict(self.headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        return self.http.request(method, self._url(path), body=data, headers=headers, **kwargs)

    @staticmethod
    def _json(r, data: bytes | None = None) -> Any:
        """``r``'s JSON, raising on an error status; ``data``: its body when already read."""
        data = r.data if data is None else data
        try:
            payload = json.loads(data) if data else None
        except ValueError:
            payload = None
        if r.status >= 400:
            p = payload if isinstance(payload, dict) else {}
            raise LabvaultError(r.status, p.get("error", r.reason or "error"), p.get("rule", ""),
                                p.get("reason", data[:200].decode(errors="replace") if data else ""))
        return payload

    # -- the API ----------------------------------------------------------------------------
    def me(self) -> dict:
        return self.request("GET", "/me")

    def experiments(self, q: str = "") -> list[dict]:
        return self.request("GET", "/experiments" + (f"?q={quote(q)}" if q else ""))["experiments"]

    def experiment(self, exid: str) -> dict:
        return self.request("GET", f"/experiments/{quote(exid, safe='')}")

    def files(self, exid: str) -> list[dict]:
        return self.request("GET", f"/experiments/{quote(exid, safe='')}/files")["files"]

    def open(self, exid: str, path: str, *, block_size: int = 256 * 1024) -> io.BufferedReader | RemoteFile:
        """A seekable, read-only binary file object for one file of an experiment."""
        if self.direct is not False:
            lease = self._lease(exid, path)
            if lease is not None:
                return DirectFile(self, exid, path, lease)
        return RemoteFile(self, exid, path, block_size=block_size)

    def h5(self, exid: str, path: str, **kwargs):
        """``h5py.File`` over :meth:`open` (read-only)."""
        import h5py

        return h5py.File(self.open(exid, path), "r", **kwargs)

    def upload(self, exid: str, path: str, data: bytes | Any) -> dict:
        """Store ``data`` (bytes or a binary file object) as ``path`` of an experiment (writers)."""
        return self._put(f"/experiments/{quote(exid, safe='')}/files/{quote(path.lstrip('/'))}", data)

    # -- my personal repository, and what others shared with me -------------------------------
    def personal_files(self) -> list[dict]:
        return self.request("GET", "/personal/files")["files"]

    def open_personal(self, path: str, *, block_size: int = 256 * 1024) -> RemoteFile:
        return RemoteFile(self, "~", path, block_size=block_size,
                          url=self._url(f"/personal/files/{quote(path.lstrip('/'))}"))

    def put_personal(self, path: str, data: bytes | Any) -> dict:
        return self._put(f"/personal/files/{quote(path.lstrip('/'))}", data)

    def delete_personal(self, path: str, reason: str = "") -> dict:
        q = f"?reason={quote(reason)}" if reason else ""
        return self.request("DELETE", f"/personal/files/{quote(path.lstrip('/'))}{q}")

    def share_personal(self, path: str, user: str) -> dict:
        """Share a file or folder of my repository with ``user``."""
        return self.request("POST", "/personal/shares", {"path": path, "user": user})

    def personal_shares(self) -> list[dict]:
        return self.request("GET", "/personal/shares")["shares"]

    def unshare_personal(self, share_id: int) -> dict:
        return self.request("DELETE", f"/personal/shares/{int(share_id)}")

    def shared_with_me(self) -> list[dict]:
        return self.request("GET", "/shared-with-me")["files"]

    def open_shared(self, owner: str, path: str, *, block_size: int = 256 * 1024) -> RemoteFile:
        return RemoteFile(self, f"~{owner}", path, block_size=block_size,
                          url=self._url(f"/shared-with-me/{quote(owner, safe='')}/{quote(path.lstrip('/'))}"))

    def _put(self, api_path: str, data: bytes | Any) -> dict:
        headers = {**self.headers, "Content-Type": "application/octet-stream"}
        if isinstance(data, (bytes, bytearray, memoryview)):
            body = bytes(data)
        else:  # a file object: its size is needed for Content-Length
            body = data.read()
        headers["Content-Length"] = str(len(body))
        return self._json(self.http.request("PUT", self._url(api_path), body=body, headers=headers))

    def _lease(self, exid: str, path: str) -> dict | None:
        try:
            lease = self.request("POST", f"/experiments/{quote(exid, safe='')}/leases", {"path": path})
        except LabvaultError as e:
            if e.status in (404, 409) and e.error == "direct reads unavailable":
                return None
            raise
        root = lease.get("root")
        if not root or not any(Path(root, name, lease["object"]).exists() for name in lease["locations"]):
            return None  # the ciphertext is not mounted here: use the served path
        return lease


def file_url(client: Client, exid: str, path: str) -> str:
    return client._url(f"/experiments/{quote(exid, safe='')}/files/{quote(path.lstrip('/'))}")


class _ReadOnlyFile(io.RawIOBase):
    """Position, seeking and naming shared by the served and the direct file objects."""

    _pos = 0
    _size = 0

    def __init__(self, client: Client, exid: str, path: str):
        super().__init__()
        self.client, self.exid, self.path = client, exid, path

    @property
    def name(self) -> str:
        return f"labvault:{self.exid}/{self.path}"

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence not in (io.SEEK_SET, io.SEEK_CUR, io.SEEK_END):
            raise ValueError(f"bad whence {whence}")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos


class RemoteFile(_ReadOnlyFile):
    """Served reads: HTTP Range requests into reused buffers, with adaptive read-ahead.

    ``readinto`` always fills the whole buffer (short only at end of file): h5py calls it once
    and ignores a short count. Sequential reads double the read-ahead up to ``max_block``;
    random reads stay at ``block_size``. A small LRU of blocks serves h5py's metadata reads.
    """

    def __init__(self, client: Client, exid: str, path: str, *, block_size: int = 256 * 1024,
                 max_block: int = 16 * 1024 * 1024, cache_blocks: int = 4, url: str | None = None):
        super().__init__(client, exid, path)
        self.url = url or file_url(client, exid, path)
        self.block_size, self.max_block = block_size, max_block
        self._cache: OrderedDict[int, memoryview] = OrderedDict()  # start offset -> data
        self._cache_blocks = cache_blocks
        self._next_sequential = -1
        self._readahead = block_size
        r = client.http.request("HEAD", self.url, headers=client.headers)
        if r.status >= 400:
            client._json(client.http.request("GET", self.url, headers={**client.headers, "Range": "bytes=0-0"}))
        self._size = int(r.headers.get("Content-Length", "0"))

    def _fetch_into(self, start: int, buf: memoryview) -> None:
        """GET bytes [start, start+len(buf)) straight into ``buf``."""
        end = start + len(buf) - 1
        r = self.client.http.request("GET", self.url, headers={**self.client.headers, "Range": f"bytes={start}-{end}"},
                                     preload_content=False)
        try:
            if r.status not in (200, 206):  # a refusal: its JSON names the rule and the reason
                self.client._json(r, r.read())
            got = 0
            while got < len(buf):
                n = r.readinto(buf[got:])
                if not n:
                    break
                got += n
            if got != len(buf):
                raise LabvaultError(502, "short read", "", f"expected {len(buf)} bytes, got {got}")
        finally:
            r.release_conn()

    def _block(self, start: int, length: int) -> memoryview:
        cached = self._cache.get(start)
        if cached is not None and len(cached) >= length:
            self._cache.move_to_end(start)
            return cached
        buf = memoryview(bytearray(length))
        self._fetch_into(start, buf)
        self._cache[start] = buf
        while len(self._cache) > self._cache_blocks:
            self._cache.popitem(last=False)
        return buf

    def readinto(self, b) -> int:
        out = memoryview(b).cast("B")
        want = min(len(out), max(0, self._size - self._pos))
        if want == 0:
            return 0
        done = 0
        # served from cached blocks where possible
        while done < want:
            pos = self._pos + done
            hit = None
            for start, data in self._cache.items():
                if start <= pos < start + len(data):
                    hit = (start, data)
                    break
            if hit is None:
                break
            start, data = hit
            n = min(want - done, start + len(data) - pos)
            out[done:done + n] = data[pos - start:pos - start + n]
            done += n
        remaining = want - done
        if remaining:
            pos = self._pos + done
            sequential = pos == self._next_sequential
            self._readahead = min(self.max_block, self._readahead * 2) if sequential else self.block_size
            if remaining >= self._readahead:
                self._fetch_into(pos, out[done:want])  # big reads go straight into the caller's buffer
            else:
                length = min(self._readahead, self._size - pos)
                data = self._block(pos, length)
                out[done:want] = data[:remaining]
            done = want
        self._pos += done
        self._next_sequential = self._pos
        return done

    def readall(self) -> bytes:
        buf = bytearray(max(0, self._size - self._pos))
        n = self.readinto(buf)
        return bytes(buf[:n])

    def close(self) -> None:
        self._cache.clear()
        super().close()


class DirectFile(_ReadOnlyFile):
    """Direct reads: decrypt ciphertext from the read-only mount with a leased data key.

    The lease (one file's key, for minutes) is renewed through a fresh decision of the service
    when it runs out, so access that ends also ends here, at the next renewal.
    """

    def __init__(self, client: Client, exid: str, path: str, lease: dict):
        super().__init__(client, exid, path)
        self._inner = None
        self._install(lease)

    def _install(self, lease: dict) -> None:
        from .store.backends import LocalDirectoryBackend
        from .store.reader import ReadLease

        read_lease = ReadLease.from_json(lease)
        backends = {name: LocalDirectoryBackend(name, Path(lease["root"], name)) for name in read_lease.locations}
        if self._inner is not None:
            self._inner.close()
        self._inner = read_lease.open(backends)
        self._size = read_lease.size
        self._expires = time.monotonic() + float(lease["expires_in"])

    def _renew_if_due(self) -> None:
        if time.monotonic() < self._expires:
            return
        lease = self.client.request("POST", f"/experiments/{quote(self.exid, safe='')}/leases", {"path": self.path})
        self._install(lease)

    def readinto(self, b) -> int:
        self._renew_if_due()
        self._inner.seek(self._pos)
        n = self._inner.readinto(b)
        self._pos += n
        return n

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
        super().close()
