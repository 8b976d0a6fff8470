"""The contents manager of a labvault single-user server: the user's home, with the datastore's
trees laid over it.

``/experiments/<exID>/<path>`` shows the experiments the user may access *at that moment*,
``/personal/<path>`` the user's personal repository and ``/shared-with-me/<owner>/<path>`` what
others shared with them. Every listing and every read is a request the datastore service
decides anew, so access that ends (facility staff 30 days after an experiment, a revoked role,
a withdrawn share) ends at the next request, not at the next spawn. The trees are read-only,
except that files may be uploaded where the service allows it (and deleted from /personal).
Everything else — notebooks, the user's own files — is the stock ``AsyncLargeFileManager`` on
the home directory.

Paths are checked before anything is read or asked: ``..``/``.``/empty segments, NUL and
control characters and backslashes are refused (400); home paths that resolve (through
symlinks) outside the home directory are refused (404), and so are listed entries that do.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import errno
import hashlib
import json
import mimetypes
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import nbformat
from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from jupyter_server.services.contents.manager import AsyncContentsManager
from tornado import web
from traitlets import Bool, Instance, Integer, Unicode, default, validate

from .remote import ServiceConnection, refused

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")

#: Set while the stock manager lists a home folder (it calls get() for every entry).
_LISTING: contextvars.ContextVar[bool] = contextvars.ContextVar("labvault_listing", default=False)

READ_ONLY_RULE = "labvault.read_only"
BAD_PATH_RULE = "labvault.path"


@dataclass(frozen=True)
class TreePath:
    """A path inside one of the overlaid trees: ``<tree>/<key>/<rest>``.

    For a keyed tree (``experiments``: key = exID) ``key`` is ``""`` at the tree's root; for an
    unkeyed one (``personal``) ``key`` is always ``""`` and ``rest`` is the path in it.
    """

    tree: Tree
    key: str
    rest: str

    @property
    def api_path(self) -> str:
        return "/".join(x for x in (self.tree.name, self.key, self.rest) if x)

    @property
    def is_tree_root(self) -> bool:
        return not self.key and not self.rest

    @property
    def is_key_root(self) -> bool:
        return bool(self.key) and not self.rest


class Tree:
    """One overlaid tree of the datastore. Subclasses say how to list, read and upload."""

    name = ""
    keyed = True
    writable = False  # may files be uploaded (the service still decides each upload)

    def __init__(self, manager: LabvaultContentsManager, name: str):
        self.manager, self.name = manager, name

    @property
    def conn(self) -> ServiceConnection:
        return self.manager.connection

    async def keys(self) -> list[dict]:
        """The first level (keyed trees): ``[{"name", "created", "last_modified"}]``."""
        raise NotImplementedError

    async def files(self, key: str) -> list[dict]:
        """The live files under ``key``: ``[{"path", "size", "checksum", "created_at"}]``."""
        raise NotImplementedError

    def opener(self, key: str, path: str) -> Callable[[], Any]:
        """A blocking function that returns a readable binary file object (run off the loop)."""
        raise NotImplementedError

    async def upload(self, key: str, path: str, data: Any) -> dict:
        raise refused(403, READ_ONLY_RULE, f"/{self.name} is read-only")

    async def delete(self, key: str, path: str) -> None:
        raise refused(403, READ_ONLY_RULE, f"/{self.name} is read-only: nothing can be deleted here")

    def read_only_reason(self) -> str:
        return f"/{self.name} is read-only"


class ExperimentsTree(Tree):
    """``/experiments/<exID>/<path>``: the experiments the user may access now."""

    writable = True

    async def keys(self) -> list[dict]:
        client = self.conn.client
        out = []
        for e in await self.conn.run(client.experiments):
            exid = e.get("exid") or ""
            if not _safe_segment(exid):
                self.manager.log.warning("experiment id %r cannot be a folder name; not listed", exid)
                continue
            created = _when(e.get("start")) or EPOCH
            out.append({"name": exid, "created": created,
                        "last_modified": _when(e.get("end")) or created,
                        "title": e.get("title")})
        return out

    async def files(self, key: str) -> list[dict]:
        client = self.conn.client
        return [f for f in await self.conn.run(client.files, key) if not f.get("deleted_at")]

    def opener(self, key: str, path: str) -> Callable[[], Any]:
        client = self.conn.client
        return lambda: client.open(key, path)

    async def upload(self, key: str, path: str, data: Any) -> dict:
        client = self.conn.client
        return await self.conn.run(client.upload, key, path, data)

    async def delete(self, key: str, path: str) -> None:
        raise refused(403, READ_ONLY_RULE,
                      f"/{self.name} is read-only: stored data is deleted by the experiment's PI, "
                      "with a reason, through labvault (widgets or API), never from the file browser")

    def read_only_reason(self) -> str:
        return (f"/{self.name} is read-only: only files can be uploaded into an experiment "
                "(where your role allows it); create and edit files in your home folder")


class PersonalTree(Tree):
    """``/personal/<path>``: the user's own repository in the datastore (encrypted like
    everything else; only its owner lists, reads, uploads and deletes)."""

    keyed = False
    writable = True

    async def files(self, key: str) -> list[dict]:
        client = self.conn.client
        return await self.conn.run(client.personal_files)

    def opener(self, key: str, path: str) -> Callable[[], Any]:
        client = self.conn.client
        return lambda: client.open_personal(path)

    async def upload(self, key: str, path: str, data: Any) -> dict:
        client = self.conn.client
        return await self.conn.run(client.put_personal, path, data)

    async def delete(self, key: str, path: str) -> None:
        client = self.conn.client
        if not any(f["path"] == path for f in await self.files("")):
            raise refused(400, READ_ONLY_RULE,
                          f"/{self.name}/{path} is not a file: a folder goes away with its last file")
        await self.conn.run(client.delete_personal, path, "deleted from the file browser")

    def read_only_reason(self) -> str:
        return (f"/{self.name} keeps files as they were stored: upload new files, delete old "
                "ones; edit in your home folder (a stored file is never overwritten)")


class SharedWithMeTree(Tree):
    """``/shared-with-me/<owner>/<path>``: files and folders others shared with this user."""

    async def _all(self) -> list[dict]:
        client = self.conn.client
        return await self.conn.run(client.shared_with_me)

    async def keys(self) -> list[dict]:
        owners: dict[str, datetime] = {}
        for f in await self._all():
            name = (f.get("owner") or {}).get("name") or ""
            if _safe_segment(name):
                when = _when(f.get("created_at")) or EPOCH
                owners[name] = max(when, owners.get(name, EPOCH))
        return [{"name": n, "created": t, "last_modified": t} for n, t in sorted(owners.items())]

    async def files(self, key: str) -> list[dict]:
        files = [f for f in await self._all() if (f.get("owner") or {}).get("name") == key]
        if not files:
            raise refused(404, "", f"nothing is shared with you by {key!r}")
        return files

    def opener(self, key: str, path: str) -> Callable[[], Any]:
        client = self.conn.client
        return lambda: client.open_shared(key, path)

    def read_only_reason(self) -> str:
        return f"/{self.name} is read-only: copy a file to your home folder to change it"


def _safe_segment(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and not _BAD_CHARS.search(name)


def _when(value: Any) -> datetime | None:
    if not value:
        return None
    if isinstance(value, datetime):
        t = value
    else:
        try:
            t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


class LabvaultContentsManager(AsyncLargeFileManager):
    """The home directory, with ``/experiments`` (and the user's personal trees) served by the
    labvault datastore service and decided per request."""

    experiments_dir = Unicode(
        "experiments",
        help="""Name of the top-level folder that shows the experiments the user may access.
        A folder of that name in the home directory is hidden behind it.""",
    ).tag(config=True)

    @validate("experiments_dir")
    def _check_tree_name(self, proposal):
        if not _safe_segment(proposal["value"]) or proposal["value"].startswith("."):
            raise ValueError(f"{proposal['value']!r} cannot be a top-level folder name")
        return proposal["value"]

    max_open_size = Integer(
        64 * 1024 * 1024,
        help="""Largest datastore file (bytes) that may be opened as a whole through the contents
        API (JupyterLab's editors load the whole file into the browser). Larger files answer 413
        with a hint: read them in a notebook with ``labvault.datastore.client.Client`` or look at
        HDF5 files through the HDF5 endpoints, which read only the slices they need.""",
    ).tag(config=True)

    max_upload_size = Integer(
        4 * 1024 * 1024 * 1024,
        help="""Largest file (bytes) this server accepts for upload into the datastore. Chunked
        uploads from JupyterLab are spooled in a private temporary file until the last chunk;
        the service applies its own limit (``DatastoreService.max_upload_size``) too.""",
    ).tag(config=True)

    personal_dir = Unicode(
        "personal",
        help="""Name of the top-level folder that shows the user's personal repository in the
        datastore. Empty: no such folder.""",
    ).tag(config=True)

    shared_dir = Unicode(
        "shared-with-me",
        help="""Name of the top-level folder that shows what other users shared with this user
        (one folder per owner). Empty: no such folder.""",
    ).tag(config=True)

    @validate("personal_dir", "shared_dir")
    def _check_optional_tree_name(self, proposal):
        value = proposal["value"]
        if value and (not _safe_segment(value) or value.startswith(".")):
            raise ValueError(f"{value!r} cannot be a top-level folder name")
        return value

    refuse_escaping_symlinks = Bool(
        True,
        help="""Refuse home paths that resolve, through symbolic links, outside the home
        directory (404), and leave such links out of listings. The stock manager follows them.""",
    ).tag(config=True)

    connection = Instance(ServiceConnection, help="The connection to the datastore service.")

    @default("files_handler_class")
    def _files_handler_class_default(self):
        from .files import LabvaultFilesHandler

        return LabvaultFilesHandler

    @default("connection")
    def _default_connection(self) -> ServiceConnection:
        return ServiceConnection(parent=self, log=self.log)

    _started = datetime.now(timezone.utc).replace(microsecond=0)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._spools: dict[str, Any] = {}
        self.trees: dict[str, Tree] = {}
        self.add_tree(ExperimentsTree(self, self.experiments_dir))
        if self.personal_dir:
            self.add_tree(PersonalTree(self, self.personal_dir))
        if self.shared_dir:
            self.add_tree(SharedWithMeTree(self, self.shared_dir))

    def add_tree(self, tree: Tree) -> None:
        self.trees[tree.name] = tree

    # -- paths -------------------------------------------------------------------------------
    def _split(self, path: str) -> TreePath | None:
        """Check ``path``; return where it lies in an overlaid tree, or None for the home."""
        if _BAD_CHARS.search(path):
            raise refused(400, BAD_PATH_RULE, "bad path: control characters or backslashes")
        path = path.strip("/")
        if not path:
            return None
        parts = path.split("/")
        if any(x in ("", ".", "..") for x in parts):
            raise refused(400, BAD_PATH_RULE,
                          f"bad path {path!r}: empty, '.' or '..' segments are not allowed")
        tree = self.trees.get(parts[0])
        if tree is None:
            return None
        if tree.keyed:
            return TreePath(tree, parts[1] if len(parts) > 1 else "", "/".join(parts[2:]))
        return TreePath(tree, "", "/".join(parts[1:]))

    def _inside_home(self, path: str) -> bool:
        if not self.refuse_escaping_symlinks:
            return True
        root = os.path.realpath(self.root_dir)
        real = os.path.realpath(os.path.join(root, *path.strip("/").split("/")))
        return real == root or real.startswith(root + os.sep)

    def _check_home(self, path: str) -> None:
        if not self._inside_home(path):
            if _LISTING.get():  # an entry of a listing: left out (the stock manager skips EACCES)
                raise PermissionError(errno.EACCES, "resolves outside the home directory", path)
            self.log.warning("refused %r: it resolves outside the home directory", path)
            raise refused(404, BAD_PATH_RULE, f"no such file or directory: {path.strip('/')!r}")

    async def _dir_model(self, path, content=True):
        token = _LISTING.set(True)
        try:
            return await super()._dir_model(path, content=content)
        finally:
            _LISTING.reset(token)

    def _hidden(self, tp: TreePath) -> bool:
        return any(x.startswith(".") for x in (tp.key, *tp.rest.split("/")) if x)

    # -- models ------------------------------------------------------------------------------
    def _model(self, name: str, path: str, kind: str, *, size: int | None = None,
               created: datetime | None = None, last_modified: datetime | None = None,
               writable: bool = False) -> dict:
        created = created or EPOCH
        return {"name": name, "path": path, "type": kind, "writable": writable, "created": created,
                "last_modified": last_modified or created, "size": size, "mimetype": None,
                "content": None, "format": None, "hash": None, "hash_algorithm": None}

    def _root_model(self, tree: Tree) -> dict:
        return self._model(tree.name, tree.name, "directory", created=self._started,
                           writable=tree.writable and not tree.keyed)

    def _stored_file_model(self, tp: TreePath, row: dict) -> dict:
        name = row["path"].rsplit("/", 1)[-1]
        created = _when(row.get("created_at")) or EPOCH
        path = "/".join(x for x in (tp.tree.name, tp.key, row["path"]) if x)
        model = self._model(name, path, "notebook" if name.endswith(".ipynb") else "file",
                            size=row.get("size"), created=created)
        if model["type"] == "file":
            model["mimetype"] = mimetypes.guess_type(name)[0]
        return model

    def _children(self, tp: TreePath, files: list[dict]) -> list[dict]:
        """The entries of one folder of a tree, from the flat list of its files."""
        prefix = f"{tp.rest}/" if tp.rest else ""
        base = tp.api_path
        dirs: dict[str, datetime] = {}
        out: list[dict] = []
        for row in files:
            path = row["path"]
            if not path.startswith(prefix):
                continue
            first, sep, _ = path[len(prefix):].partition("/")
            if not first or (first.startswith(".") and not self.allow_hidden):
                continue
            if sep:  # a folder: it exists through the files in it
                when = _when(row.get("created_at")) or EPOCH
                dirs[first] = max(when, dirs.get(first, EPOCH))
            else:
                out.append(self._stored_file_model(tp, row))
        # a name that is a file and a folder at once (possible in the store): the folder is listed
        out = [m for m in out if m["name"] not in dirs]
        out.extend(self._model(name, f"{base}/{name}", "directory", created=when,
                               writable=tp.tree.writable)
                   for name, when in dirs.items())
        return out

    # -- ContentsManager API: reads ------------------------------------------------------------
    async def get(self, path, content=True, type=None, format=None, require_hash=False):
        tp = self._split(path)
        if tp is None:
            self._check_home(path)
            model = await super().get(path, content=content, type=type, format=format,
                                      require_hash=require_hash)
            if not path.strip("/") and model.get("content") is not None:
                listing = [m for m in model["content"] if m["name"] not in self.trees]
                listing.extend(self._root_model(t) for t in self.trees.values())
                model["content"] = listing
            return model
        if self._hidden(tp) and not self.allow_hidden:
            raise refused(404, BAD_PATH_RULE, f"no such file or directory: {tp.api_path!r}")
        if tp.is_tree_root:
            return await self._get_tree_root(tp.tree, content, type)
        files = await tp.tree.files(tp.key)
        row = next((f for f in files if f["path"] == tp.rest), None) if tp.rest else None
        if row is None:
            prefix = f"{tp.rest}/"
            if tp.rest and not any(f["path"].startswith(prefix) for f in files):
                raise refused(404, "", f"no file or folder {tp.rest!r} in {tp.key or tp.tree.name}")
            if type not in (None, "directory"):
                raise web.HTTPError(400, f"{tp.api_path} is a directory, not a {type}", reason="bad type")
            model = self._model(tp.api_path.rsplit("/", 1)[-1], tp.api_path, "directory",
                                writable=tp.tree.writable)
            stamps = [_when(f.get("created_at")) or EPOCH for f in files
                      if not tp.rest or f["path"].startswith(prefix)]
            model["created"] = model["last_modified"] = max(stamps, default=EPOCH)
            if content:
                model["content"] = self._children(tp, files)
                model["format"] = "json"
            return model
        if type == "directory":
            raise web.HTTPError(400, f"{tp.api_path} is not a directory", reason="bad type")
        return await self._get_file(tp, row, content, type, format, require_hash)

    async def _get_tree_root(self, tree: Tree, content: bool, type: str | None) -> dict:
        if type not in (None, "directory"):
            raise web.HTTPError(400, f"{tree.name} is a directory, not a {type}", reason="bad type")
        model = self._root_model(tree)
        if content:
            if tree.keyed:
                model["content"] = [
                    self._model(k["name"], f"{tree.name}/{k['name']}", "directory",
                                created=k["created"], last_modified=k["last_modified"],
                                writable=tree.writable)
                    for k in await tree.keys() if self.allow_hidden or not k["name"].startswith(".")
                ]
            else:
                files = await tree.files("")
                model["content"] = self._children(TreePath(tree, "", ""), files)
            model["format"] = "json"
        return model

    async def _get_file(self, tp: TreePath, row: dict, content: bool, type: str | None,
                        format: str | None, require_hash: bool) -> dict:
        model = self._stored_file_model(tp, row)
        as_notebook = type == "notebook" or (type is None and model["type"] == "notebook")
        model["type"] = "notebook" if as_notebook else "file"
        data = None
        if content or (require_hash and not row.get("checksum")):
            size = row.get("size") or 0
            if size > self.max_open_size:
                raise refused(413, "labvault.size",
                              f"{tp.api_path} has {size} bytes, more than the {self.max_open_size} "
                              "bytes a file may have to be opened here; read it in a notebook with "
                              "labvault.datastore.client.Client (HDF5: Client().h5(...))")
            data = await self.connection.run(_read_all, tp.tree.opener(tp.key, tp.rest))
        if require_hash:
            model["hash"] = row.get("checksum") or hashlib.sha256(data).hexdigest()
            model["hash_algorithm"] = "sha256"
        if not content:
            return model
        if as_notebook:
            try:
                nb = nbformat.reads(data.decode("utf-8"), as_version=4)
            except (UnicodeDecodeError, ValueError, nbformat.reader.NotJSONError) as e:
                raise web.HTTPError(400, f"{tp.api_path} is not a notebook: {e}", reason="bad format") from None
            self.mark_trusted_cells(nb, tp.api_path)
            model.update(content=nb, format="json", mimetype=None)
            self.validate_notebook_model(model)
            return model
        if format != "base64":
            try:
                model.update(content=data.decode("utf-8"), format="text",
                             mimetype=model["mimetype"] or "text/plain")
                return model
            except UnicodeDecodeError:
                if format == "text":
                    raise web.HTTPError(400, f"{tp.api_path} is not UTF-8 encoded",
                                        reason="bad format") from None
        model.update(content=base64.b64encode(data).decode("ascii"), format="base64",
                     mimetype=model["mimetype"] or "application/octet-stream")
        return model

    async def dir_exists(self, path):
        tp = self._split(path)
        if tp is None:
            return self._inside_home(path) and await super().dir_exists(path)
        if tp.is_tree_root:
            return True
        try:
            files = await tp.tree.files(tp.key)
        except web.HTTPError as e:
            if e.status_code in (403, 404, 410):
                return False
            raise
        if not tp.rest:
            return True
        return any(f["path"].startswith(tp.rest + "/") for f in files)

    async def file_exists(self, path):
        tp = self._split(path)
        if tp is None:
            return self._inside_home(path) and await super().file_exists(path)
        if not tp.rest:
            return False
        try:
            files = await tp.tree.files(tp.key)
        except web.HTTPError as e:
            if e.status_code in (403, 404, 410):
                return False
            raise
        return any(f["path"] == tp.rest for f in files)

    async def is_hidden(self, path):
        tp = self._split(path)
        if tp is None:
            return await super().is_hidden(path)
        return self._hidden(tp)

    async def get_kernel_path(self, path, model=None):
        """Kernels of notebooks opened from a datastore tree start in the home directory."""
        if self._split(path) is not None:
            return ""
        return await super().get_kernel_path(path, model=model)

    async def copy(self, from_path, to_path=None):
        """Copy files out of a tree into the home, or (uploading) into a tree; not folders."""
        src, dst = self._split(from_path), self._split(to_path or "")
        if src is None and dst is None:
            self._check_home(from_path)
            if to_path:
                self._check_home(to_path)
            return await super().copy(from_path, to_path)
        if src is None:
            self._check_home(from_path)
        model = await self.get(from_path, content=False)
        if model["type"] == "directory":
            raise web.HTTPError(400, f"folders cannot be copied into or out of /{(src or dst).tree.name}; "
                                "copy the files")
        return await AsyncContentsManager.copy(self, from_path=from_path, to_path=to_path)

    # -- ContentsManager API: writes ---------------------------------------------------------
    async def save(self, model, path=""):
        tp = self._split(path)
        if tp is None:
            self._check_home(path)
            return await super().save(model, path)
        if "type" not in model:
            raise web.HTTPError(400, "No file type provided")
        if model["type"] == "directory" or not tp.rest or not tp.tree.writable:
            raise refused(403, READ_ONLY_RULE, tp.tree.read_only_reason()
                          + (" (folders appear through the files uploaded into them)"
                             if model["type"] == "directory" else ""))
        if "content" not in model:
            raise web.HTTPError(400, "No file content provided")
        data = self._payload(model, tp.api_path)
        chunk = model.get("chunk")
        if chunk is not None:
            return await self._save_chunk(tp, int(chunk), data)
        self._check_upload_size(len(data), tp)
        stored = await tp.tree.upload(tp.key, tp.rest, data)
        return self._stored_file_model(tp, stored)

    def _payload(self, model: dict, api_path: str) -> bytes:
        kind, fmt, content = model["type"], model.get("format"), model["content"]
        try:
            if kind == "notebook":
                nb = nbformat.from_dict(content)
                return nbformat.writes(nb, version=nbformat.NO_CONVERT).encode("utf-8")
            if fmt == "base64":
                return base64.b64decode(content, validate=True)
            if fmt == "text":
                return content.encode("utf-8")
            if fmt == "json":
                return json.dumps(content).encode("utf-8")
        except (binascii.Error, TypeError, ValueError, AttributeError) as e:
            raise web.HTTPError(400, f"cannot read the content for {api_path}: {e}") from None
        raise web.HTTPError(400, f"unknown format {fmt!r} for {api_path}")

    def _check_upload_size(self, size: int, tp: TreePath) -> None:
        if size > self.max_upload_size:
            raise refused(413, "labvault.size",
                          f"uploads to {tp.tree.name} may have at most {self.max_upload_size} bytes "
                          f"on this server; {tp.api_path} is larger")

    async def _save_chunk(self, tp: TreePath, chunk: int, data: bytes) -> dict:
        """JupyterLab uploads big files in chunks (1, 2, …, -1 for the last): spool them
        privately, upload once the last one arrived (the service decides then)."""
        key = tp.api_path
        if chunk == 1:
            old = self._spools.pop(key, None)
            if old is not None:
                old.close()
            self._spools[key] = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)  # noqa: SIM115
        spool = self._spools.get(key)
        if spool is None:
            raise web.HTTPError(400, f"chunk {chunk} of {key} without its first chunk")
        spool.write(data)
        size = spool.tell()
        try:
            self._check_upload_size(size, tp)
        except web.HTTPError:
            self._spools.pop(key, None)
            spool.close()
            raise
        if chunk != -1:
            model = self._model(key.rsplit("/", 1)[-1], key, "file", size=size,
                                created=datetime.now(timezone.utc))
            return model
        self._spools.pop(key, None)
        try:
            spool.seek(0)
            stored = await tp.tree.upload(tp.key, tp.rest, spool)
        finally:
            spool.close()
        return self._stored_file_model(tp, stored)

    async def new(self, model=None, path=""):
        tp = self._split(path)
        if tp is not None and (model is None or "content" not in model):
            raise refused(403, READ_ONLY_RULE, tp.tree.read_only_reason())
        return await super().new(model, path)

    async def new_untitled(self, path="", type="", ext=""):
        tp = self._split(path)
        if tp is not None:
            raise refused(403, READ_ONLY_RULE, tp.tree.read_only_reason())
        return await super().new_untitled(path=path, type=type, ext=ext)

    async def delete_file(self, path):
        tp = self._split(path)
        if tp is None:
            self._check_home(path)
            return await super().delete_file(path)
        if not tp.rest:
            raise refused(403, READ_ONLY_RULE, tp.tree.read_only_reason())
        await tp.tree.delete(tp.key, tp.rest)

    async def rename_file(self, old_path, new_path):
        old, new = self._split(old_path), self._split(new_path)
        if old is None and new is None:
            self._check_home(old_path)
            self._check_home(new_path)
            return await super().rename_file(old_path, new_path)
        tree = (old or new).tree
        raise refused(403, READ_ONLY_RULE,
                      f"files cannot be moved into, out of or inside /{tree.name}: "
                      "copy them to your home folder, or upload a copy")

    # -- checkpoints: the datastore keeps no checkpoints ---------------------------------------
    async def create_checkpoint(self, path):
        tp = self._split(path)
        if tp is not None:
            raise refused(403, READ_ONLY_RULE, tp.tree.read_only_reason())
        return await super().create_checkpoint(path)

    async def list_checkpoints(self, path):
        if self._split(path) is not None:
            return []
        return await super().list_checkpoints(path)

    async def restore_checkpoint(self, checkpoint_id, path):
        tp = self._split(path)
        if tp is not None:
            raise refused(403, READ_ONLY_RULE, tp.tree.read_only_reason())
        return await super().restore_checkpoint(checkpoint_id, path)

    async def delete_checkpoint(self, checkpoint_id, path):
        tp = self._split(path)
        if tp is not None:
            raise refused(404, "", f"no checkpoint {checkpoint_id!r} for {tp.api_path}")
        return await super().delete_checkpoint(checkpoint_id, path)

    def info_string(self):
        trees = ", ".join(f"/{name}" for name in self.trees)
        return f"Serving notebooks from local directory: {self.root_dir} (labvault: {trees})"


def _read_all(opener: Callable[[], Any]) -> bytes:
    with opener() as f:
        return f.read()
