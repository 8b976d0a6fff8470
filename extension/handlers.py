"""HDF5 in the file browser: h5grove-compatible endpoints over the datastore service.

``GET <base>/labvault/h5grove/{meta,attr,data,stats,paths}/?file=<api path>&path=<in file>``
(and the same under ``<base>/h5web/`` — the URL jupyterlab-h5web's viewer asks — unless
``LabvaultExtension.h5web_routes`` is off). ``file`` is a contents API path: a file under
``/experiments`` is read through the service (every request decided anew; only the byte ranges
HDF5 needs are fetched), a file in the home directory is read locally after the contents
manager's path checks. The JSON shapes are h5grove's: ``meta`` describes groups (children),
datasets (shape, type, chunks, filters) and attributes; ``data`` returns a slice
(``selection=5,0:10:2``) as JSON, ``bin`` (raw little-endian bytes), ``npy`` or ``csv``.

External links are never followed: they would make HDF5 open files of this server's
filesystem named by data from the store. Refusals are JSON ``{"error", "rule", "reason"}``
(plus h5grove's ``message``).
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
from typing import Any

import h5py
import numpy as np
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web

from .contents import LabvaultContentsManager
from .remote import refused

#: jupyter_server's permission for reading files: the HDF5 endpoints read files.
AUTH_RESOURCE = "contents"


class H5Error(Exception):
    """A bad request about an HDF5 file: status, rule, reason (raised in worker threads)."""

    def __init__(self, status: int, reason: str, rule: str = ""):
        super().__init__(reason)
        self.status, self.reason, self.rule = status, reason, rule


# --------------------------------------------------------------------------------------
# h5grove's model: metadata, values, selections (pure functions on an open h5py.File)
# --------------------------------------------------------------------------------------
def type_metadata(tid: h5py.h5t.TypeID) -> dict:
    """h5grove's ``type`` object: HDF5 class, NumPy dtype string, size and per-class details."""
    meta: dict[str, Any] = {"class": tid.get_class(), "dtype": _dtype_str(tid.dtype), "size": tid.get_size()}
    if isinstance(tid, h5py.h5t.TypeIntegerID):
        meta.update(order=tid.get_order(), sign=tid.get_sign())
    elif isinstance(tid, (h5py.h5t.TypeFloatID, h5py.h5t.TypeBitfieldID)):
        meta.update(order=tid.get_order())
    elif isinstance(tid, h5py.h5t.TypeStringID):
        meta.update(cset=tid.get_cset(), strpad=tid.get_strpad(), vlen=bool(tid.is_variable_str()))
    elif isinstance(tid, h5py.h5t.TypeOpaqueID):
        meta.update(tag=tid.get_tag().decode(errors="replace") if isinstance(tid.get_tag(), bytes)
                    else tid.get_tag())
    elif isinstance(tid, h5py.h5t.TypeCompoundID):
        meta["members"] = [{"name": tid.get_member_name(i).decode("utf-8"),
                            **type_metadata(tid.get_member_type(i))} for i in range(tid.get_nmembers())]
    elif isinstance(tid, h5py.h5t.TypeEnumID):
        meta["members"] = {tid.get_member_name(i).decode("utf-8"): tid.get_member_value(i)
                           for i in range(tid.get_nmembers())}
        meta["base"] = type_metadata(tid.get_super())
    elif isinstance(tid, h5py.h5t.TypeArrayID):
        meta.update(dims=list(tid.get_array_dims()), base=type_metadata(tid.get_super()))
    elif isinstance(tid, h5py.h5t.TypeVlenID):
        meta["base"] = type_metadata(tid.get_super())
    return meta


def _dtype_str(dtype: np.dtype) -> Any:
    if dtype.fields is None:
        return dtype.str
    return {k: _dtype_str(v[0]) for k, v in dtype.fields.items()}


