"""The Hub-internal API (``/services/labvault/api/v1/hub/…``): what JupyterHub itself asks.

The authenticator (sign-up, login, ``refresh_user``) and the spawner (environments a user may
start, experiments a user may mount) run inside the Hub process, which holds no database URL
and no keys. They ask the datastore service here, authenticated by a shared secret that only
the Hub and the service know (``LABVAULT_HUB_SECRET``; the embedded default generates it).
Users' tokens never reach these endpoints: a user token gets 401.

Feature modules add their routes to :data:`HUB_ROUTES` (``{name}`` is one path segment).
"""

from __future__ import annotations

import hmac

from sqlalchemy import select

from labvault.datastore.models import User

from . import views
from .handlers import APIError, JSONHandler

SCHEME = "labvault-hub"


class HubInternalHandler(JSONHandler):
    """Accepts only ``Authorization: labvault-hub <secret>``; the actor in audit is ``hub``."""

    lv_user_name = "hub"

    def prepare(self):
        self.record_decisions()
        secret = self.service.hub_secret
        if not secret:
            raise APIError(404, "not found", "default.deny", "the Hub-internal API is disabled (no hub_secret)")
        scheme, _, given = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != SCHEME or not hmac.compare_digest(given.strip().encode(), secret.encode()):
            raise APIError(401, "authentication required", "default.deny",
                           "the Hub-internal API needs the Hub's secret")
        self.now = self.service.now()

    def audit(self, action: str, target: str, decision, details: dict | None = None,
              actor: str = "hub", ip: str | None = None) -> None:
        from labvault.datastore import audit

        with self.sessions.begin() as s:
            audit.append(s, actor=actor, action=action, target=target, decision=decision,
                         ip=ip, details=details, now=self.now,
                         ipv4_masked_bytes=self.service.policy.ipv4_masked_bytes,
                         ipv6_prefix_bits=self.service.policy.ipv6_prefix_bits)

    def user(self, session, name: str) -> User:
        user = session.scalar(select(User).where(User.name == name))
        if user is None:
            raise APIError(404, "not found", "account.state", f"no labvault account {name!r}")
        return user


class HubUserHandler(HubInternalHandler):
    """An account as the Hub needs it: state, institution (verified? vendor?), admin."""

    def get(self, name: str):
        with self.sessions() as s:
            self.write_json(hub_user(self.user(s, name)))


def hub_user(user: User) -> dict:
    inst = user.institution
    return {
        **views.me(user),
        "institution_verified": bool(inst and inst.verified),
        "is_vendor": bool(inst and inst.is_vendor),
        "is_facility": bool(inst and inst.is_facility),
        "under_18": user.under_18,
    }


HUB_ROUTES: list[tuple[str, type]] = [
    ("/hub/users/{name}", HubUserHandler),
]

# feature modules' routes (imported last: they subclass HubInternalHandler)
from .hub_accounts import ROUTES as _ACCOUNT_ROUTES  # noqa: E402
from .hub_spawn import ROUTES as _SPAWN_ROUTES  # noqa: E402

HUB_ROUTES += _ACCOUNT_ROUTES + _SPAWN_ROUTES
