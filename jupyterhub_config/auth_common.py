"""What both labvault authenticators share: account checks through the datastore service.

The Hub holds no database and no keys: sign-in decisions, account state and institution
membership come from the service's Hub-internal API (:mod:`labvault.hub.datastore_api`).
:class:`LabvaultAuthMixin` is composed with JupyterHub's ``Authenticator`` (local accounts,
:mod:`labvault.hub.auth`) and oauthenticator's ``GenericOAuthenticator`` (:mod:`labvault.hub.oauth`):

- the sign-in result becomes the auth model; institution and vendor flag ride in
  ``auth_state["labvault"]`` (``enable_auth_state`` is on by default: the Hub needs
  ``JUPYTERHUB_CRYPT_KEY``, see :func:`ensure_crypt_key`);
- ``refresh_user`` re-checks state and membership, so a closed, deactivated or removed member
  loses the session (``auth_refresh_age``, ``refresh_pre_spawn`` and ``auth_refresh_strict``
  default to doing so promptly, also for requests of the user's running server);
- tentative, deactivated and closed accounts, and users without a verified institution, get a
  clear 403 page with the rule and the reason;
- the Hub's logs get client addresses truncated (``mask_ips_in_logs``).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from jinja2 import ChoiceLoader, FileSystemLoader
from tornado import web
from traitlets import Bool, Instance, default
from traitlets.config import LoggingConfigurable

from labvault.policies import truncate_ip

from .datastore_api import DatastoreAPI, DatastoreRefused, DatastoreUnavailable

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: refusals shown as their own page (not as a message on the login form)
PAGE_RULES = ("account.state", "signin.institution", "account.registration", "account.adult")
#: what of the service's account view rides in auth_state["labvault"]
AUTH_STATE_KEYS = ("institution", "institution_verified", "is_vendor", "is_facility", "pi_verified",
                   "is_pi", "state")


class Refused(web.HTTPError):
    """A sign-in refusal with the policy's rule and reason; ``page`` shows it as its own page."""

    def __init__(self, reason: str, rule: str = "", status: int = 403, page: bool = True):
        super().__init__(status, "%s", reason)
        self.rule, self.refusal, self.page = rule, reason, page
        self.jupyterhub_message = reason


class TotpEnrolmentNeeded(Exception):
    """The password was right; a second factor must be set up before signing in."""

    def __init__(self, name: str, enrolment: dict, ticket: str, next_url: str = ""):
        super().__init__(f"{name} must set up two-factor authentication")
        self.name, self.enrolment, self.ticket, self.next_url = name, enrolment, ticket, next_url


def register_templates(settings: dict) -> None:
    """Make labvault's templates findable by the Hub's Jinja environments (once).

    The Hub's own loader comes first, so a deployment can override any ``labvault_*.html``
    through ``c.JupyterHub.template_paths``.
    """
    for key in ("jinja2_env", "jinja2_env_sync"):
        env = settings.get(key)
        if env is None or getattr(env, "_labvault_templates", False):
            continue
        env.loader = ChoiceLoader([env.loader, FileSystemLoader(str(TEMPLATES))])
        env._labvault_templates = True


def ensure_crypt_key(directory: str | os.PathLike, env: dict | None = None) -> str:
    """``JUPYTERHUB_CRYPT_KEY`` for auth_state: from the environment, else from
    ``directory/jupyterhub_crypt_key`` (created once, 0600, 32 random bytes in hex).

    The embedded default calls this from its ``jupyterhub_config.py`` before JupyterHub reads
    the key; it returns the key and sets it in ``env`` (default: ``os.environ``).
    """
    env = os.environ if env is None else env
    if env.get("JUPYTERHUB_CRYPT_KEY"):
        return env["JUPYTERHUB_CRYPT_KEY"]
    path = Path(directory) / "jupyterhub_crypt_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    key = path.read_text().strip()
    env["JUPYTERHUB_CRYPT_KEY"] = key
    return key


class LabvaultPageMixin:
    """For the authenticators' handlers: refusal pages, and no full client IP in Tornado's log."""

    def _request_summary(self) -> str:
        return f"{self.request.method} {self.request.path} ({truncate_ip(self.request.remote_ip)})"

    def write_error(self, status_code: int, **kwargs):
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, Refused) and exc.page:
            html = self.render_template("labvault_refused.html", sync=True, status_code=status_code,
                                        rule=exc.rule, reason=exc.refusal)
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.finish(html)
            return
        super().write_error(status_code, **kwargs)