def _attributes(obj) -> list[dict]:
    out = []
    for name in sorted(obj.attrs.keys()):
        aid = obj.attrs.get_id(name)
        out.append({"name": name, "shape": aid.shape, "type": type_metadata(aid.get_type())})
    return out


def _filters(ds: h5py.Dataset) -> list[dict] | None:
    plist = ds.id.get_create_plist()
    n = plist.get_nfilters()
    if n <= 0:
        return None
    out = []
    for i in range(n):
        fid, _, _, name = plist.get_filter(i)
        out.append({"id": fid, "name": name.decode(errors="replace") if isinstance(name, bytes) else name})
    return out


def entity(f: h5py.File, path: str, resolve_links: str = "only_valid"):
    """The object or link at ``path`` (h5grove's link resolution; external links never)."""
    if path in ("", "/"):
        return f["/"]
    try:
        link = f.get(path, getlink=True)
    except (KeyError, ValueError):
        link = None
    if link is None:
        raise H5Error(404, f"{path} is not a valid path in this file")
    if isinstance(link, h5py.ExternalLink):
        if resolve_links == "all":
            raise H5Error(404, f"{path} is an external link to {link.filename}:{link.path}; "
                               "external links are not followed here")
        return link
    if isinstance(link, h5py.SoftLink):
        if resolve_links == "none":
            return link
        try:
            return f[path]
        except (KeyError, OSError):
            if resolve_links == "only_valid":
                return link
            raise H5Error(404, f"cannot resolve the soft link {path} -> {link.path}") from None
    return f[path]


def metadata(f: h5py.File, path: str, depth: int = 1, resolve_links: str = "only_valid") -> dict:
    """h5grove's ``meta``: keys sorted as h5grove sorts them."""
    obj = entity(f, path, resolve_links)
    name = path.rstrip("/").split("/")[-1] if path not in ("", "/") else ""
    if isinstance(obj, h5py.ExternalLink):
        return {"kind": "external_link", "name": name, "target_file": obj.filename, "target_path": obj.path}
    if isinstance(obj, h5py.SoftLink):
        return {"kind": "soft_link", "name": name, "target_path": obj.path}
    base = {"attributes": _attributes(obj), "name": name}
    if isinstance(obj, h5py.Dataset):
        return {"attributes": base["attributes"], "chunks": obj.chunks, "filters": _filters(obj),
                "kind": "dataset", "name": name, "shape": obj.shape, "type": type_metadata(obj.id.get_type())}
    if isinstance(obj, h5py.Group):
        if depth <= 0:
            return {**base, "kind": "group"}
        prefix = "" if path in ("", "/") else path.rstrip("/")
        children = [metadata(f, f"{prefix}/{child}", depth - 1, resolve_links) for child in obj.keys()]
        return {"attributes": base["attributes"], "children": children, "kind": "group", "name": name}
    if isinstance(obj, h5py.Datatype):
        return {"attributes": base["attributes"], "kind": "datatype", "name": name,
                "type": type_metadata(obj.id)}
    return {"kind": "other", "name": name}


def _resolved(f: h5py.File, path: str, resolve_links: str):
    obj = entity(f, path, resolve_links)
    if isinstance(obj, (h5py.SoftLink, h5py.ExternalLink)):
        raise H5Error(400, f"{path} is a link that is not resolved here")
    return obj


def attributes(f: h5py.File, path: str, keys: list[str] | None, resolve_links: str = "only_valid") -> dict:
    obj = _resolved(f, path, resolve_links)
    names = keys or list(obj.attrs.keys())
    missing = [k for k in names if k not in obj.attrs]
    if missing:
        raise H5Error(404, f"{path} has no attribute {missing[0]!r}")
    return {k: obj.attrs[k] for k in names}


