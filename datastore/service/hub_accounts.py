"""Hub-internal API for accounts: sign-up, e-mail confirmation, login (password, TOTP, lockout), identity-provider logins.

The Hub's authenticators (``labvault.hub.auth``, ``labvault.hub.oauth``) call these with the
shared secret; the client's IP travels in the body (``ip``), since the request comes from the
Hub. Every answer is JSON: ``{"result": "ok" | "enrol_totp", "rule", "reason", "account"?,
"enrolment"?}`` with 200, or ``{"error", "rule", "reason"}`` with 400/403/404/409/503. The
logic lives in :mod:`labvault.datastore.accounts`; password hashing runs on a worker thread so
one sign-in never stalls the service's other requests.

    GET  /hub/institutions        verified institutions offered at sign-up (name, e-mail domains)
    POST /hub/signup              {name, display_name, institution, email, password, adult, ip, link_base}
    POST /hub/confirm             {token, name, password, totp?, ip}   (the link, then signed in)
    POST /hub/login               {name, password, totp?, ip}
    POST /hub/totp/enrol          {name}                               (a signed-in user's choice)
    POST /hub/totp/confirm        {name, code, ip, sign_in}
    POST /hub/session             {name}                               (refresh_user of local accounts)
    POST /hub/oauth-login         {idp, subject, claims, username, display_name?, email?, ip, refresh}
"""

from __future__ import annotations

from functools import partial

from tornado.ioloop import IOLoop

from labvault.datastore.accounts import AccountError, Accounts, LocalAccounts, Outcome
from labvault.datastore.mail import Mailer, MailError

from .handlers import APIError
from .hub_api import HubInternalHandler

_ERRORS = {400: "bad request", 403: "forbidden", 404: "not found", 409: "conflict", 503: "unavailable"}


def accounts_of(service) -> Accounts:
    """The service's :class:`Accounts` (configured from its config: c.LocalAccounts, c.Mailer)."""
    accounts = getattr(service, "_labvault_accounts", None)
    if accounts is None:
        accounts = Accounts(service.sessions, LocalAccounts(parent=service), service.policy,
                            Mailer(parent=service))
        service._labvault_accounts = accounts
    return accounts


class AccountHandler(HubInternalHandler):
    """Runs one account operation off the event loop and answers with its outcome."""

    @property
    def accounts(self) -> Accounts:
        return accounts_of(self.service)

    async def run(self, fn, **kwargs) -> None:
        try:
            result = await IOLoop.current().run_in_executor(None, partial(fn, now=self.now, **kwargs))
        except AccountError as e:
            raise APIError(e.status, _ERRORS.get(e.status, "refused"), e.rule, e.reason) from None
        except MailError as e:
            self.service.log.warning("confirmation mail not sent: %s", e)
            raise APIError(503, "unavailable", "", "the confirmation e-mail could not be sent; "
                           "try again later") from None
        if isinstance(result, Outcome):
            if result.result == "refused":
                raise APIError(403, "forbidden", result.decision.rule, result.decision.reason)
            self.write_json(result.as_json())
        else:
            self.write_json(result)

    def text(self, body: dict, name: str, required: bool = True, limit: int = 4096) -> str | None:
        value = self.field(body, name, str, required)
        if value is not None and len(value) > limit:
            raise APIError(400, "bad request", "", f"{name!r} is too long")
        return value


class InstitutionsHandler(AccountHandler):
    async def get(self):
        self.write_json({"institutions": self.accounts.institutions(),
                         "password_min_length": self.accounts.settings.password_min_length})


class SignupHandler(AccountHandler):
    async def post(self):
        b = self.json_body()
        adult = b.get("adult")
        if not isinstance(adult, bool):
            raise APIError(400, "bad request", "", "'adult' must be true or false")
        await self.run(self.accounts.signup, name=self.text(b, "name", limit=200),
                       display_name=self.text(b, "display_name", limit=400),
                       institution=self.text(b, "institution", limit=400),
                       email=self.text(b, "email", limit=400), password=self.text(b, "password"),
                       adult=adult, ip=self.text(b, "ip", False, 100),
                       link_base=self.text(b, "link_base", limit=2000))


class ConfirmHandler(AccountHandler):
    async def post(self):
        b = self.json_body()
        await self.run(self.accounts.confirm, token=self.text(b, "token", limit=400),
                       name=self.text(b, "name", limit=200), password=self.text(b, "password"),
                       totp=self.text(b, "totp", False, 20), ip=self.text(b, "ip", False, 100))


class LoginHandler(AccountHandler):
    async def post(self):
        b = self.json_body()
        await self.run(self.accounts.login, name=self.text(b, "name", limit=200),
                       password=self.text(b, "password"), totp=self.text(b, "totp", False, 20),
                       ip=self.text(b, "ip", False, 100))


class TotpEnrolHandler(AccountHandler):
    async def post(self):
        b = self.json_body()
        await self.run(self.accounts.start_totp, name=self.text(b, "name", limit=200))


class TotpConfirmHandler(AccountHandler):
    async def post(self):
        b = self.json_body()
        sign_in = b.get("sign_in", False)
        if not isinstance(sign_in, bool):
            raise APIError(400, "bad request", "", "'sign_in' must be true or false")
        await self.run(self.accounts.confirm_totp, name=self.text(b, "name", limit=200),
                       code=self.text(b, "code", limit=20), ip=self.text(b, "ip", False, 100),
                       sign_in=sign_in)


class SessionHandler(AccountHandler):
    async def post(self):
        b = self.json_body()
        await self.run(self.accounts.session, name=self.text(b, "name", limit=200))


class OAuthLoginHandler(AccountHandler):
    async def post(self):
        b = self.json_body()
        claims = b.get("claims", [])
        if not isinstance(claims, list) or not all(isinstance(c, str) and len(c) <= 255 for c in claims):
            raise APIError(400, "bad request", "", "'claims' must be a list of strings")
        refresh = b.get("refresh", False)
        if not isinstance(refresh, bool):
            raise APIError(400, "bad request", "", "'refresh' must be true or false")
        await self.run(self.accounts.idp_login, idp=self.text(b, "idp", limit=255),
                       subject=self.text(b, "subject", limit=255), claims=claims,
                       username=self.text(b, "username", limit=200),
                       display_name=self.text(b, "display_name", False, 400) or "",
                       email=self.text(b, "email", False, 400), ip=self.text(b, "ip", False, 100),
                       refresh=refresh)


ROUTES: list[tuple[str, type]] = [
    ("/hub/institutions", InstitutionsHandler),
    ("/hub/signup", SignupHandler),
    ("/hub/confirm", ConfirmHandler),
    ("/hub/login", LoginHandler),
    ("/hub/totp/enrol", TotpEnrolHandler),
    ("/hub/totp/confirm", TotpConfirmHandler),
    ("/hub/session", SessionHandler),
    ("/hub/oauth-login", OAuthLoginHandler),
]