class LabvaultAuthMixin(LoggingConfigurable):
    """Configurable mixin of both labvault authenticators (compose it first)."""

    datastore = Instance(
        DatastoreAPI,
        help="""The client of the datastore service's Hub-internal API. Configure it with
        c.DatastoreAPI.url / c.DatastoreAPI.secret (defaults: $LABVAULT_SERVICE_URL and
        $LABVAULT_HUB_SECRET).""",
    )

    @default("datastore")
    def _default_datastore(self):
        return DatastoreAPI(parent=self)

    mask_ips_in_logs = Bool(
        True,
        help="""Truncate client addresses in the Hub's request log and in Tornado's log lines
        (privacy statement: 192.168.x.x; IPv6 keeps /48). Installs
        labvault.hub.logs.log_request as the Hub's log_function unless
        c.JupyterHub.tornado_settings names another one.""",
    ).tag(config=True)

    # JupyterHub's defaults changed where labvault needs something else ------------------
    @default("enable_auth_state")
    def _default_enable_auth_state(self):
        # institution and vendor flag ride in auth_state; the Hub needs JUPYTERHUB_CRYPT_KEY
        return True

    @default("refresh_pre_spawn")
    def _default_refresh_pre_spawn(self):
        return True

    @default("auth_refresh_age")
    def _default_auth_refresh_age(self):
        # a closed or removed member loses the Hub session within two minutes; the datastore
        # service refuses them at once anyway (it decides every request)
        return 120

    @default("auth_refresh_strict")
    def _default_auth_refresh_strict(self):
        # refresh_user says False only when labvault refuses the account (an unreachable
        # service keeps the session), so API requests of a refused user's server end too
        return True

    @default("any_allow_config")
    def _default_any_allow_config(self):
        return True  # the datastore service is the allow list: its decision is checked

    # the auth model ----------------------------------------------------------------------
    def labvault_auth_model(self, account: dict, auth_state: dict | None = None) -> dict:
        """The JupyterHub auth model of a labvault account the service let in."""
        state = dict(auth_state or {})
        state["labvault"] = {k: account.get(k) for k in AUTH_STATE_KEYS}
        name = account["name"]
        return {"name": name, "admin": bool(account.get("admin")) or name in self.admin_users,
                "auth_state": state}

    def check_allowed(self, username: str, authentication: dict | None = None) -> bool:
        """Allowed: whom the datastore service let in (``auth_state["labvault"]``) and, if
        ``allowed_users`` is set, who is in it too."""
        approved = bool(authentication and (authentication.get("auth_state") or {}).get("labvault"))
        if not approved:
            return False
        if self.allowed_users:
            return username in self.allowed_users
        return True

    async def ask_service(self, method: str, path: str, body: Any = None) -> dict:
        """Call the Hub-internal API; refusals become :class:`Refused` / HTTP errors."""
        try:
            return await self.datastore.request(method, path, body)
        except DatastoreRefused as e:
            if e.status == 403:
                raise Refused(e.reason, e.rule, 403, page=e.rule in PAGE_RULES) from None
            raise Refused(e.reason, e.rule, e.status if e.status in (400, 404, 409) else 400,
                          page=False) from None
        except DatastoreUnavailable as e:
            self.log.error("labvault datastore service unavailable: %s", e)
            raise web.HTTPError(503, "labvault's datastore service is unavailable; try again "
                                "in a moment") from None

    async def recheck_account(self, user, path: str, body: dict, auth_state: dict | None):
        """refresh_user's core: the service re-decides; refused → False (sign in again)."""
        try:
            out = await self.datastore.request("POST", path, body)
        except DatastoreRefused as e:
            self.log.warning("labvault refused the session of %s (%s): %s", user.name, e.rule, e.reason)
            return False
        except DatastoreUnavailable as e:
            # an unreachable service keeps the session: it refuses every data request anyway
            self.log.error("cannot re-check %s, datastore service unavailable: %s", user.name, e)
            return True
        return self.labvault_auth_model(out["account"], auth_state)

    def setup_hub(self, app) -> None:
        """Called from get_handlers: templates, and the masked request log."""
        settings = app.tornado_settings
        register_templates(settings)
        if self.mask_ips_in_logs:
            from jupyterhub.log import log_request as hub_log_request

            from .logs import log_request, mask_tornado_logs

            mask_tornado_logs()
            if settings.get("log_function") in (None, hub_log_request):
                settings["log_function"] = log_request
