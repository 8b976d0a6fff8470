"""``LabvaultAuthenticator``: local accounts, the embedded default (entry point ``labvault``).

Self-signup (name, institution, institutional e-mail, password, "I am 18 or older"), an
e-mail confirmation link (the account is tentative until it is opened — with the password, so
a mail scanner following links confirms nothing), TOTP two-factor (required for PIs by
default; set up at the first sign-in or by choice at ``/hub/labvault/totp``), lockout after
repeated failures, Argon2id password hashes. Every check is the datastore service's
(:mod:`labvault.datastore.accounts`): this class renders pages and carries answers.

    c.JupyterHub.authenticator_class = "labvault"
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlparse

from jupyterhub.auth import Authenticator
from jupyterhub.handlers.base import BaseHandler
from jupyterhub.handlers.login import LoginHandler
from jupyterhub.utils import url_path_join
from tornado import web
from tornado.escape import url_escape
from traitlets import Any, Bool, Integer, Unicode, default

from .auth_common import LabvaultAuthMixin, LabvaultPageMixin, Refused, TotpEnrolmentNeeded

TICKET = "labvault-totp-enrolment"
NOTICES = {
    "totp": "Two-factor authentication is set up: sign in with your password and a code from now on.",
}


class LabvaultAuthenticator(LabvaultAuthMixin, Authenticator):
    """Local labvault accounts, checked by the datastore service."""

    signup_enabled = Bool(
        True,
        help="""Offer self-signup at /hub/labvault/signup. Without it, accounts are made by
        operators (`labvault user add`) and given a password with
        labvault.datastore.accounts.Accounts.set_password.""",
    ).tag(config=True)

    confirm_url = Unicode(
        help="""The URL of the confirmation page put into sign-up e-mails
        (…/hub/labvault/confirm). Default: from c.JupyterHub.public_url, else from the Hub's
        bind_url. Never taken from the request's Host header (a forged header would send the
        link elsewhere). Set public_url (or this) in production.""",
    ).tag(config=True)

    totp_ticket_minutes = Integer(
        10,
        help="""Minutes between a correct password and setting up two-factor authentication
        at the first sign-in of a PI (the page carries a signed ticket valid this long).""",
    ).tag(config=True)

    @default("request_otp")
    def _default_request_otp(self):
        return True

    @default("otp_prompt")
    def _default_otp_prompt(self):
        return "Two-factor code (if you have set it up):"

    _hub_origin = Any(None)
    _hub_prefix = Unicode("/hub/")

    # --------------------------------------------------------------------------------------
    def get_handlers(self, app):
        self.setup_hub(app)
        url = app.public_url or app.bind_url
        parsed = urlparse(url)
        host = parsed.hostname or ""
        if host in ("", "0.0.0.0", "::"):
            host = "localhost"
        netloc = f"[{host}]" if ":" in host else host
        if parsed.port:
            netloc += f":{parsed.port}"
        self._hub_origin = f"{parsed.scheme or 'http'}://{netloc}"
        self._hub_prefix = app.hub.base_url
        handlers = [
            (r"/login", LabvaultLoginHandler),
            (r"/labvault/confirm", ConfirmHandler),
            (r"/labvault/totp", TotpHandler),
        ]
        if self.signup_enabled:
            handlers.append((r"/labvault/signup", SignupHandler))
        return handlers

    def confirmation_link_base(self) -> str:
        if self.confirm_url:
            return self.confirm_url
        return (self._hub_origin or "http://localhost:8000") + url_path_join(self._hub_prefix, "labvault/confirm")

    # tickets: the password was right moments ago --------------------------------------------
    def make_ticket(self, handler, name: str) -> str:
        value = json.dumps({"n": name, "t": int(time.time())})
        return handler.create_signed_value(TICKET, value).decode()

    def read_ticket(self, handler, ticket: str) -> str:
        raw = web.decode_signed_value(handler.settings["cookie_secret"], TICKET, ticket,
                                      max_age_days=max(self.totp_ticket_minutes, 1) / 1440)
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        if not data or time.time() - data.get("t", 0) > 60 * self.totp_ticket_minutes:
            raise Refused("setting up two-factor authentication took too long: sign in again",
                          "signin.second_factor", page=False)
        return data["n"]

    # --------------------------------------------------------------------------------------
    async def authenticate(self, handler, data):
        """Password (+ code) sign-in, the confirmation link, or the first TOTP code."""
        ip = handler.request.remote_ip
        name = (data.get("username") or "").strip()
        code = (data.get("otp") or "").strip() or None
        if data.get("confirm_token"):
            out = await self.ask_service("POST", "/confirm", {
                "token": data["confirm_token"], "name": name, "password": data.get("password", ""),
                "totp": code, "ip": ip})
        elif data.get("totp_ticket"):
            name = self.read_ticket(handler, data["totp_ticket"])
            out = await self.ask_service("POST", "/totp/confirm", {
                "name": name, "code": code or "", "ip": ip, "sign_in": True})
        else:
            out = await self.ask_service("POST", "/login", {
                "name": name, "password": data.get("password", ""), "totp": code, "ip": ip})
        if out["result"] == "enrol_totp":
            raise TotpEnrolmentNeeded(name, out["enrolment"], self.make_ticket(handler, name))
        return self.labvault_auth_model(out["account"])

    async def refresh_user(self, user, handler=None):
        """Re-check state and institution with the service; refused → the session ends."""
        return await self.recheck_account(user, "/session", {"name": user.name}, None)


# ------------------------------------------------------------------------------------------
# handlers
# ------------------------------------------------------------------------------------------
class _FormErrors:
    """Refusals of a form POST re-render that form with the reason (not the login page)."""

    form_template = ""

    def form_namespace(self) -> dict:
        return {}

    def render_template(self, name, sync=False, **ns):
        if name == "error.html" and self.request.method == "POST" and self.form_template:
            exc = ns.get("exception")
            if not (isinstance(exc, Refused) and exc.page):
                ns = {**self.form_namespace(), "error": ns.get("message") or ns.get("status_message", "")}
                return super().render_template(self.form_template, sync=sync, **ns)
        return super().render_template(name, sync=sync, **ns)


class LabvaultLoginHandler(LabvaultPageMixin, LoginHandler):
    """JupyterHub's login page with a two-factor field, a sign-up link and the TOTP set-up."""

    def render_template(self, name, sync=False, **ns):
        if name == "login.html":
            name = "labvault_login.html"
            auth = self.authenticator
            ns.setdefault("labvault_signup_url", url_path_join(self.hub.base_url, "labvault/signup")
                          if getattr(auth, "signup_enabled", False) else "")
            ns.setdefault("labvault_notice", NOTICES.get(self.get_argument("notice", ""), ""))
        return super().render_template(name, sync=sync, **ns)

    async def post(self):
        try:
            await super().post()
        except TotpEnrolmentNeeded as e:
            await render_totp(self, e.enrolment, ticket=e.ticket, required=True,
                              reason="Your account needs a second factor to sign in.",
                              next_url=self.get_argument("next", ""))


