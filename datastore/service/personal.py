"""The personal repository (``/personal/…``) and what others shared with me (``/shared-with-me/…``).

A user is the sole owner of their personal scientific data (privacy statement): only they list,
read, upload, delete and share it. They may share a file or a folder with named users, who then
read it under ``/shared-with-me/{owner}/{path}`` and see the owner's name and institution —
nothing else of them. Files are stored like experiment files: encrypted, replicated, decided
on every request, audited once per file and reader per read window.
"""

from __future__ import annotations

from sqlalchemy import select
from tornado import web

from labvault import policies as p
from labvault.datastore import operations as ops
from labvault.datastore.access import personal_shared_with
from labvault.datastore.models import PersonalShare, StoredFile, User, UserState
from labvault.datastore.store.store import Home

from . import views
from .handlers import APIError, BaseAPIHandler, FileServing, StreamedUpload, denied, row_id


def _share(x: PersonalShare, names: views.NameCache) -> dict:
    return {"id": x.id, "path": x.path, "user": names.person(x.shared_with_id),
            "created_at": x.created_at, "revoked_at": x.revoked_at}


def _file(r: StoredFile, owner: dict | None = None) -> dict:
    out = {"path": r.path, "size": r.size, "checksum": r.checksum, "created_at": r.created_at}
    if owner is not None:
        out["owner"] = owner
    return out


class PersonalBase(FileServing, BaseAPIHandler):
    def personal_item(self, session, owner_id: int, path: str) -> p.PersonalItem:
        return p.PersonalItem(owner_id, path, personal_shared_with(session, owner_id, path))

    def live_row(self, session, owner_id: int, path: str) -> StoredFile | None:
        return session.scalar(select(StoredFile).where(
            StoredFile.owner_id == owner_id, StoredFile.path == path, StoredFile.deleted_at.is_(None)))

    def decide_personal_read(self, owner: User, path: str, *, hide: bool) -> StoredFile:
        """Decide this request; audit one event per file and reader per read window. ``hide``:
        a refusal is a 404 (someone else's repository: its files are not revealed)."""
        path = self._path(path)
        target = f"personal:{owner.name}/{path}"
        with self.sessions() as s:
            decision = self.allowed_by(self.service.policy.decide(
                self.subject(s), "read", self.personal_item(s, owner.id, path), self.now))
            if not decision.allowed:
                self.audit("file.read", target, decision)
                raise denied(decision, 404 if hide else 403)
            row = self.live_row(s, owner.id, path)
            if row is None:
                raise APIError(404, "not found", "", f"no file {path!r} in {'your' if not hide else 'the shared'} repository")
            s.expunge(row)
        if self.service.open_read_window(self.lv_user.id, row.id):
            self.audit("file.read", target, decision, {"uuid": row.uuid})
        return row


class PersonalFilesHandler(PersonalBase):
    """My personal repository: every live file, with whom each is shared."""

    def get(self):
        with self.sessions() as s:
            self.decide(s, "read", p.PersonalItem(self.lv_user.id), f"personal:{self.lv_user_name}/",
                        audit_allowed=False)
            rows = s.scalars(select(StoredFile).where(StoredFile.owner_id == self.lv_user.id,
                                                      StoredFile.deleted_at.is_(None))
                             .order_by(StoredFile.path)).all()
            self.write_json({"files": [_file(r) for r in rows]})


@web.stream_request_body
class PersonalFileHandler(StreamedUpload, PersonalBase):
    """One file of my personal repository: GET/HEAD (Range), PUT (upload), DELETE (crypto-shred)."""

    def _me(self) -> User:
        return self.lv_user

    def head(self, path):
        self.serve_head(self.decide_personal_read(self._me(), path, hide=False))

    async def get(self, path):
        await self.serve(self.decide_personal_read(self._me(), path, hide=False))

    def put(self, path):
        path = self._path(path)
        info = self.store_op(self.service.store.ingest_stream, Home(owner=self.lv_user_name), path,
                             self.upload_blocks())
        with self.sessions() as s:
            self.write_json(_file(s.get(StoredFile, info.file.id)), 201)

    def delete(self, path):
        path = self._path(path)
        reason = self.get_argument("reason", "").strip() or "deleted by its owner"
        info = self.store_op(self.service.store.delete_file, Home(owner=self.lv_user_name), path, reason=reason)
        self.service.forget_reader(info.id)
        with self.sessions() as s:
            row = s.get(StoredFile, info.id)
            self.write_json({**_file(row), "deleted_at": row.deleted_at})


