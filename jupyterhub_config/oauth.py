"""``LabvaultOAuthenticator``: institution sign-in through OAuth2 / OpenID Connect (entry point ``labvault-oauth``).

A GenericOAuthenticator whose users belong to the institution their identity provider's claim
names — ``institution_claim``, e.g. ``schacHomeOrganization``, or the scope of
``eduPersonScopedAffiliation`` (``member@uni.example`` → ``uni.example``) — and only if that
identity provider is registered for the institution (``labvault institution add --idp …``) and
the institution is verified. An e-mail address, even at the institution's domain, never proves
membership (oauthenticator CVE-2022-31027). The datastore service decides, creates or links
the account, and records the login; this class extracts the claims and carries the answer.

    c.JupyterHub.authenticator_class = "labvault-oauth"
    c.LabvaultOAuthenticator.client_id = "labvault"
    c.LabvaultOAuthenticator.authorize_url = "https://idp.uni.example/authorize"
    c.LabvaultOAuthenticator.token_url = "https://idp.uni.example/token"
    c.LabvaultOAuthenticator.userdata_url = "https://idp.uni.example/userinfo"
    c.LabvaultOAuthenticator.institution_claim = "schacHomeOrganization"
"""

from __future__ import annotations

from urllib.parse import urlparse

import jwt
from jupyterhub.traitlets import Callable
from oauthenticator.generic import GenericOAuthenticator
from oauthenticator.oauth2 import OAuthCallbackHandler
from traitlets import List, Unicode, Union, default

from .auth_common import LabvaultAuthMixin, LabvaultPageMixin
from .datastore_api import DatastoreRefused, DatastoreUnavailable

IDENTITY_KEY = "labvault_identity"


class LabvaultOAuthCallbackHandler(LabvaultPageMixin, OAuthCallbackHandler):
    """The OAuth callback, with labvault's refusal page and no full client IP in the log."""


