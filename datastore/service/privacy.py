"""Data-subject rights through the service: correct my data (``PATCH /me``), request deletion.

Export (``GET /me/export``) and closing (``POST /me/close``) live in :mod:`.handlers`; all of them
call :mod:`labvault.datastore.rights`, as the admin CLI does.
"""

from __future__ import annotations

from labvault.datastore import operations as ops
from labvault.datastore import rights
from labvault.datastore.models import User

from . import views
from .handlers import APIError, BaseAPIHandler, denied


def correct_me(handler: BaseAPIHandler) -> None:
    """``PATCH /me``: correct display name, e-mail, ORCID, phone, e-mail visibility."""
    body = handler.json_body()
    unknown = sorted(set(body) - set(rights.CORRECTABLE))
    if unknown:
        raise APIError(400, "bad request", "privacy.data_subject_rights",
                       f"{', '.join(unknown)}: not correctable here (correctable: {', '.join(rights.CORRECTABLE)}; "
                       "the institutional e-mail proves membership and is changed by verifying a new one)")
    try:
        rights.correct_account(handler.sessions, handler.actor, handler.lv_user_name, body, now=handler.now)
    except ops.Denied as e:
        raise denied(e.decision) from None
    except ops.OperationError as e:
        raise APIError(400, "bad request", "privacy.data_subject_rights", str(e)) from None
    with handler.sessions() as s:
        handler.write_json(views.me(s.get(User, handler.lv_user.id)))


class DeletionRequestHandler(BaseAPIHandler):
    """``POST /me/deletion-request``: delete my personal data now and close my account."""

    def post(self):
        body = self.json_body()
        if body.get("confirm") != self.lv_user_name:
            raise APIError(400, "bad request", "privacy.data_subject_rights",
                           "type your user name as 'confirm': deleting your personal data closes your "
                           "account and cannot be undone")
        try:
            result = rights.request_deletion(self.sessions, self.actor, self.lv_user_name, now=self.now,
                                             store=self.service.store)
        except ops.Denied as e:
            raise denied(e.decision) from None
        except ops.OperationError as e:
            raise APIError(409, "conflict", "privacy.data_subject_rights", str(e)) from None
        self.write_json(result)


ROUTES: list[tuple[str, type]] = [
    ("/me/deletion-request", DeletionRequestHandler),
]