def parse_selection(text: str | None) -> tuple | None:
    """h5grove's selection: ``5``, ``1,2:5``, ``0:10:2,3,:`` (NumPy indexing, ints and slices)."""
    if text is None or text.strip() == "":
        return None
    members = []
    for raw in text.split(","):
        s = raw.strip()
        try:
            if ":" not in s:
                members.append(int(s))
                continue
            parts = s.split(":")
            if len(parts) > 3:
                raise ValueError(s)
            nums = [int(x) if x.strip() else None for x in parts]
            members.append(slice(*nums))
        except ValueError:
            raise H5Error(422, f"bad selection {text!r}: use NumPy indexing like 5,0:10:2") from None
    return tuple(members)


def selection_shape(shape: tuple, sel: tuple | None) -> tuple[int, ...]:
    if sel is None:
        return tuple(shape)
    if len(sel) > len(shape):
        raise H5Error(422, f"the selection has {len(sel)} members for a {len(shape)}-D dataset")
    out = []
    for n, member in zip(shape, sel, strict=False):
        if isinstance(member, slice):
            if member.step is not None and member.step <= 0:
                raise H5Error(422, "slice steps must be positive")
            out.append(len(range(*member.indices(n))))
        elif not -n <= member < n:
            raise H5Error(422, f"index {member} is out of range for a dimension of {n}")
    out.extend(shape[len(sel):])
    return tuple(out)


def dataset_slice(f: h5py.File, path: str, selection: str | None, max_bytes: int,
                  resolve_links: str = "only_valid") -> Any:
    ds = _resolved(f, path, resolve_links)
    if not isinstance(ds, h5py.Dataset):
        raise H5Error(400, f"{path} is not a dataset")
    sel = parse_selection(selection)
    if ds.shape is None:  # an empty dataset
        return None
    if sel is not None and len(ds.shape) == 0:
        raise H5Error(422, f"{path} is a scalar dataset: no selection")
    shape = selection_shape(ds.shape, sel)
    nbytes = math.prod(shape) * ds.dtype.itemsize
    if nbytes > max_bytes:
        raise H5Error(413, f"the selection has {nbytes} bytes, more than the {max_bytes} bytes one "
                           "request may return; select a smaller slice", "labvault.size")
    return ds[sel] if sel is not None else ds[()]


def safe_dtype(data: Any) -> Any:
    """h5grove's ``dtype=safe``: a type with a JavaScript typed array (little-endian, f2->f4, f16->f8)."""
    arr = np.asarray(data)
    if arr.dtype.kind not in "biuf":
        raise H5Error(422, "dtype=safe needs numeric data")
    dt = arr.dtype
    if dt.kind == "f" and dt.itemsize < 4:
        dt = np.dtype("<f4")
    elif dt.kind == "f" and dt.itemsize > 8:
        dt = np.dtype("<f8")
    elif dt.byteorder in ("=", ">"):
        dt = dt.newbyteorder("<")
    return arr.astype(dt, copy=False)


def stats(data: Any) -> dict:
    arr = np.asarray(data)
    if arr.dtype.kind not in "biuf":
        raise H5Error(422, "statistics need numeric data")
    if arr.dtype.kind == "f":
        arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return dict.fromkeys(("strict_positive_min", "positive_min", "min", "max", "mean", "std"))
    cast = float if arr.dtype.kind == "f" else int
    pos, spos = arr[arr >= 0], arr[arr > 0]
    return {"strict_positive_min": cast(spos.min()) if spos.size else None,
            "positive_min": cast(pos.min()) if pos.size else None,
            "min": cast(arr.min()), "max": cast(arr.max()),
            "mean": float(arr.mean()), "std": float(arr.std())}


def paths(f: h5py.File, base: str, resolve_links: str = "only_valid") -> list[str]:
    obj = _resolved(f, base, resolve_links)
    if not isinstance(obj, h5py.Group):
        raise H5Error(400, f"{base} is not a group")
    prefix = "" if base in ("", "/") else base.rstrip("/")
    out = [base if base else "/"]
    obj.id.links.visit(lambda name: out.append(f"{prefix}/{name.decode()}"))
    return out