async def render_totp(handler, enrolment: dict, *, ticket: str = "", required: bool = False,
                      reason: str = "", error: str = "", next_url: str = "", status: int = 200):
    handler.set_status(status)
    html = await handler.render_template(
        "labvault_totp.html", enrolment=enrolment, ticket=ticket, required=required, reason=reason,
        error=error, next_url=next_url, totp_url=url_path_join(handler.hub.base_url, "labvault/totp"))
    handler.finish(html)


class SignupHandler(LabvaultPageMixin, BaseHandler):
    """/hub/labvault/signup: the form, and the service's answer."""

    def page_ns(self, **ns) -> dict:
        form = {k: self.get_body_argument(k, "", strip=True) for k in
                ("username", "display_name", "institution", "email")} if self.request.method == "POST" else {}
        return {"signup_url": url_path_join(self.hub.base_url, "labvault/signup"), "form": form,
                "error": "", "rule": "", **ns}

    async def offer(self) -> dict:
        """What the sign-up form offers: verified institutions, the password rule."""
        return await self.authenticator.ask_service("GET", "/institutions")

    async def get(self):
        if self.current_user:
            self.redirect(self.get_next_url(self.current_user))
            return
        html = await self.render_template("labvault_signup.html", **self.page_ns(**await self.offer()))
        self.finish(html)

    async def post(self):
        arg = self.get_body_argument
        error, rule, status = "", "", 200
        if arg("password", "") != arg("password2", ""):
            error, status = "the two passwords differ", 400
        else:
            try:
                await self.authenticator.ask_service("POST", "/signup", {
                    "name": arg("username", "", strip=True), "display_name": arg("display_name", "", strip=True),
                    "institution": arg("institution", "", strip=True), "email": arg("email", "", strip=True),
                    "password": arg("password", ""), "adult": arg("adult", "") == "yes",
                    "ip": self.request.remote_ip, "link_base": self.authenticator.confirmation_link_base(),
                })
            except Refused as e:
                error, rule, status = e.refusal, e.rule, e.status_code
            except web.HTTPError as e:  # 503: service or mail server down
                error, status = e.log_message, e.status_code
        if error:
            self.set_status(status)
            html = await self.render_template("labvault_signup.html", **self.page_ns(
                **await self.offer(), error=error, rule=rule))
            self.finish(html)
            return
        html = await self.render_template(
            "labvault_message.html", heading="Check your e-mail",
            paragraphs=[f"We sent a confirmation link to {arg('email', '', strip=True)}.",
                        "Open it and sign in to confirm your account; until then it is not active.",
                        "The link is valid for a limited time; signing up again with the same details "
                        "sends a new one."],
            link_url=self.settings["login_url"], link_text="Sign in")
        self.finish(html)


