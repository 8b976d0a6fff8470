"""``/files/<path>``: downloads and raw views (images in Markdown, "Download" in the file browser).

Home files are served by jupyter_server's own static handler once the contents manager's path
checks passed (the stock handler follows symlinks out of the home directory; this one does
not). Datastore files are streamed from the service in pieces, each piece a Range request the
service decides, so a large file never sits in the server's memory and access that ends stops
the download.
"""

from __future__ import annotations

import mimetypes

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import AuthenticatedFileHandler
from tornado import web

from .remote import refused

PIECE = 4 * 1024 * 1024


class LabvaultFilesHandler(AuthenticatedFileHandler):
    """The ``files_handler_class`` of :class:`~labvault.extension.contents.LabvaultContentsManager`."""

    @web.authenticated
    @authorized
    async def get(self, path: str, include_body: bool = True) -> None:  # type: ignore[override]
        cm = self.contents_manager
        split = getattr(cm, "_split", None)
        tp = split(path) if split else None
        if tp is None:
            if split:
                cm._check_home(path)
            return await super().get(path, include_body=include_body)
        self.check_xsrf_cookie()
        if (cm._hidden(tp) and not cm.allow_hidden) or not tp.rest:
            raise refused(404, "labvault.path", f"no such file: {tp.api_path!r}")
        row = next((f for f in await tp.tree.files(tp.key) if f["path"] == tp.rest), None)
        if row is None:
            raise refused(404, "", f"no file {tp.rest!r} in {tp.key or tp.tree.name}")
        name = tp.rest.rsplit("/", 1)[-1]
        if name.endswith(".ipynb") or self.get_argument("download", None):
            self.set_attachment_header(name)
        self.set_header("Content-Type", _content_type(name))
        self.set_header("Cache-Control", "no-cache")
        self.set_header("Content-Length", str(row.get("size") or 0))
        if not include_body:
            return
        conn = cm.connection
        fileobj = await conn.run(tp.tree.opener(tp.key, tp.rest))
        try:
            while True:
                piece = await conn.run(fileobj.read, PIECE)
                if not piece:
                    break
                self.write(piece)
                await self.flush()
        finally:
            fileobj.close()


def _content_type(name: str) -> str:
    if name.endswith(".ipynb"):
        return "application/x-ipynb+json"
    mime, encoding = mimetypes.guess_type(name)
    if encoding is not None:
        return "application/gzip" if encoding == "gzip" else "application/octet-stream"
    if mime == "text/plain":
        return "text/plain; charset=UTF-8"
    return mime or "application/octet-stream"