def jsonable(o: Any) -> Any:
    """Values as h5grove encodes them: NaN/Inf -> null, complex -> [re, im], bytes -> text."""
    if isinstance(o, np.ndarray):
        if o.dtype.kind == "f" and not np.isfinite(o).all():
            return jsonable(o.astype(object))
        if o.dtype.kind in "OSUVc" or o.dtype.fields is not None:
            return [jsonable(x) for x in o.tolist()] if o.ndim else jsonable(o.item())
        return o.tolist()
    if isinstance(o, (list, tuple)):
        return [jsonable(x) for x in o]
    if isinstance(o, dict):
        return {k: jsonable(v) for k, v in o.items()}
    if isinstance(o, np.generic):
        return jsonable(o.item())
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, complex):
        return [jsonable(o.real), jsonable(o.imag)]
    if isinstance(o, bytes):
        return o.decode("utf-8", errors="replace")
    if isinstance(o, h5py.Empty):
        return None
    if isinstance(o, (h5py.Reference, h5py.RegionReference)):
        return str(o)
    return o


def encode(content: Any, fmt: str | None) -> tuple[bytes, dict[str, str]]:
    """h5grove's encodings: json (default), bin, npy, csv."""
    if fmt in (None, "", "json"):
        return json.dumps(jsonable(content), allow_nan=False).encode(), {"Content-Type": "application/json"}
    arr = np.asarray(content)
    if fmt == "bin":
        return arr.tobytes(), {"Content-Type": "application/octet-stream"}
    if arr.dtype.kind not in "biufc":
        raise H5Error(422, f"format {fmt} needs numeric data")
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, arr)
        return buf.getvalue(), {"Content-Type": "application/octet-stream",
                                "Content-Disposition": 'attachment; filename="data.npy"'}
    if fmt == "csv":
        if arr.ndim == 0 or arr.ndim > 2:
            raise H5Error(422, "format csv needs 1-D or 2-D data")
        buf = io.BytesIO()
        np.savetxt(buf, arr, delimiter=",")
        return buf.getvalue(), {"Content-Type": "text/csv",
                                "Content-Disposition": 'attachment; filename="data.csv"'}
    raise H5Error(422, f"unknown format {fmt!r}: json, bin, npy or csv")