class PersonalSharesHandler(BaseAPIHandler):
    """My shares (active ones; ``?all=1`` with the withdrawn), and sharing a file or folder."""

    def get(self):
        with self.sessions() as s:
            q = select(PersonalShare).where(PersonalShare.owner_id == self.lv_user.id)
            if self.get_argument("all", "") != "1":
                q = q.where(PersonalShare.revoked_at.is_(None))
            names = views.NameCache(s)
            self.write_json({"shares": [_share(x, names) for x in s.scalars(q.order_by(PersonalShare.id))]})

    def post(self):
        body = self.json_body()
        path, user = self.field(body, "path"), self.field(body, "user")
        share = self.run_op(ops.share_personal, self._path(path), user)
        with self.sessions() as s:
            self.write_json(_share(s.get(PersonalShare, share.id), views.NameCache(s)), 201)

    def _path(self, path: str) -> str:
        return PersonalBase._path(self, path)


class PersonalShareHandler(BaseAPIHandler):
    def delete(self, share_id):
        share = self.run_op(ops.revoke_personal_share, row_id(share_id, "share"))
        with self.sessions() as s:
            self.write_json(_share(s.get(PersonalShare, share.id), views.NameCache(s)))


class SharedWithMeHandler(BaseAPIHandler):
    """Files others shared with me (a shared folder lists every file under it)."""

    def get(self):
        with self.sessions() as s:
            shares = s.execute(
                select(PersonalShare.owner_id, PersonalShare.path)
                .join(User, User.id == PersonalShare.owner_id)
                .where(PersonalShare.shared_with_id == self.lv_user.id, PersonalShare.revoked_at.is_(None),
                       User.state == UserState.active)
            ).all()
            prefixes: dict[int, set[str]] = {}
            for owner_id, path in shares:
                prefixes.setdefault(owner_id, set()).add(path)
            names = views.NameCache(s)
            out = []
            for owner_id, paths in sorted(prefixes.items()):
                rows = s.scalars(select(StoredFile).where(StoredFile.owner_id == owner_id,
                                                          StoredFile.deleted_at.is_(None))
                                 .order_by(StoredFile.path)).all()
                for r in rows:
                    if any(r.path == sp or r.path.startswith(sp + "/") for sp in paths):
                        out.append(_file(r, names.person(owner_id)))
            self.write_json({"files": out})


class SharedFileHandler(PersonalBase):
    """A file someone shared with me: GET/HEAD with Range. Anything else is a 404."""

    def _owner(self, owner: str) -> User:
        with self.sessions() as s:
            user = s.scalar(select(User).where(User.name == owner))
            if user is not None:
                s.expunge(user)
        if user is None:
            raise APIError(404, "not found", "", f"nothing shared with you at {owner}/")
        return user

    def head(self, owner, path):
        self.serve_head(self.decide_personal_read(self._owner(owner), path, hide=True))

    async def get(self, owner, path):
        await self.serve(self.decide_personal_read(self._owner(owner), path, hide=True))


ROUTES = [
    ("/personal/files", PersonalFilesHandler),
    ("/personal/files/{path+}", PersonalFileHandler),
    ("/personal/shares", PersonalSharesHandler),
    ("/personal/shares/{share_id}", PersonalShareHandler),
    ("/shared-with-me", SharedWithMeHandler),
    ("/shared-with-me/{owner}/{path+}", SharedFileHandler),
]