class ConfirmHandler(LabvaultPageMixin, _FormErrors, LoginHandler):
    """/hub/labvault/confirm?token=…: confirm with the password, then signed in."""

    form_template = "labvault_confirm.html"

    def form_namespace(self) -> dict:
        return {"token": self.get_argument("confirm_token", ""), "username": self.get_argument("username", ""),
                "confirm_url": url_path_join(self.hub.base_url, "labvault/confirm")}

    async def get(self):
        token = self.get_argument("token", "")
        html = await self.render_template(self.form_template, token=token, username="", error="" if token else
                                          "this page needs the link from your confirmation e-mail",
                                          confirm_url=url_path_join(self.hub.base_url, "labvault/confirm"))
        self.finish(html)

    async def post(self):
        data = {k: self.get_body_argument(k, "", strip=k == "username")
                for k in ("username", "password", "confirm_token", "otp")}
        try:
            user = await self.login_user(data)
        except TotpEnrolmentNeeded as e:
            await render_totp(self, e.enrolment, ticket=e.ticket, required=True,
                              reason="Your account is confirmed; it needs a second factor to sign in.")
            return
        if user is None:
            raise web.HTTPError(403, "the account could not be confirmed")
        self.redirect(self.get_next_url(user))


class TotpHandler(LabvaultPageMixin, _FormErrors, LoginHandler):
    """/hub/labvault/totp: the first code of a new second factor.

    With a ticket (a PI's first sign-in): the code signs in. Without (a signed-in user's
    choice): GET shows a new key, POST confirms it.
    """

    form_template = "labvault_totp.html"

    def form_namespace(self) -> dict:
        arg = self.get_body_argument
        return {"enrolment": {"provisioning_uri": arg("provisioning_uri", ""), "secret": arg("secret", "")},
                "ticket": arg("totp_ticket", ""), "required": bool(arg("totp_ticket", "")), "reason": "",
                "next_url": arg("next", ""), "totp_url": url_path_join(self.hub.base_url, "labvault/totp")}

    async def get(self):
        user = self.current_user
        if user is None:
            self.redirect(url_path_join(self.hub.base_url, "login") + "?next=" +
                          url_escape(url_path_join(self.hub.base_url, "labvault/totp")))
            return
        enrolment = await self.authenticator.ask_service("POST", "/totp/enrol", {"name": user.name})
        await render_totp(self, enrolment)

    async def post(self):
        arg = self.get_body_argument
        if arg("totp_ticket", ""):
            user = await self.login_user({"totp_ticket": arg("totp_ticket"), "otp": arg("otp", "")})
            if user is None:
                raise web.HTTPError(403, "two-factor authentication was not set up")
            self.redirect(self.get_next_url(user))  # validates ?next=
            return
        user = self.current_user
        if user is None:
            raise Refused("sign in first", "account.state")
        await self.authenticator.ask_service("POST", "/totp/confirm", {
            "name": user.name, "code": arg("otp", ""), "ip": self.request.remote_ip, "sign_in": False})
        html = await self.render_template(
            "labvault_message.html", heading="Two-factor authentication is set up",
            paragraphs=["From now on, sign in with your password and the code your app shows."],
            link_url=self.hub.base_url + "home", link_text="Home")
        self.finish(html)