# --------------------------------------------------------------------------------------
# the handlers
# --------------------------------------------------------------------------------------
class H5GroveHandler(ExtensionHandlerMixin, APIHandler):
    """Base of the h5grove endpoints: resolve ``file`` (decided per request), run the h5py work
    off the event loop, answer JSON errors with the rule and reason."""

    auth_resource = AUTH_RESOURCE
    endpoint = ""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        from http.client import responses

        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, web.HTTPError):
            # refusals carry the rule as the reason phrase (see labvault.extension.remote)
            reason, rule = exc.log_message or responses.get(status_code, "error"), exc.reason or ""
        else:
            reason, rule = "the HDF5 endpoint failed; the error was logged", ""
        error = responses.get(status_code, "error").lower()
        self.finish(json.dumps({"error": error, "rule": rule, "reason": reason, "message": reason}))

    @property
    def labvault_cm(self) -> LabvaultContentsManager | None:
        cm = self.contents_manager
        return cm if isinstance(cm, LabvaultContentsManager) else None

    @web.authenticated
    @authorized
    async def get(self):
        file = self.get_query_argument("file", None)
        if not file:
            raise web.HTTPError(400, "the query argument 'file' (the file's path, as in the file browser) is required")
        path = self.get_query_argument("path", None, strip=False) or "/"
        resolve = (self.get_query_argument("resolve_links", None) or "only_valid").lower()
        resolve = {"true": "all", "false": "none"}.get(resolve, resolve)
        if resolve not in ("none", "only_valid", "all"):
            raise web.HTTPError(422, f"resolve_links must be none, only_valid or all (got {resolve!r})")
        args = self.arguments()
        opener, run = await self._resolve_file(file)
        max_bytes = self.extensionapp.max_slice_bytes
        endpoint = self.endpoint

        def work() -> tuple[bytes, dict[str, str]]:
            try:
                with opener() as fileobj, h5py.File(fileobj, "r") as f:
                    return compute(endpoint, f, path, resolve, args, max_bytes)
            except H5Error as e:
                return e
            except OSError as e:
                if "signature" in str(e).lower():
                    return H5Error(415, f"{file} is not an HDF5 file")
                return H5Error(502, f"{file} could not be read as HDF5: {e}")

        result = await run(work)
        if isinstance(result, H5Error):
            raise refused(result.status, result.rule, result.reason)
        body, headers = result
        for k, v in headers.items():
            if k != "Content-Type":
                self.set_header(k, v)
        self.finish(body, set_content_type=headers["Content-Type"])  # APIHandler would say JSON

    def arguments(self) -> dict:
        return {
            "attr_keys": self.get_query_arguments("attr_keys", strip=False),
            "selection": self.get_query_argument("selection", None),
            "format": self.get_query_argument("format", None),
            "dtype": self.get_query_argument("dtype", None),
            "flatten": (self.get_query_argument("flatten", "false") or "false").lower() != "false",
        }

    async def _resolve_file(self, file: str):
        """``(opener, runner)`` for ``file``: a datastore tree file through the service (the
        runner counts as a service call), or a home file after the contents manager's checks."""
        cm = self.labvault_cm
        if cm is None:
            raise web.HTTPError(503, "the labvault contents manager is not configured in this server")
        tp = cm._split(file)
        if tp is not None:
            if cm._hidden(tp) and not cm.allow_hidden:
                raise refused(404, "labvault.path", f"no such file: {file!r}")
            if not tp.rest:
                raise web.HTTPError(400, f"{file} is a folder")
            return tp.tree.opener(tp.key, tp.rest), cm.connection.run
        cm._check_home(file)
        if not cm.allow_hidden and await cm.is_hidden(file):
            raise refused(404, "labvault.path", f"no such file: {file!r}")
        os_path = cm._get_os_path(file.strip("/"))
        if not os.path.isfile(os_path):
            raise refused(404, "", f"no such file: {file!r}")

        async def run_local(fn):
            return await asyncio.get_running_loop().run_in_executor(None, fn)

        return (lambda: open(os_path, "rb")), run_local  # noqa: SIM115 - closed by the caller


def compute(endpoint: str, f: h5py.File, path: str, resolve: str, args: dict, max_bytes: int
            ) -> tuple[bytes, dict[str, str]]:
    """One h5grove request on an open file (runs in a worker thread)."""
    if endpoint == "meta":
        return encode(metadata(f, path, 1, resolve), "json")
    if endpoint == "attr":
        return encode(attributes(f, path, args["attr_keys"] or None, resolve), "json")
    if endpoint == "paths":
        return encode(paths(f, path, resolve), "json")
    data = dataset_slice(f, path, args["selection"], max_bytes, resolve)
    if endpoint == "stats":
        return encode(stats(data), "json")
    if args["dtype"] not in (None, "", "origin"):
        if args["dtype"] != "safe":
            raise H5Error(422, f"dtype must be origin or safe (got {args['dtype']!r})")
        data = safe_dtype(data)
    if args["flatten"] and isinstance(data, np.ndarray):
        data = np.ravel(data)
    return encode(data, args["format"])


class MetaHandler(H5GroveHandler):
    endpoint = "meta"


class AttrHandler(H5GroveHandler):
    endpoint = "attr"


class DataHandler(H5GroveHandler):
    endpoint = "data"


class StatsHandler(H5GroveHandler):
    endpoint = "stats"


class PathsHandler(H5GroveHandler):
    endpoint = "paths"


ENDPOINTS: dict[str, type[H5GroveHandler]] = {
    "meta": MetaHandler, "attr": AttrHandler, "data": DataHandler, "stats": StatsHandler, "paths": PathsHandler,
}