class LabvaultOAuthenticator(LabvaultAuthMixin, GenericOAuthenticator):
    """Institution members, as their identity provider states, checked by the datastore service."""

    institution_claim = Union(
        [Unicode(), Callable()],
        default_value="schacHomeOrganization",
        help="""The user-info claim that names the user's institution: a claim name
        (``schacHomeOrganization``, ``eduPersonScopedAffiliation``, …) or a callable
        ``(user_info)`` returning a string or a list of strings. Values of the form
        ``affiliation@scope`` (scoped affiliations) count by their scope, and only for the
        affiliations in scoped_affiliations. A value must equal an identifier of a registered institution
        (its verified e-mail domain or IdP identifier), and the identity provider must be
        registered for that institution. Without the claim, sign-in is refused: an e-mail
        address never proves membership.""",
    ).tag(config=True)

    scoped_affiliations = List(
        Unicode(),
        ["member", "faculty", "staff", "employee", "student"],
        help="""Affiliations of scoped values (``member@uni.example``) that make a member of the
        scope's institution; e.g. ``affiliate`` or ``library-walk-in`` do not by default.""",
    ).tag(config=True)

    identity_provider = Unicode(
        "",
        help="""The identity provider's identifier as registered for institutions (the value of
        `labvault institution add --idp`). Default: the ``iss`` of the user info or of the
        ID token, else the origin of token_url. With idp_claim set, that claim wins.""",
    ).tag(config=True)

    idp_claim = Unicode(
        "",
        help="""A user-info claim naming the upstream identity provider, for proxies that
        front many (CILogon's ``idp``, SATOSA's ``authenticating_authority``): institutions
        then register their own IdP's identifier rather than the proxy's.""",
    ).tag(config=True)

    @default("username_claim")
    def _default_username_claim(self):
        return "preferred_username"

    @default("scope")
    def _default_scope(self):
        return ["openid", "profile", "email"]

    @default("login_service")
    def _default_login_service(self):
        return "your institution"

    callback_handler = LabvaultOAuthCallbackHandler  # oauthenticator's class attribute

    # claims --------------------------------------------------------------------------------
    def institution_values(self, user_info: dict) -> list[str]:
        """The institution claim's values (scopes of scoped affiliations), lower-case."""
        claim = self.institution_claim
        raw = claim(user_info) if callable(claim) else user_info.get(claim)
        values = [raw] if isinstance(raw, str) else list(raw or []) if isinstance(raw, list | tuple) else []
        out: list[str] = []
        for value in values:
            if not isinstance(value, str) or not value.strip():
                continue
            value = value.strip()
            if "@" in value:
                affiliation, _, value = value.rpartition("@")
                if affiliation.lower() not in {a.lower() for a in self.scoped_affiliations}:
                    continue
            if value.lower() not in out:
                out.append(value.lower())
        return out

    def identity_provider_of(self, user_info: dict, token_info: dict) -> str:
        if self.idp_claim and isinstance(user_info.get(self.idp_claim), str):
            return user_info[self.idp_claim]
        if self.identity_provider:
            return self.identity_provider
        if isinstance(user_info.get("iss"), str):
            return user_info["iss"]
        id_token = (token_info or {}).get("id_token")
        if id_token:
            try:  # straight from the token endpoint (TLS), so the issuer need not be verified here
                iss = jwt.decode(id_token, options={"verify_signature": False}).get("iss")
            except jwt.PyJWTError:
                iss = None
            if isinstance(iss, str) and iss:
                return iss
        parsed = urlparse(self.token_url)
        return f"{parsed.scheme}://{parsed.netloc}"

    async def update_auth_model(self, auth_model: dict) -> dict:
        """Collect what labvault decides on: identity provider, subject, institution claim."""
        auth_model = await super().update_auth_model(auth_model)
        state = auth_model.get("auth_state") or {}
        user_info = state.get(self.user_auth_state_key) or {}
        display = user_info.get("name") or " ".join(
            v for v in (user_info.get("given_name"), user_info.get("family_name")) if isinstance(v, str))
        state[IDENTITY_KEY] = {
            "idp": self.identity_provider_of(user_info, state.get("token_response") or {}),
            "subject": str(user_info.get("sub") or auth_model["name"]),
            "claims": self.institution_values(user_info),
            "username": auth_model["name"],
            "display_name": display if isinstance(display, str) else "",
            # kept on the account as contact only: never looked at for membership
            "email": user_info.get("email") if isinstance(user_info.get("email"), str) else None,
        }
        auth_model["auth_state"] = state
        return auth_model

    # sign-in and refresh ---------------------------------------------------------------------
    async def authenticate(self, handler, data=None, **kwargs):
        """The OAuth code flow (oauthenticator), then labvault's decision."""
        model = await super().authenticate(handler, data, **kwargs)
        state = model["auth_state"]
        out = await self.ask_service("POST", "/oauth-login", {
            **state[IDENTITY_KEY], "ip": handler.request.remote_ip, "refresh": False})
        return self.labvault_auth_model(out["account"], state)

    async def refresh_user(self, user, handler=None, **kwargs):
        """Ask the identity provider again (oauthenticator) and re-decide membership.

        If the provider cannot be asked (an expired access token without a refresh token),
        the last claims are re-checked against labvault's current registry, so a session does
        not end just because a token aged, but does when the account or institution changed.
        """
        old_state = await user.get_auth_state() or {}
        try:
            fresh = await super().refresh_user(user, handler, **kwargs)
        except Exception as e:  # noqa: BLE001 - the provider's failure is not the member's
            self.log.warning("identity provider refresh of %s failed: %s", user.name, e)
            fresh = False
        state = fresh["auth_state"] if isinstance(fresh, dict) and fresh.get("auth_state") else old_state
        identity = state.get(IDENTITY_KEY)
        if not identity:
            return await self.recheck_account(user, "/session", {"name": user.name}, state)
        body = {**identity, "ip": None, "refresh": True}
        try:
            out = await self.datastore.request("POST", "/oauth-login", body)
        except DatastoreRefused as e:
            self.log.warning("labvault refused the session of %s (%s): %s", user.name, e.rule, e.reason)
            return False
        except DatastoreUnavailable as e:
            self.log.error("cannot re-check %s, datastore service unavailable: %s", user.name, e)
            return True
        if out["account"]["name"] != user.name:
            return False
        return self.labvault_auth_model(out["account"], state)

    def get_handlers(self, app):
        self.setup_hub(app)
        return super().get_handlers(app)
